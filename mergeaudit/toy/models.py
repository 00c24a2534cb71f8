"""Tiny Llama checkpoints with task vectors of known density, for tests and the demo.

`build_toy_family(root)` writes, under any store URI:
  base/         a seeded random tiny Llama (bf16, as real releases are) with the toy tokenizer
  <variant>/    base + a sparse update on a random mask of the chosen density
and returns a `ToyFamily` that records, per variant, exactly how many entries changed, so tests
can check geometry against known answers. The update is large relative to each weight (5-15%),
so every masked entry survives the bf16 cast and the measured bf16 sparsity is exact.

    fam = build_toy_family("/tmp/toy", variants={"math": 0.1, "code": 0.3})
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.errors import CheckpointError
from mergeaudit.toy.tokenizer import build_tokenizer
from mergeaudit.toy.train import train_base

DEFAULT_VARIANTS = {"ft_a": 0.1, "ft_b": 0.2}
MANIFEST = "toy_family.json"


@dataclass(frozen=True)
class ToyFamily:
    """Where the toy checkpoints are, and how many entries each variant changed."""

    root: str
    base: str
    variants: dict[str, str]
    changed: dict[str, int] = field(default_factory=dict)
    numel: int = 0
    recipe: dict = field(default_factory=dict)

    def density(self, name: str) -> float:
        return self.changed[name] / self.numel


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, **overrides) -> LlamaConfig:
    """A Llama config small enough to build, merge and evaluate in a second on a CPU."""
    tok = build_tokenizer()
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _generator(seed: int, *parts: str) -> torch.Generator:
    digest = hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sparse_update(name: str, w: torch.Tensor, density: float, seed: int, variant: str) -> torch.Tensor:
    """w plus a signed update of 5-15% of |w| on a Bernoulli(density) mask, in w's dtype."""
    g = _generator(seed, variant, name)
    w32 = w.float()
    mask = torch.rand(w.shape, generator=g) < density
    sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
    scale = 0.05 + 0.10 * torch.rand(w.shape, generator=g)
    delta = sign * scale * (w32.abs() + 1e-2)
    return torch.where(mask, w32 + delta, w32).to(w.dtype)


def build_base(root: str, seed: int = 0, hidden: int = 64, layers: int = 2, train_steps: int = 0) -> str:
    """Write a tiny Llama (bf16) and the toy tokenizer to root/base.

    With train_steps=0 the weights are a seeded random init (fast, for tests); otherwise the
    base is trained on two-digit addition first, so scores and merges mean something.
    """
    tok = build_tokenizer()
    config = tiny_llama_config(len(tok), hidden=hidden, layers=layers)
    model = train_base(config, steps=train_steps, seed=seed).to(torch.bfloat16)
    base_uri = store.join(root, "base")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            store.write_bytes(store.join(base_uri, path.name), path.read_bytes())
    return base_uri


def family_recipe(
    variants: dict[str, float] | None = None, seed: int = 0, hidden: int = 64, layers: int = 2, train_steps: int = 0
) -> dict:
    """Everything that determines a family's bytes; a family is reused only for the same recipe."""
    variants = dict(DEFAULT_VARIANTS if variants is None else variants)
    return {"variants": variants, "seed": seed, "hidden": hidden, "layers": layers, "train_steps": train_steps}


def build_toy_family(
    root: str,
    variants: dict[str, float] | None = None,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    train_steps: int = 0,
) -> ToyFamily:
    """Write base and fine-tuned variants under root; returns what was written."""
    variants = dict(DEFAULT_VARIANTS if variants is None else variants)
    root = store.check_uri(root)
    recipe = family_recipe(variants, seed, hidden, layers, train_steps)
    base_uri = build_base(root, seed=seed, hidden=hidden, layers=layers, train_steps=train_steps)
    base = Checkpoint.open(base_uri)
    changed: dict[str, int] = {}
    uris: dict[str, str] = {}
    for variant, density in variants.items():
        counts = [0]

        def tensors(variant=variant, density=density, counts=counts):
            for name, w in base.iter_tensors():
                new = sparse_update(name, w, density, seed, variant)
                counts[0] += int((new != w).sum())
                yield name, new

        uris[variant] = write_checkpoint(store.join(root, variant), tensors(), source=base)
        changed[variant] = counts[0]
    numel = sum(base.spec(n).numel for n in base.keys())
    family = ToyFamily(root=root, base=base_uri, variants=uris, changed=changed, numel=numel, recipe=recipe)
    store.write_bytes(store.join(root, MANIFEST), json.dumps(family.__dict__, indent=2).encode())
    return family


def load_toy_family(root: str, recipe: dict | None = None) -> ToyFamily | None:
    """The family recorded under root, or None when there is none, it is incomplete, or it was
    built from another recipe than the one given."""
    root = store.check_uri(root)
    manifest = store.join(root, MANIFEST)
    if not store.exists(manifest):
        return None
    family = ToyFamily(**json.loads(store.read_bytes(manifest)))
    if recipe is not None and family.recipe != recipe:
        return None
    try:
        for uri in [family.base, *family.variants.values()]:
            Checkpoint.open(uri)
    except CheckpointError:
        return None
    return family
