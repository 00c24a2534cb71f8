"""Toy SFT and RLVR experts from one base, trained on the CPU, deterministically, and shipped.

The demo's family, written in bf16 as real releases are:
  base        a tiny Llama pretrained on a mix of verifiable arithmetic skills (2-digit + and -):
              an intermediate checkpoint (`base_steps` of a one-cycle run planned for
              `base_schedule_steps`), where both skills are half formed: greedy answers are often
              wrong while the right one is among a few samples (pass@8 >> pass@1)
  sft_<skill> supervised fine-tuning of the base on one skill (teacher-forced correct answers)
  rl_<skill>  on-policy GRPO on one skill (mergeaudit.toy.rl): sampled groups, the numeric
              verifier's reward, group-normalised advantages
Both fine-tunes keep fp32 master weights for AdamW (as training frameworks do) and are released
in bf16. The learning rates follow practice relative to the weights: RLVR runs use about 1e-6 on
weights of typical magnitude 1e-2 (an AdamW step of ~1e-4 of a weight, far below bf16's relative
resolution of 2^-8); the toy's weights are larger (median |w| ~0.035), so `rl_lr` = 2e-6 keeps
the step/weight ratio, and SFT uses 10x that, as SFT recipes do. The shipped test problems
(`mergeaudit_add2`, `mergeaudit_sub2`) are never trained on.

The log records, per model, greedy accuracy on both test sets (of the bf16 release), the bf16
update sparsity (share of entries bit-identical to the base after the bf16 cast, over all
entries and averaged over tensors), the share of fp32 master entries the optimiser moved at
all, the median |w| of changed and unchanged entries, and a curve every `log_every` steps.

Everything that determines the bytes is in the recipe (bump `version` when the training code
changes what a recipe produces). Trained families ship with the package under
`mergeaudit/toy/shipped/<recipe hash>/` (safetensors, config and tokenizer files, and a manifest
with each file's sha256), so every machine audits the same checkpoints:

    family = obtain_expert_family(".mergeaudit/demo/checkpoints")       # shipped, or reused, in <hash>/
    family = build_expert_family("/tmp/fam", ExpertRecipe())             # trains (~3 min)
    compare_families(shipped, family)                                    # lines: same or not
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint
from mergeaudit.errors import CheckpointError
from mergeaudit.toy.models import tiny_llama_config
from mergeaudit.toy.rl import greedy_accuracy, sample_completions, train_grpo
from mergeaudit.toy.tokenizer import build_tokenizer
from mergeaudit.toy.train import Problems, heldout, train_supervised

__all__ = [
    "ExpertFamily",
    "ExpertInfo",
    "ExpertRecipe",
    "Problems",
    "QUICK_RECIPE",
    "build_expert_family",
    "compare_families",
    "heldout",
    "load_expert_family",
    "obtain_expert_family",
    "sample_completions",
    "shipped_root",
    "train_grpo",
    "train_supervised",
]
MANIFEST = "expert_family.json"
SHIPPED = "shipped"
# The files of a family written or copied here get an mtime derived from their model's weights:
# a checkpoint's fingerprint (names, sizes and mtimes of its files) is its id in an audit and
# keys the randomness of DARE masks and perturbation probes, so copies made at different times
# would draw different masks (and print different verdicts for the same bytes), while one mtime
# for all would make the experts, whose files have the same names and sizes, one checkpoint.
FAMILY_MTIME = 1767225600  # 2026-01-01T00:00:00Z, plus up to a year from the weights' sha256


@dataclass(frozen=True)
class ExpertRecipe:
    """Everything that determines the family's bytes (and its cache key)."""

    version: int = 2  # of the training code: bump when it changes what a recipe produces
    skills: tuple[str, ...] = ("add", "sub")
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    base_steps: int = 1250
    base_schedule_steps: int = 3000
    base_lr: float = 3e-3
    batch_size: int = 64
    sft_steps: int = 300
    sft_lr: float = 2e-5
    rl_steps: int = 300
    rl_lr: float = 2e-6
    rl_prompts: int = 16
    rl_group: int = 8
    rl_temperature: float = 1.0
    max_new_tokens: int = 4
    log_every: int = 50

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
    log: dict = field(default_factory=dict)  # per model: steps, seconds, accuracies, sparsity, curve
    files: dict = field(default_factory=dict)  # per model: file name -> sha256

    @property
    def digest(self) -> str:
        return self.recipe.get("hash", "")


# -- what an update did to the weights ---------------------------------------------------------


