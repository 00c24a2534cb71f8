"""Toy SFT and RLVR experts from one base, trained on the CPU, deterministically.

The demo's family, written in bf16 as real releases are:
  base        a tiny Llama trained on a mix of verifiable arithmetic skills (2-digit + and -)
  sft_<skill> dense supervised fine-tuning of the base on one skill (teacher-forced answers)
  rl_<skill>  on-policy policy gradient on one skill with GRPO-style group baselines: for each
              prompt a group of completions is sampled, the numeric verifier scores them
              (reward 1 or 0), and each completion's advantage is its reward minus the group's
              mean over the group's standard deviation; groups that all agree carry no signal.
The shipped test problems (`mergeaudit_add2`, `mergeaudit_sub2`) are never trained on.

Everything that determines the bytes is in the recipe; `build_expert_family` reuses a family
under the same root whose recipe hash matches, so a second demo trains nothing.

    family = build_expert_family(".mergeaudit/demo/checkpoints")
    family.experts  # {"sft_add": ExpertInfo(uri, kind="sft", skill="add"), ...}
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint
from mergeaudit.errors import CheckpointError
from mergeaudit.evaluation.verifiers import verify_numeric
from mergeaudit.toy.models import tiny_llama_config
from mergeaudit.toy.tokenizer import build_tokenizer
from mergeaudit.toy.train import Problems, adamw, heldout, train_supervised

__all__ = ["ExpertFamily", "ExpertInfo", "ExpertRecipe", "Problems", "QUICK_RECIPE", "build_expert_family",
           "heldout", "load_expert_family", "train_grpo", "train_supervised"]
MANIFEST = "expert_family.json"


@dataclass(frozen=True)
class ExpertRecipe:
    """Everything that determines the family's bytes (and its cache key)."""

    skills: tuple[str, ...] = ("add", "sub")
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    base_steps: int = 1200
    base_lr: float = 3e-3
    batch_size: int = 64
    sft_steps: int = 300
    sft_lr: float = 3e-4
    rl_steps: int = 400
    rl_lr: float = 3e-5
    rl_prompts: int = 16
    rl_group: int = 8
    rl_temperature: float = 1.0
    max_new_tokens: int = 5

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ExpertInfo:
    uri: str
    kind: str  # sft | rlvr
    skill: str


@dataclass
class ExpertFamily:
    root: str
    base: str
    experts: dict[str, ExpertInfo]
    recipe: dict
    log: dict = field(default_factory=dict)  # per model: steps, seconds, final loss / reward


# -- reinforcement learning ------------------------------------------------------------------


