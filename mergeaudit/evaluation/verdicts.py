"""Verdicts on every sampled completion of a task, and the scores they add up to.

Each completion of lm-eval's logged samples gets one outcome:
- truncated: the generation used its whole token budget (`max_gen_toks`) without stopping;
  scored wrong, never verified (a cut-off reasoning trace has not committed to an answer);
- no_answer: a reasoning trace that never closed, or nothing the verifier could extract;
- correct / wrong: the verifier's verdict on the text after the reasoning trace;
- timeout / error / violation: the verifier could not decide (a timeout scores 0 but is
  counted apart, never as a plain wrong answer), or a program forged its verdict.

Score rows (filter `verifier`), the prompt as the unit (mean per prompt, then mean and standard
error across prompts, n = prompts; mergeaudit.results.stats states the formulas):
- the verifier's reward (`numeric_match`, `math_verify`, `code_pass`) and `avg@n`, the mean
  accuracy over the n samples of each prompt (the same number, named as RLVR papers report it);
- `pass@k` by the unbiased estimator, for each k <= n;
- `format_rate`, `truncation_rate`, `completion_tokens` and `trace_tokens` (mean per prompt);
- counts over samples (n = samples): `outcome_<outcome>` for every outcome, plus
  `verifier_errors`, `verifier_timeouts` and, for code, `code_violations`.

Sample rows carry the prompt hash, completion, extracted answer, outcome (`status`), reward,
`truncated`, `completion_tokens` and `trace_tokens`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mergeaudit.evaluation.generation import GenerationInfo
from mergeaudit.evaluation.prompting import split_trace
from mergeaudit.evaluation.verifiers import STATUSES, Verdict, Verifier, check_format, extract_answer
from mergeaudit.results.stats import pass_at_k, prompt_mean_stderr

REWARD_METRIC = {"numeric": "numeric_match", "math": "math_verify", "code": "code_pass"}
_FENCE_RE = re.compile(r"```[A-Za-z0-9_+-]*\n(.*?)(?:```|$)", re.S)


def code_answer(answer: str) -> tuple[str, bool]:
    """In chat mode a model answers code problems with a fenced block: (its last block, True),
    else (the text, False)."""
    blocks = _FENCE_RE.findall(answer)
    return (blocks[-1], True) if blocks else (answer, False)


def judge(
    verifier: Verifier,
    kind: str,
    completion: str,
    reference: str,
    answer_format: str | None,
    prefix: str,
    info: GenerationInfo | None,
    think_tags: tuple[str, str] | None,
) -> tuple[Verdict, str, bool]:
    """(verdict, trace, truncated) of one completion."""
    trace, answer, _ = split_trace(completion, think_tags)
    truncated = bool(info and info.truncated)
    fmt = check_format(answer or "", answer_format)  # what the format rate counts, verified or not
    if truncated:
        return (
            Verdict(
                False, extract_answer(answer) if answer and kind != "code" else None, format_ok=fmt, status="truncated"
            ),
            trace,
            True,
        )
    if answer is None:
        return Verdict(False, None, format_ok=fmt, status="no_answer"), trace, False
    if kind == "code":
        answer, fenced = code_answer(answer)
        if fenced:  # the block restates the whole function after the prompt's stub
            prefix += "\n"
    return verifier.verify(kind, answer, reference, answer_format, prefix), trace, False


def verify_samples(
    task,
    logged: list[dict],
    verifier: Verifier,
    pass_k: tuple[int, ...],
    generation_info: dict[str, GenerationInfo] | None = None,
    count_tokens: Callable[[str], int] | None = None,
    think_tags: tuple[str, str] | None = ("<think>", "</think>"),
    num_samples: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """Verdicts on every completion of a task (a runner.TaskSource), and the aggregate score rows."""
    if task.verifier is None:
        return [], []
    info_of = generation_info or {}
    samples: list[dict] = []
    per_prompt: dict[str, list[list[float]]] = {k: [] for k in ("reward", "format", "truncated", "tokens", "trace")}
    per_doc: list[tuple[int, int]] = []
    for entry in logged:
        completions = [str(c) for c in (entry.get("resps") or [[]])[0]]
        reference = str(entry.get("target"))
        prefix = str(entry["doc"].get(task.program_prefix, "")) if task.program_prefix else ""
        for values in per_prompt.values():
            values.append([])
        correct = 0
        for i, completion in enumerate(completions):
            info = info_of.get(completion)
            v, trace, truncated = judge(
                verifier, task.verifier, completion, reference, task.answer_format, prefix, info, think_tags
            )
            tokens = (
                info.tokens
                if info and info.tokens is not None
                else (count_tokens(completion) if count_tokens else None)
            )
            trace_tokens = count_tokens(trace) if count_tokens and trace else 0 if count_tokens else None
            correct += v.correct
            per_prompt["reward"][-1].append(v.reward)
            per_prompt["truncated"][-1].append(1.0 if truncated else 0.0)
            if v.format_ok is not None:
                per_prompt["format"][-1].append(1.0 if v.format_ok else 0.0)
            if tokens is not None:
                per_prompt["tokens"][-1].append(float(tokens))
                per_prompt["trace"][-1].append(float(trace_tokens or 0))
            samples.append(
                {
                    "task": task.name,
                    "doc_id": int(entry["doc_id"]),
                    "sample": i,
                    "prompt_hash": entry.get("prompt_hash"),
                    "completion": completion,
                    "extracted": v.extracted,
                    "verdict": v.correct,
                    "reward": v.reward,
                    "format_ok": v.format_ok,
                    "error": v.error,
                    "verifier": task.verifier,
                    "status": v.status,
                    "truncated": truncated,
                    "completion_tokens": tokens,
                    "trace_tokens": trace_tokens,
                }
            )
        per_doc.append((len(completions), correct))
    if not samples:
        return [], []
    return samples, score_rows(task, samples, per_prompt, per_doc, pass_k, num_samples)


def score_rows(
    task,
    samples: list[dict],
    per_prompt: dict[str, list[list[float]]],
    per_doc: list[tuple[int, int]],
    pass_k: tuple[int, ...],
    num_samples: int | None,
) -> list[dict]:
    scores: list[dict] = []

    def row(name: str, values: list[list[float]]) -> None:
        values = [xs for xs in values if xs]
        if values:
            mean, stderr = prompt_mean_stderr(values)
            scores.append(
                {
                    "task": task.name,
                    "metric": name,
                    "filter": "verifier",
                    "value": mean,
                    "stderr": stderr,
                    "n": len(values),
                }
            )

    def count(name: str, value: int) -> None:
        scores.append(
            {
                "task": task.name,
                "metric": name,
                "filter": "verifier",
                "value": float(value),
                "stderr": None,
                "n": len(samples),
            }
        )

    row(REWARD_METRIC[task.verifier], per_prompt["reward"])
    n = num_samples or max(n for n, _ in per_doc)
    row(f"avg@{n}", per_prompt["reward"])
    for k in pass_k:
        if all(m >= k for m, _ in per_doc):  # pass@k of a prompt with fewer than k samples is undefined
            row(f"pass@{k}", [[pass_at_k(m, c, k)] for m, c in per_doc])
    row("format_rate", per_prompt["format"])
    row("truncation_rate", per_prompt["truncated"])
    row("completion_tokens", per_prompt["tokens"])
    row("trace_tokens", per_prompt["trace"])
    statuses = [s["status"] for s in samples]
    for outcome in STATUSES:
        if outcome != "violation" or task.verifier == "code":
            count(f"outcome_{outcome}", statuses.count(outcome))
    count("verifier_errors", sum(s["error"] is not None for s in samples))
    count("verifier_timeouts", statuses.count("timeout"))
    if task.verifier == "code":
        count("code_violations", statuses.count("violation"))
    return scores