class UpdateTracker:
    """bf16 sparsity of a model's update against its (bf16) base, along training and at the end."""

    def __init__(self, base: LlamaForCausalLM, every: int):
        self.start = {k: v.detach().clone() for k, v in base.state_dict().items()}  # fp32, bf16-exact
        self.every = every
        self.curve: list[list[float]] = []
        self.signal: list[float] = []  # per step, RL only: share of groups whose rewards differ

    def changed(self, model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().to(torch.bfloat16) != self.start[k].to(torch.bfloat16) for k, v in model.state_dict().items()
        }

    def sparsity(self, model: LlamaForCausalLM) -> tuple[float, float]:
        """(share of all entries unchanged in bf16, mean over tensors of that share)."""
        masks = self.changed(model)
        total = sum(m.numel() for m in masks.values())
        share = 1 - sum(int(m.sum()) for m in masks.values()) / total
        return share, sum(1 - float(m.float().mean()) for m in masks.values()) / len(masks)

    def __call__(self, step: int, model: LlamaForCausalLM, value: float, signal: float | None = None) -> None:
        if signal is not None:
            self.signal.append(signal)
        if step % self.every == 0:
            share, per_tensor = self.sparsity(model)
            point = [step, round(share, 4), round(per_tensor, 4), round(value, 4)]
            self.curve.append(point + ([round(signal, 3)] if signal is not None else []))

    def summary(self, model: LlamaForCausalLM) -> dict:
        masks = self.changed(model)
        state = model.state_dict()
        moved = sum(int((state[k].detach() != self.start[k]).sum()) for k in masks)
        total = sum(m.numel() for m in masks.values())
        matrices = [k for k, v in self.start.items() if v.ndim == 2]
        w = torch.cat([self.start[k].abs().flatten() for k in matrices])
        hit = torch.cat([masks[k].flatten() for k in matrices])
        share, per_tensor = self.sparsity(model)
        return {
            "sparsity_bf16": round(share, 4),
            "sparsity_bf16_tensor_mean": round(per_tensor, 4),
            "fp32_moved": round(moved / total, 4),
            "median_abs_w_changed": round(float(w[hit].median()), 5) if hit.any() else None,
            "median_abs_w_unchanged": round(float(w[~hit].median()), 5) if (~hit).any() else None,
            "curve": self.curve,
        }


def _accuracies(model: LlamaForCausalLM, skills) -> dict[str, float]:
    """Greedy accuracy of the model as released (bf16 weights), per skill."""
    released = copy.deepcopy(model).to(torch.bfloat16).to(torch.float32).eval()
    return {f"acc_{s}": greedy_accuracy(released, s) for s in skills}


def _median_abs_weight(model: LlamaForCausalLM) -> float:
    return float(torch.cat([p.detach().abs().flatten() for p in model.parameters() if p.ndim == 2]).median())


# -- building, saving, loading -------------------------------------------------------------------


def _save(model: LlamaForCausalLM, uri: str) -> dict[str, str]:
    """Write the model in bf16 with the toy tokenizer; returns file name -> sha256."""
    tok = build_tokenizer()
    files = {}
    bars = hf_logging.is_progress_bar_enabled()
    with tempfile.TemporaryDirectory() as tmp:
        hf_logging.disable_progress_bar()  # "Writing model shards" bars, once per checkpoint
        try:
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tok.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            data = path.read_bytes()
            store.write_bytes(store.join(uri, path.name), data)
            files[path.name] = hashlib.sha256(data).hexdigest()
    return files


def build_expert_family(
    root: str, recipe: ExpertRecipe | None = None, progress=print, reuse: bool = True
) -> ExpertFamily:
    """Train base, SFT and RLVR experts under root (or reuse a family of the same recipe there)."""
    recipe = recipe or ExpertRecipe()
    root = store.check_uri(root)
    found = load_expert_family(root, recipe) if reuse else None
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
    files: dict[str, dict] = {}
    t0 = time.perf_counter()
    base = LlamaForCausalLM(config)
    loss = train_supervised(
        base,
        Problems(recipe.skills, recipe.seed),
        recipe.base_steps,
        recipe.base_lr,
        recipe.batch_size,
        one_cycle=True,
        schedule_steps=recipe.base_schedule_steps,
    )
    base = base.to(torch.bfloat16).to(torch.float32).eval()  # the release; fine-tunes start from it
    log["base"] = {
        "kind": "base",
        "steps": recipe.base_steps,
        "seconds": time.perf_counter() - t0,
        "loss": loss,
        "median_abs_w": round(_median_abs_weight(base), 5),
        **_accuracies(base, recipe.skills),
    }
    greedy = ", ".join(f"{s} {log['base']['acc_' + s]:.2f}" for s in recipe.skills)
    progress(
        f"  base: {recipe.base_steps} steps on {'+'.join(recipe.skills)} in {log['base']['seconds']:.0f} s "
        f"(greedy {greedy})"
    )
    files["base"] = _save(base, store.join(root, "base"))
    experts: dict[str, ExpertInfo] = {}
    for k, skill in enumerate(recipe.skills):
        for kind in ("sft", "rlvr"):
            name, entry, model = _train_expert(base, recipe, skill, k, kind)
            log[name] = entry
            files[name] = _save(model, store.join(root, name))
            experts[name] = ExpertInfo(store.join(root, name), kind, skill)
            gain = entry[f"acc_{skill}"] - log["base"][f"acc_{skill}"]
            progress(
                f"  {name}: {entry['steps']} {'SFT' if kind == 'sft' else 'GRPO'} steps in "
                f"{entry['seconds']:.0f} s (greedy {skill} {entry[f'acc_{skill}']:.2f}, {gain:+.2f} over the "
                f"base; bf16 sparsity {entry['sparsity_bf16']:.2f})"
            )
    family = ExpertFamily(
        root=root,
        base=store.join(root, "base"),
        experts=experts,
        recipe={**asdict(recipe), "hash": recipe.digest()},
        log=log,
        files=files,
    )
    doc = {
        "recipe": family.recipe,
        "log": log,
        "files": files,
        "experts": {n: {"kind": e.kind, "skill": e.skill} for n, e in experts.items()},
    }
    store.write_bytes(store.join(root, MANIFEST), json.dumps(doc, indent=1, default=list).encode())
    _stamp(root, files)
    return family


