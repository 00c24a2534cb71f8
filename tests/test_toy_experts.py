"""Toy SFT and RLVR experts: held-out problems, the GRPO update, RL that raises the reward,
bf16 checkpoints, reuse by recipe hash, deterministic retraining, and the shipped experts."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from mergeaudit.checkpoint import Checkpoint
from mergeaudit.toy import rl
from mergeaudit.toy.experts import (
    MANIFEST,
    QUICK_RECIPE,
    ExpertRecipe,
    Problems,
    build_expert_family,
    compare_families,
    heldout,
    load_expert_family,
    obtain_expert_family,
    shipped_root,
    train_grpo,
)
from mergeaudit.toy.models import tiny_llama_config
from mergeaudit.toy.tokenizer import build_tokenizer

# Even fewer steps than QUICK_RECIPE: enough to write a whole family twice in a few seconds.
TINY_RECIPE = replace(QUICK_RECIPE, base_steps=20, base_schedule_steps=20, sft_steps=4, rl_steps=4, log_every=2)


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
    reward = train_grpo(
        model, Problems(["add"], 0), steps=3, lr=1e-2, n_prompts=4, group=4, temperature=1.0, max_new_tokens=3, seed=0
    )
    assert reward == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grpo_moves_toward_rewarded_completions(monkeypatch):
    """With a reward that favours completions starting with '1', a few steps raise their probability."""
    monkeypatch.setattr(
        rl, "verify_numeric", lambda text, answer: type("V", (), {"reward": float(text.startswith("1"))})()
    )
    model = tiny_model()
    tok = build_tokenizer()
    prompt = torch.tensor([tok("12+34=")["input_ids"]])
    one = tok.convert_tokens_to_ids("1")

    def p_one() -> float:
        with torch.no_grad():
            return float(torch.softmax(model(input_ids=prompt).logits[0, -1], -1)[one])

    start = p_one()
    rl.train_grpo(
        model, Problems(["add"], 0), steps=5, lr=3e-3, n_prompts=8, group=16, temperature=1.0, max_new_tokens=2, seed=0
    )
    assert p_one() > start


def shipped_family():
    recipe = ExpertRecipe()
    root = shipped_root(recipe)
    assert root is not None, (
        f"no toy experts ship for the current recipe {recipe.digest()}: run `mergeaudit demo "
        "--retrain` and copy .mergeaudit/demo/retrained into mergeaudit/toy/shipped/<hash>"
    )
    family = load_expert_family(str(root), recipe, verify=True)
    assert family is not None, "the shipped experts do not match their manifest's recipe hash or sha256 sums"
    return family


@pytest.mark.slow
def test_quick_rl_on_the_shipped_base_raises_the_reward():
    """A quick GRPO run (40 steps at 5x the recipe's learning rate) from the shipped base raises
    the verifier's mean reward of sampled answers on the held-out addition problems."""
    torch.set_num_threads(1)
    base = LlamaForCausalLM.from_pretrained(shipped_family().base, dtype=torch.float32).eval()
    held = [(r["question"], r["answer"]) for r in rl.heldout_rows("add")]
    before = rl.sampled_reward(base, held, group=8, temperature=1.0, seed=1)
    model = copy.deepcopy(base)
    rl.train_grpo(
        model, Problems(["add"], 7), steps=40, lr=1e-5, n_prompts=16, group=8, temperature=1.0, max_new_tokens=4, seed=7
    )
    after = rl.sampled_reward(model, held, group=8, temperature=1.0, seed=1)
    assert after > before + 0.03, (before, after)


def test_shipped_experts_are_the_current_recipe_and_learned():
    """The experts that ship are keyed by the code's recipe hash, are small bf16 safetensors
    checkpoints (no pickles), and each expert beats the base by 0.10 on its own skill."""
    family = shipped_family()
    root = Path(family.root)
    assert root.name == ExpertRecipe().digest() == family.digest
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors"}
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
    for uri in [family.base, *(e.uri for e in family.experts.values())]:
        ck = Checkpoint.open(uri)
        assert {ck.spec(n).dtype for n in ck.keys()} == {"BF16"}
    assert {(e.kind, e.skill) for e in family.experts.values()} == {
        (k, s) for k in ("sft", "rlvr") for s in ("add", "sub")
    }
    torch.set_num_threads(1)

    def accuracy(uri: str, skill: str) -> float:
        return rl.greedy_accuracy(LlamaForCausalLM.from_pretrained(uri, dtype=torch.float32).eval(), skill)

    for name, expert in family.experts.items():
        base_acc, acc = accuracy(family.base, expert.skill), accuracy(expert.uri, expert.skill)
        assert acc - base_acc >= 0.10, (name, base_acc, acc)
        assert acc == pytest.approx(family.log[name][f"acc_{expert.skill}"])  # the manifest's log is what ships


@pytest.mark.slow
def test_family_is_bf16_reused_by_recipe_and_retrains_bit_identically(tmp_path):
    messages = []
    fam = build_expert_family(str(tmp_path / "a"), TINY_RECIPE, progress=messages.append)
    assert set(fam.experts) == {"sft_add", "rl_add", "sft_sub", "rl_sub"}
    for uri in [fam.base, *(e.uri for e in fam.experts.values())]:
        ck = Checkpoint.open(uri)
        assert {ck.spec(n).dtype for n in ck.keys()} == {"BF16"}
    assert fam.log["rl_add"]["steps"] == TINY_RECIPE.rl_steps and fam.log["rl_add"]["curve"]
    again = build_expert_family(str(tmp_path / "a"), TINY_RECIPE, progress=messages.append)
    assert "reusing" in messages[-1] and again.experts == fam.experts
    other = replace(TINY_RECIPE, rl_steps=TINY_RECIPE.rl_steps + 1)
    assert other.digest() != TINY_RECIPE.digest()
    assert load_expert_family(str(tmp_path / "a"), other) is None

    twin = build_expert_family(str(tmp_path / "b"), TINY_RECIPE, progress=messages.append)
    assert twin.files == fam.files  # same sha256 for every file: deterministic on one machine
    assert all("identical" in line for line in compare_families(fam, twin))
    weights = Path(twin.experts["rl_add"].uri) / "model.safetensors"
    ck = Checkpoint.open(twin.experts["rl_add"].uri)
    name = next(n for n in ck.keys() if "mlp.up_proj" in n)
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    offset = 8 + header_len + json.loads(weights.read_bytes()[8 : 8 + header_len])[name]["data_offsets"][0]
    data = bytearray(weights.read_bytes())
    data[offset + 1] ^= 0x01  # one bf16 entry's high byte: a different value
    weights.write_bytes(bytes(data))
    lines = compare_families(fam, twin)
    assert any(line.startswith("  rl_add: DIFFERS") and "in 1 of" in line for line in lines), lines
    assert sum("identical" in line for line in lines) == 4


def test_shipped_experts_are_copied_verified_and_reused(tmp_path):
    messages = []
    family = obtain_expert_family(str(tmp_path / "ck"), ExpertRecipe(), progress=messages.append)
    assert "shipped" in messages[-1] and family.files == shipped_family().files
    root = tmp_path / "ck" / ExpertRecipe().digest()
    for model, names in family.files.items():
        for name, digest in names.items():
            assert hashlib.sha256((root / model / name).read_bytes()).hexdigest() == digest
    again = obtain_expert_family(str(tmp_path / "ck"), ExpertRecipe(), progress=messages.append)
    assert "reusing" in messages[-1] and again.experts == family.experts
    assert (root / MANIFEST).is_file()
    # a copy made later elsewhere has the same fingerprints, which key DARE's masks and the probes
    time.sleep(0.05)
    other = obtain_expert_family(str(tmp_path / "elsewhere"), ExpertRecipe(), progress=messages.append)

    def fingerprints(fam) -> dict[str, str]:
        uris = {"base": fam.base, **{n: e.uri for n, e in fam.experts.items()}}
        return {n: Checkpoint.open(u).fingerprint for n, u in uris.items()}

    assert len(set(fingerprints(family).values())) == 5  # the experts' files have the same names and sizes
    assert fingerprints(other) == fingerprints(family)
