"""Prompting as reasoning models expect (chat template, system prompt, instruction, pack
defaults), reasoning traces, truncation, outcome counts and avg@n."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch
from lm_eval.api.model import LM

from mergeaudit.errors import EvaluationError
from mergeaudit.evaluation.generation import GenerationInfo, traced_hflm_class
from mergeaudit.evaluation.prompting import (
    MATH_INSTRUCTION,
    Prompting,
    apply_prompting,
    resolve_prompting,
    split_trace,
)
from mergeaudit.evaluation.runner import EvalSettings, evaluate_lm, evaluate_model, shipped_tasks
from mergeaudit.modeling import load_tokenizer
from mergeaudit.toy.models import build_base


class WordTokenizer:
    """Counts whitespace-separated words: a tokenizer whose counts a test can predict."""

    chat_template = "<|user|>{content}<|assistant|>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(range(len(text.split())))


class ChatLM(LM):
    """Answers by a function of the prompt; renders chats as <|system|>..<|user|>..<|assistant|>;
    marks the texts in `truncated` as generations that ran out of tokens."""

    def __init__(self, answer, truncated: set[str] = frozenset()):
        super().__init__()
        self.answer = answer
        self.requests: list[tuple[str, dict]] = []
        self.tokenizer = WordTokenizer()
        self.generation_info = {t: GenerationInfo(truncated=True, tokens=None) for t in truncated}
        self._seen: dict[str, int] = defaultdict(int)

    def generate_until(self, requests):
        out = []
        for req in requests:
            prompt, kwargs = req.args
            self.requests.append((prompt, kwargs))
            out.append(self.answer(prompt, self._seen[prompt]))
            self._seen[prompt] += 1
        return out

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return "".join(f"<|{m['role']}|>{m['content']}" for m in chat_history) + "<|assistant|>"

    @property
    def tokenizer_name(self) -> str:
        return "word-chat"

    def chat_template(self, chat_template=False):
        return WordTokenizer.chat_template

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


WORDS = {
    json.loads(line)["question"]: json.loads(line)["answer"]
    for line in (shipped_tasks()["mergeaudit_word_problems"].origin.parent / "word_problems.jsonl").open()
}


def answer_of(prompt: str) -> str:
    question = next(q for q in WORDS if q in prompt)
    return WORDS[question]


def test_split_trace():
    tags = ("<think>", "</think>")
    assert split_trace("<think>a b</think> 42", tags) == ("a b", "42", True)
    assert split_trace("a b</think>42", tags) == ("a b", "42", True)  # the template opened the trace
    assert split_trace("<think>x</think>y</think>7", tags) == ("x</think>y", "7", True)  # the last close counts
    assert split_trace("<think>still thinking", tags) == ("still thinking", None, True)
    assert split_trace("just 42", tags) == ("", "just 42", False)
    assert split_trace("<think>x</think>7", None) == ("", "<think>x</think>7", False)


def test_pack_prompting_metadata_refuses_unknown_keys():
    with pytest.raises(EvaluationError, match="mergeaudit_prompting takes only"):
        resolve_prompting("t", {"metadata": {"mergeaudit_prompting": {"chat_templat": True}}}, None, None, None)
    with pytest.raises(EvaluationError, match="mergeaudit_prompting takes only"):
        resolve_prompting("t", {"metadata": {"mergeaudit_prompting": ["chat_template"]}}, None, None, None)


def test_pack_defaults_and_overrides():
    tasks = shipped_tasks()
    math = tasks["mergeaudit_math500_local"]
    p = resolve_prompting(math.name, math.config, None, None, None)
    assert p.chat_template and p.instruction == MATH_INSTRUCTION and p.until == () and p.doc_to_text == "{{problem}}"
    cfg = apply_prompting(math.config, p, math.name)
    assert cfg["doc_to_text"].startswith("{{problem}}\n") and cfg["generation_kwargs"]["until"] == []
    plain = resolve_prompting(math.name, math.config, False, None, None)
    assert apply_prompting(math.config, plain, math.name)["doc_to_text"] == math.config["doc_to_text"]
    mine = resolve_prompting(math.name, math.config, None, "You are terse.", "Answer now.")
    assert (mine.system_prompt, mine.instruction) == ("You are terse.", "Answer now.")
    add2 = tasks["mergeaudit_add2"]
    assert not resolve_prompting(add2.name, add2.config, None, None, None).chat_template
    assert not resolve_prompting("h", tasks["mergeaudit_humaneval_local"].config, None, None, None).chat_template
    from mergeaudit.evaluation.runner import Function

    with pytest.raises(EvaluationError, match="cannot be appended"):
        apply_prompting({"doc_to_text": Function("utils.doc_to_text")}, Prompting(False, None, "Answer now."), "t")


def test_chat_prompts_carry_system_instruction_and_template():
    lm = ChatLM(lambda prompt, i: f"<think>add them up</think> The answer is {answer_of(prompt)}.")
    settings = EvalSettings(
        limit=4, chat_template=True, system_prompt="Be brief.", instruction="Put the answer last {{not jinja}}."
    )
    result = evaluate_lm(lm, ["mergeaudit_word_problems"], settings)
    prompt, kwargs = lm.requests[0]
    assert prompt.startswith("<|system|>Be brief.<|user|>Question: ") and prompt.endswith(
        "\nPut the answer last {{not jinja}}.<|assistant|>"
    )
    assert kwargs["until"] == ["Question:", "\n\n"]  # the pack defines no chat stop sequences
    score = {s["metric"]: s for s in result.scores if s["filter"] == "verifier"}
    assert score["numeric_match"]["value"] == 1.0 and score["avg@1"]["value"] == 1.0
    assert score["trace_tokens"]["value"] == 3.0  # "add them up", counted by the model's tokenizer
    assert all(s["status"] == "correct" and s["trace_tokens"] == 3 for s in result.samples)


@pytest.mark.integration
def test_pack_chat_defaults_reach_the_model(tmp_path):
    data = tmp_path / "math500.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(1, 4))
    )
    lm = ChatLM(lambda prompt, i: "<think>" + "x " * 5 + "</think> \\boxed{" + re.findall(r"\d+", prompt)[0] * 1 + "}")
    settings = EvalSettings(data_files={"math500": str(data)}, math_timeout=30)
    result = evaluate_lm(lm, ["mergeaudit_math500_local"], settings)
    prompt, kwargs = lm.requests[0]
    assert prompt.startswith("<|user|>What is ") and prompt.endswith(MATH_INSTRUCTION + "<|assistant|>")
    assert "Problem:" not in prompt and kwargs["until"] == []
    statuses = sorted(s["status"] for s in result.samples)
    assert statuses == ["wrong", "wrong", "wrong"]  # the model answers i, not 2i
    assert {s["extracted"] for s in result.samples} == {"1", "2", "3"}


def test_outcomes_truncation_and_trace():
    truncated = "<think>1 2 3 4 5 6 7 8"
    answers = {0: "<think>a b</think> 13", 1: "<think>never closed", 2: truncated, 3: "no digits here"}

    def answer(prompt, i):
        doc = sorted(WORDS).index(next(q for q in WORDS if q in prompt))
        return answers.get(doc % 4)

    lm = ChatLM(answer, truncated={truncated})
    result = evaluate_lm(lm, ["mergeaudit_word_problems"], EvalSettings(limit=8))
    by_status = defaultdict(int)
    for s in result.samples:
        by_status[s["status"]] += 1
        if s["completion"] == truncated:
            assert s["truncated"] and s["verdict"] is False and s["trace_tokens"] == 8
        if s["status"] == "no_answer" and s["completion"].startswith("<think>"):
            assert s["extracted"] is None
    score = {s["metric"]: s for s in result.scores if s["filter"] == "verifier"}
    n_trunc = sum(s["completion"] == truncated for s in result.samples)
    assert n_trunc >= 1 and score["outcome_truncated"]["value"] == n_trunc == by_status["truncated"]
    assert score["truncation_rate"]["value"] == pytest.approx(n_trunc / 8) and score["truncation_rate"]["n"] == 8
    assert (
        sum(score[f"outcome_{k}"]["value"] for k in ("correct", "wrong", "no_answer", "truncated", "timeout", "error"))
        == 8
    )
    assert score["outcome_no_answer"]["value"] == by_status["no_answer"] >= 1


def test_avg_at_n_next_to_pass_at_k():
    def answer(prompt, i):  # right on samples 0, 2, 3 of every prompt: avg@4 = 0.75, pass@2 = 1 - 0/6 = 1
        return answer_of(prompt) if i % 4 != 1 else "-1"

    settings = EvalSettings(limit=5, num_samples=4, temperature=1.0, pass_k=(1, 2))
    result = evaluate_lm(ChatLM(answer), ["mergeaudit_word_problems"], settings)
    score = {s["metric"]: s for s in result.scores if s["filter"] == "verifier"}
    assert score["avg@4"]["value"] == pytest.approx(0.75) and score["avg@4"]["n"] == 5
    assert score["avg@4"]["stderr"] == pytest.approx(0.0)
    assert score["pass@1"]["value"] == pytest.approx(0.75) and score["pass@2"]["value"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    return build_base(str(tmp_path_factory.mktemp("prompting")))


def constant_model(base_dir: str, token: int):
    """The toy model, made to emit `token` at every step (a one-hot lm_head bias)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[token] = 10.0
    model.lm_head = head
    return model.eval()