def _train_expert(
    base: LlamaForCausalLM, recipe: ExpertRecipe, skill: str, k: int, kind: str
) -> tuple[str, dict, LlamaForCausalLM]:
    t0 = time.perf_counter()
    seed = recipe.seed + (100 if kind == "sft" else 200) + k
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    tracker = UpdateTracker(base, recipe.log_every)
    if kind == "sft":
        name, steps, lr = f"sft_{skill}", recipe.sft_steps, recipe.sft_lr
        final = {
            "loss": train_supervised(
                model, Problems([skill], seed), steps, lr, recipe.batch_size, one_cycle=False, on_step=tracker
            )
        }
    else:
        name, steps, lr = f"rl_{skill}", recipe.rl_steps, recipe.rl_lr
        final = {
            "reward": train_grpo(
                model,
                Problems([skill], seed),
                steps,
                lr,
                recipe.rl_prompts,
                recipe.rl_group,
                recipe.rl_temperature,
                recipe.max_new_tokens,
                seed=seed,
                on_step=tracker,
            )
        }
        final["groups_with_signal"] = round(sum(tracker.signal) / len(tracker.signal), 3) if tracker.signal else None
    seconds = time.perf_counter() - t0
    entry = {
        "kind": kind,
        "skill": skill,
        "steps": steps,
        "lr": lr,
        "seconds": seconds,
        **final,
        **_accuracies(model, recipe.skills),
        **tracker.summary(model),
    }
    return name, entry, model


def _stamp(root: str, files: dict[str, dict[str, str]]) -> None:
    """Give the files of each model of a family on a local disk an mtime that depends only on
    the model's weights (its model.safetensors sha256); the manifest gets FAMILY_MTIME."""
    if store.split_scheme(root)[0] != "file":
        return  # object stores version objects by ETag, which mtimes do not enter
    folder = Path(store.split_scheme(root)[1])
    for model, names in files.items():
        digest = names.get("model.safetensors") or min(names.values())
        stamp = FAMILY_MTIME + int(digest[:12], 16) % (365 * 86400)
        for name in names:
            if (folder / model / name).is_file():
                os.utime(folder / model / name, (stamp, stamp))
    os.utime(folder / MANIFEST, (FAMILY_MTIME, FAMILY_MTIME))


def _read_manifest(root: str) -> dict | None:
    manifest = store.join(store.check_uri(root), MANIFEST)
    return json.loads(store.read_bytes(manifest)) if store.exists(manifest) else None


def load_expert_family(root: str, recipe: ExpertRecipe, verify: bool = False) -> ExpertFamily | None:
    """The family under root when it was built from this recipe and every checkpoint opens
    (verify: and every file has the sha256 its manifest records)."""
    root = store.check_uri(root)
    doc = _read_manifest(root)
    if doc is None or doc.get("recipe", {}).get("hash") != recipe.digest() or "files" not in doc:
        return None
    family = ExpertFamily(
        root=root,
        base=store.join(root, "base"),
        experts={n: ExpertInfo(store.join(root, n), e["kind"], e["skill"]) for n, e in doc["experts"].items()},
        recipe=doc["recipe"],
        log=doc.get("log", {}),
        files=doc["files"],
    )
    try:
        for uri in [family.base, *(e.uri for e in family.experts.values())]:
            Checkpoint.open(uri)
    except CheckpointError:
        return None
    if verify:
        for model, names in family.files.items():
            for name, digest in names.items():
                path = store.join(root, model, name)
                if not store.exists(path) or hashlib.sha256(store.read_bytes(path)).hexdigest() != digest:
                    return None
    return family