@torch.no_grad()
def sample_completions(model: LlamaForCausalLM, prompt_ids: torch.Tensor, max_new_tokens: int,
                       temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Sampled continuations (batch x max_new_tokens) of equal-length prompts, with a KV cache."""
    out = model(input_ids=prompt_ids, use_cache=True)
    cache, logits = out.cache, out.logits[:, -1]
    tokens = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        tokens.append(nxt)
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(tokens, dim=1)


def train_grpo(model: LlamaForCausalLM, problems: Problems, steps: int, lr: float, n_prompts: int, group: int,
               temperature: float, max_new_tokens: int, seed: int) -> float:
    """On-policy policy gradient with group-normalised advantages and the numeric verifier as
    the reward; returns the mean reward over the last 20 steps."""
    tok = build_tokenizer()
    newline = tok.convert_tokens_to_ids("\n")
    opt = adamw(model, lr)
    gen = torch.Generator().manual_seed(seed)
    rewards_seen = []
    for _ in range(steps):
        batch = [problems.sample() for _ in range(n_prompts)]
        prompts = torch.tensor([tok(q)["input_ids"] for q, _ in batch]).repeat_interleave(group, dim=0)
        model.eval()
        completions = sample_completions(model, prompts, max_new_tokens, temperature, gen)
        # tokens up to and including the first newline are the completion; the rest is ignored
        is_nl = completions == newline
        after = (is_nl.cumsum(dim=1) - is_nl.long()) > 0
        mask = (~after).float()
        texts = tok.batch_decode(completions.masked_fill(after, tok.pad_token_id), skip_special_tokens=True)
        answers = [a for _, a in batch for _ in range(group)]
        rewards = torch.tensor([verify_numeric(t.split("\n")[0], a).reward for t, a in zip(texts, answers)])
        grouped = rewards.view(n_prompts, group)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        rewards_seen.append(float(rewards.mean()))
        if not adv.abs().sum():
            continue  # every group agreed: no signal this step
        model.train()
        seq = torch.cat([prompts, completions], dim=1)
        logits = model(input_ids=seq).logits[:, prompts.shape[1] - 1: -1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        loss = -((logp * mask).sum(1) * adv).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    tail = rewards_seen[-20:]
    return sum(tail) / max(len(tail), 1)


@torch.no_grad()
def greedy_accuracy(model: LlamaForCausalLM, skill: str, limit: int = 100) -> float:
    """Greedy exact answers on the shipped test problems of a skill (a quick training check)."""
    tok = build_tokenizer()
    name = {"add": "add2.jsonl", "sub": "sub2.jsonl"}[skill]
    rows = [json.loads(line) for line in resources.files("mergeaudit.evaluation").joinpath(
        "tasks", "arithmetic", name).read_text().splitlines() if line.strip()][:limit]
    prompts = torch.tensor([tok(r["question"])["input_ids"] for r in rows])
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, prompts.shape[1]:], skip_special_tokens=True)
    return sum(verify_numeric(t.split("\n")[0], r["answer"]).reward for t, r in zip(texts, rows)) / len(rows)


def _bf16_roundtrip(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The model as a bf16 release would load it (training continues in fp32 from there)."""
    return model.to(torch.bfloat16).to(torch.float32)


def _save(model: LlamaForCausalLM, uri: str) -> str:
    tok = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            store.write_bytes(store.join(uri, path.name), path.read_bytes())
    return uri


def build_expert_family(root: str, recipe: ExpertRecipe | None = None, progress=print) -> ExpertFamily:
    """Train (or reuse, for the same recipe) base, SFT and RLVR experts under root."""
    recipe = recipe or ExpertRecipe()
    root = store.check_uri(root)
    found = load_expert_family(root, recipe)
    if found is not None:
        progress(f"reusing the toy experts in {root} (recipe {recipe.digest()})")
        return found
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread, and deterministically
    try:
        return _build(root, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _build(root: str, recipe: ExpertRecipe, progress) -> ExpertFamily:
    torch.manual_seed(recipe.seed)
    tok = build_tokenizer()
    config = tiny_llama_config(len(tok), hidden=recipe.hidden, layers=recipe.layers)
    log: dict[str, dict] = {}
    t0 = time.perf_counter()
    base = LlamaForCausalLM(config)
    loss = train_supervised(base, Problems(recipe.skills, recipe.seed), recipe.base_steps, recipe.base_lr,
                            recipe.batch_size, one_cycle=True)
    base = _bf16_roundtrip(base)
    log["base"] = {"kind": "base", "steps": recipe.base_steps, "seconds": time.perf_counter() - t0, "loss": loss,
                   **{f"acc_{s}": greedy_accuracy(base, s) for s in recipe.skills}}
    progress(f"  base: {recipe.base_steps} steps on {'+'.join(recipe.skills)} in {log['base']['seconds']:.0f} s")
    base_uri = _save(base, store.join(root, "base"))
    experts: dict[str, ExpertInfo] = {}
    for k, skill in enumerate(recipe.skills):
        t0 = time.perf_counter()
        torch.manual_seed(recipe.seed + 100 + k)
        sft = copy.deepcopy(base)
        loss = train_supervised(sft, Problems([skill], recipe.seed + 100 + k), recipe.sft_steps, recipe.sft_lr,
                                recipe.batch_size, one_cycle=False)
        name = f"sft_{skill}"
        log[name] = {"kind": "sft", "steps": recipe.sft_steps, "seconds": time.perf_counter() - t0, "loss": loss}
        experts[name] = ExpertInfo(_save(sft, store.join(root, name)), "sft", skill)
        progress(f"  {name}: {recipe.sft_steps} SFT steps in {log[name]['seconds']:.0f} s")
        t0 = time.perf_counter()
        torch.manual_seed(recipe.seed + 200 + k)
        rl = copy.deepcopy(base)
        reward = train_grpo(rl, Problems([skill], recipe.seed + 200 + k), recipe.rl_steps, recipe.rl_lr,
                            recipe.rl_prompts, recipe.rl_group, recipe.rl_temperature, recipe.max_new_tokens,
                            seed=recipe.seed + 200 + k)
        name = f"rl_{skill}"
        log[name] = {"kind": "rlvr", "steps": recipe.rl_steps, "seconds": time.perf_counter() - t0,
                     "reward": reward}
        experts[name] = ExpertInfo(_save(rl, store.join(root, name)), "rlvr", skill)
        progress(f"  {name}: {recipe.rl_steps} GRPO steps in {log[name]['seconds']:.0f} s "
                 f"(mean reward of the last steps {reward:.2f})")
    family = ExpertFamily(root=root, base=base_uri, experts=experts, recipe={**asdict(recipe), "hash": recipe.digest()},
                          log=log)
    doc = {**asdict(family), "experts": {n: asdict(e) for n, e in experts.items()}}
    store.write_bytes(store.join(root, MANIFEST), json.dumps(doc, indent=1, default=list).encode())
    return family


def load_expert_family(root: str, recipe: ExpertRecipe) -> ExpertFamily | None:
    """The family under root when it was built from this recipe and every checkpoint opens."""
    manifest = store.join(store.check_uri(root), MANIFEST)
    if not store.exists(manifest):
        return None
    doc = json.loads(store.read_bytes(manifest))
    if doc.get("recipe", {}).get("hash") != recipe.digest():
        return None
    family = ExpertFamily(root=doc["root"], base=doc["base"],
                          experts={n: ExpertInfo(**e) for n, e in doc["experts"].items()},
                          recipe=doc["recipe"], log=doc.get("log", {}))
    try:
        for uri in [family.base, *(e.uri for e in family.experts.values())]:
            Checkpoint.open(uri)
    except CheckpointError:
        return None
    return family


def total_training_seconds(family: ExpertFamily) -> float:
    return math.fsum(entry.get("seconds", 0.0) for entry in family.log.values())


# A few steps of everything: for tests of the demo's plumbing (the verdict means little).
QUICK_RECIPE = ExpertRecipe(base_steps=150, sft_steps=20, rl_steps=10, rl_prompts=8, rl_group=4)