def test_traced_hflm_marks_generations_that_ran_out(toy_base):
    tok = load_tokenizer(toy_base)
    seven, newline = tok.convert_tokens_to_ids("7"), tok.encode("\n", add_special_tokens=False)[-1]
    settings = EvalSettings(limit=3, max_gen_toks=4, batch_size=3)
    result = evaluate_model(constant_model(toy_base, seven), tok, ["mergeaudit_add2"], settings)
    assert {s["completion"] for s in result.samples} == {"7777"}
    assert all(s["truncated"] and s["status"] == "truncated" and s["completion_tokens"] == 4 for s in result.samples)
    stops = evaluate_model(constant_model(toy_base, newline), tok, ["mergeaudit_add2"], settings)
    assert all(not s["truncated"] and s["status"] == "no_answer" for s in stops.samples)
    lm = traced_hflm_class()(pretrained=constant_model(toy_base, tok.eos_token_id), tokenizer=tok, batch_size=2)
    eos = evaluate_lm(lm, ["mergeaudit_add2"], settings)
    assert all(not s["truncated"] and s["completion_tokens"] == 0 for s in eos.samples)
    assert lm.generation_info[""] == GenerationInfo(truncated=False, tokens=0)


def test_chat_template_refused_without_one(toy_base):
    tok = load_tokenizer(toy_base)
    with pytest.raises(EvaluationError, match="has no chat template"):
        evaluate_model(constant_model(toy_base, 5), tok, ["mergeaudit_add2"], EvalSettings(limit=1, chat_template=True))


def test_eval_spec_checks():
    assert EvalSettings(backend="vllm").model_dump()["server"]["engine"] == "vllm"
    assert EvalSettings(backend="vllm").backend == "served"
    assert EvalSettings(device="cuda").engine == "vllm" and EvalSettings().engine == "transformers"
    assert EvalSettings(device="cuda:1").torch_dtype == "bfloat16" and EvalSettings().torch_dtype == "float32"
    for bad, match in [
        ({"think_tags": ["<t>", "<t>"]}, "think_tags"),
        ({"max_gen_toks": 256}, "no room"),
        ({"server": {"extra_args": ["--trust-remote-code"]}}, "never passed"),
    ]:
        with pytest.raises(ValueError, match=match):
            EvalSettings(**bad)
    assert EvalSettings(think_tags=None).think_tags is None