def shipped_root(recipe: ExpertRecipe) -> Path | None:
    """The folder of the family shipped with the package for this recipe, if there is one."""
    folder = Path(str(resources.files("mergeaudit.toy").joinpath(SHIPPED, recipe.digest())))
    return folder if (folder / MANIFEST).is_file() else None


def obtain_expert_family(folder: str, recipe: ExpertRecipe | None = None, progress=print) -> ExpertFamily:
    """The family of this recipe in folder/<recipe hash>: reused when already there, else copied
    from the package when it ships one (files checked against their sha256), else trained."""
    recipe = recipe or ExpertRecipe()
    root = store.join(store.check_uri(folder), recipe.digest())
    found = load_expert_family(root, recipe)
    if found is not None:
        _stamp(root, found.files)  # a copy made before families were stamped
        progress(f"toy experts: reusing {root} (recipe {recipe.digest()})")
        return found
    shipped = shipped_root(recipe)
    if shipped is not None and load_expert_family(str(shipped), recipe, verify=True) is not None:
        for path in sorted(p for p in shipped.rglob("*") if p.is_file()):
            store.write_bytes(store.join(root, *path.relative_to(shipped).parts), path.read_bytes())
        family = load_expert_family(root, recipe, verify=True)
        if family is not None:
            _stamp(root, family.files)
            progress(
                f"toy experts: the shipped ones (recipe {recipe.digest()}), copied to {root}; "
                "`mergeaudit demo --retrain` trains them from scratch"
            )
            return family
    progress(f"toy experts: training recipe {recipe.digest()} into {root}")
    return build_expert_family(root, recipe, progress=progress, reuse=False)


def compare_families(reference: ExpertFamily, other: ExpertFamily) -> list[str]:
    """One line per model: bit-identical weights, or how many entries differ and the greedy
    accuracies of both."""
    lines = []
    models = {
        "base": (reference.base, other.base),
        **{n: (e.uri, other.experts[n].uri) for n, e in reference.experts.items() if n in other.experts},
    }
    for name, (a_uri, b_uri) in models.items():
        a, b = Checkpoint.open(a_uri), Checkpoint.open(b_uri)
        differ = total = 0
        for key in a.keys():
            x, y = a.get(key), b.get(key) if key in b.keys() else None
            total += x.numel()
            differ += x.numel() if y is None or y.shape != x.shape else int((x != y).sum())
        if differ == 0:
            lines.append(f"  {name}: identical to the shipped weights")
            continue
        acc = " ".join(
            f"{k[4:]} {reference.log.get(name, {}).get(k, math.nan):.2f} -> "
            f"{other.log.get(name, {}).get(k, math.nan):.2f}"
            for k in sorted(other.log.get(name, {}))
            if k.startswith("acc_")
        )
        lines.append(
            f"  {name}: DIFFERS from the shipped weights in {differ} of {total} entries "
            f"(greedy accuracy shipped -> retrained: {acc})"
        )
    return lines


def retrain_expert_family(folder: str, recipe: ExpertRecipe | None = None, progress=print) -> ExpertFamily:
    """Train the family from scratch in folder/<recipe hash> (replacing a family this trained
    there before) and say whether it matches the shipped one, model by model."""
    recipe = recipe or ExpertRecipe()
    root = store.join(store.check_uri(folder), recipe.digest())
    local = Path(root)
    if local.exists() and (local / MANIFEST).is_file():
        shutil.rmtree(local)  # a family this function wrote before (it holds our manifest)
    progress(f"toy experts: training recipe {recipe.digest()} from scratch into {root}")
    family = build_expert_family(root, recipe, progress=progress, reuse=False)
    progress(f"  trained in {total_training_seconds(family):.0f} s")
    shipped = shipped_root(recipe)
    reference = load_expert_family(str(shipped), recipe, verify=True) if shipped else None
    if reference is None:
        progress("  no shipped experts for this recipe to compare with")
        return family
    lines = compare_families(reference, family)
    same = all("identical" in line for line in lines)
    progress(
        "  retrained experts are bit-identical to the shipped ones"
        if same
        else "  retrained experts DIFFER from the shipped ones (another machine, BLAS or library version "
        "rounds differently); the audit below uses the retrained ones:"
    )
    for line in lines if not same else []:
        progress(line)
    return family


def total_training_seconds(family: ExpertFamily) -> float:
    return math.fsum(entry.get("seconds", 0.0) for entry in family.log.values())


# A few steps of everything: for tests of the demo's plumbing (the verdict means little).
QUICK_RECIPE = ExpertRecipe(
    base_steps=150, base_schedule_steps=150, sft_steps=20, rl_steps=10, rl_prompts=8, rl_group=4, log_every=5
)
