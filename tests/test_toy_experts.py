"""Toy SFT and RLVR experts: held-out problems, the GRPO update, bf16 checkpoints, reuse by
recipe hash, and the demo end to end (quick recipe)."""

from __future__ import annotations

import copy
import subprocess
import sys

import torch
from transformers import LlamaForCausalLM

from mergeaudit.checkpoint import Checkpoint
from mergeaudit.toy.experts import (
    QUICK_RECIPE,
    ExpertRecipe,
    Problems,
    build_expert_family,
    heldout,
    train_grpo,
)
from mergeaudit.toy.models import tiny_llama_config
from mergeaudit.toy.tokenizer import build_tokenizer


def test_training_never_sees_the_test_problems():
    problems = Problems(["add", "sub"], seed=0)
    seen = {problems.sample()[0] for _ in range(20000)}
    assert seen.isdisjoint(heldout("add") | heldout("sub"))
    assert any("+" in q for q in seen) and any("-" in q for q in seen)
    q, a = Problems(["sub"], seed=1).sample()
    left, right = q.rstrip("=").split("-")
    assert int(left) - int(right) == int(a) >= 0


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(build_tokenizer()), hidden=32, layers=1))


def test_grpo_updates_only_on_group_disagreement():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    # an untrained model never answers right: every group agrees on reward 0, no signal
    reward = train_grpo(model, Problems(["add"], 0), steps=3, lr=1e-2, n_prompts=4, group=4, temperature=1.0,
                        max_new_tokens=3, seed=0)
    assert reward == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grpo_moves_toward_rewarded_completions(monkeypatch):
    """With a reward that favours completions starting with '1', one step raises their probability."""
    from mergeaudit.toy import experts

    monkeypatch.setattr(experts, "verify_numeric",
                        lambda text, answer: type("V", (), {"reward": float(text.startswith("1"))})())
    model = tiny_model()
    tok = build_tokenizer()
    prompt = torch.tensor([tok("12+34=")["input_ids"]])
    one = tok.convert_tokens_to_ids("1")

    def p_one() -> float:
        with torch.no_grad():
            return float(torch.softmax(model(input_ids=prompt).logits[0, -1], -1)[one])

    start = p_one()
    experts.train_grpo(model, Problems(["add"], 0), steps=5, lr=3e-3, n_prompts=8, group=16, temperature=1.0,
                       max_new_tokens=2, seed=0)
    assert p_one() > start


def test_family_is_bf16_and_reused_by_recipe(tmp_path):
    messages = []
    fam = build_expert_family(str(tmp_path / "f"), QUICK_RECIPE, progress=messages.append)
    assert set(fam.experts) == {"sft_add", "rl_add", "sft_sub", "rl_sub"}
    assert {e.kind for e in fam.experts.values()} == {"sft", "rlvr"}
    for uri in [fam.base, *(e.uri for e in fam.experts.values())]:
        ck = Checkpoint.open(uri)
        assert {ck.spec(n).dtype for n in ck.keys()} == {"BF16"}
    assert fam.log["rl_add"]["steps"] == QUICK_RECIPE.rl_steps
    again = build_expert_family(str(tmp_path / "f"), QUICK_RECIPE, progress=messages.append)
    assert "reusing" in messages[-1] and again.experts == fam.experts
    other = ExpertRecipe(**{**QUICK_RECIPE.__dict__, "rl_steps": QUICK_RECIPE.rl_steps + 1})
    assert other.digest() != QUICK_RECIPE.digest()


def test_demo_end_to_end_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mergeaudit.cli", "demo", "--workdir", str(tmp_path / "demo"),
                          "--quick", "--limit", "4"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for expected in ("Verdict", "SFT pair", "RLVR pair", "bf16 sparsity", "overlap lift", "best merge of each pair",
                     "sar(rl_add+rl_sub)", "report:"):
        assert expected in out.stdout, expected
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "Verdict" in page and "plot-sparsity-rl-add" in page and "plot-probe-interpolation" in page
