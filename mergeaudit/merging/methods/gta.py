"""Generalized task arithmetic: sparsify x elect sign x aggregate x rescale presets.

With `semantics: mergekit` (the default) the tensors equal mergekit 0.1.x's for the same
inputs and parameters: deltas multiplied by their weights before sign election, the elected
sign is that of the weighted sum, agreeing entries are normalised by the sum of the agreeing
models' weights, and DARE/DELLA masks are rescaled to keep each delta's L1 norm. With
`semantics: paper` TIES is normalised by the count of agreeing models and DARE/DELLA rescale
kept entries by 1/p (1/density for DARE, each entry's own keep probability for DELLA), as in
the papers and in PEFT. Only the masks' random draws differ from mergekit (keyed generators
instead of the global RNG; see TensorSlot.generator).

| method           | sparsify              | sign election | normalize | rescale |
|------------------|-----------------------|---------------|-----------|---------|
| task_arithmetic  | -                     | -             | False     | -       |
| ties             | magnitude (top k)     | yes           | True      | False   |
| dare_linear      | random (Bernoulli)    | -             | False     | True    |
| dare_ties        | random (Bernoulli)    | yes           | False     | True    |
| breadcrumbs      | magnitude w/o outliers| -             | False     | False   |
| breadcrumbs_ties | magnitude w/o outliers| yes           | False     | False   |
| della            | magnitude-ranked p    | yes           | True      | True    |
| della_linear     | magnitude-ranked p    | -             | False     | True    |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pydantic
import torch

from mergeaudit.merging import steps
from mergeaudit.merging.registry import MethodParams, Semantics, TensorSlot, register


class GTAParams(MethodParams):
    PER_MODEL: ClassVar = {"weight": 1.0, "density": 1.0}
    weight: tuple[float, ...] = ()
    density: tuple[float, ...] = ()
    lambda_: float = pydantic.Field(1.0, alias="lambda")
    normalize: bool | None = None
    rescale: bool | None = None
    int8_mask: bool = False  # accepted for mergekit configs; masks are boolean here either way
    semantics: Semantics = "mergekit"

    def check(self, n_models: int) -> list[str]:
        # density 0 keeps nothing of that model, and negative weights normalise as mergekit does
        # (a sum of agreeing weights that is 0 divides by 1), so both merge rather than fail
        if any(not 0 <= d <= 1 for d in self.density):
            return [f"density must be in [0, 1] (got {list(self.density)})"]
        return []


class BreadcrumbsParams(GTAParams):
    PER_MODEL: ClassVar = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    gamma: tuple[float, ...] = ()

    def check(self, n_models: int) -> list[str]:
        problems = super().check(n_models)
        if any(not 0 <= g < 1 for g in self.gamma):
            problems.append(f"gamma must be in [0, 1) (got {list(self.gamma)})")
        return problems


class DellaParams(GTAParams):
    PER_MODEL: ClassVar = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    epsilon: tuple[float, ...] = ()

    def check(self, n_models: int) -> list[str]:
        problems = super().check(n_models)
        for d, e in zip(self.density, self.epsilon, strict=False):
            if d < 1 and not (0 < d - e and d + e < 1):
                problems.append(f"epsilon must keep density +- epsilon inside (0, 1) (got density {d}, epsilon {e})")
        return problems


@dataclass(frozen=True)
class Preset:
    sparsify: Literal["magnitude", "random", "outliers", "della"] | None
    consensus: bool
    normalize: bool
    rescale: bool


def sparsify(
    slot: TensorSlot, i: int, delta: torch.Tensor, p: GTAParams, preset: Preset, rescale: bool
) -> tuple[torch.Tensor, float, float]:
    """One model's delta after its preset's sparsification (in place): (delta, kept, scale).

    `kept` is the fraction of entries still carrying an update afterwards."""
    density = p.density[i]
    if preset.sparsify is None or density >= 1:
        return delta, 1.0, 1.0
    exact = p.semantics == "mergekit"
    if preset.sparsify == "magnitude":
        kept = steps.sparsify_magnitude(delta, density, sort_ties=exact)
    elif preset.sparsify == "outliers":
        kept = steps.sparsify_outliers(delta, density, p.gamma[i], sort_ties=exact)
    elif preset.sparsify == "random":
        kept = steps.sparsify_random(delta, density, slot.generator(i))
    else:
        probs = steps.della_probabilities(delta, density, p.epsilon[i])
        kept = steps.sparsify_della(delta, probs, slot.generator(i))
    if not rescale:
        delta, scale = delta.mul_(kept), 1.0
    elif p.semantics == "paper" and preset.sparsify in ("random", "della"):
        keep_p = probs.to(delta.dtype) if preset.sparsify == "della" else density
        delta, scale = delta.mul_(kept).div_(keep_p), 1.0 / density
    else:
        delta, scale = steps.rescale_l1(delta, kept)
    return delta, steps.kept_fraction(delta), scale


def generalized_task_arithmetic(slot: TensorSlot, p: GTAParams, preset: Preset) -> torch.Tensor:
    """Sparsify each delta, weight it, elect signs, sum the agreeing ones, normalise, scale.

    The operations are mergekit's, in the same order and dtype, so a bf16 or fp16 compute
    rounds where mergekit rounds: the deltas live in one (K, *shape) buffer of the compute
    dtype, the weights are a tensor of the compute dtype (0.3 is 0.30078125 in bf16, as in
    mergekit), and every sum over models is a reduction over that buffer's first dimension
    (accumulated in fp32 and rounded once for bf16/fp16). Memory: the K deltas, one K-sized
    boolean mask and a few tensor-sized buffers; the deltas' buffer is reused for the divisor."""
    base = slot.base
    rescale = preset.rescale if p.rescale is None else p.rescale
    normalize = preset.normalize if p.normalize is None else p.normalize
    dtype = base.dtype
    deltas = base.new_empty((len(slot.models), *base.shape))
    kept, scales = [], []
    for i, model in enumerate(slot.models):
        delta = torch.sub(model.to(dtype), base, out=deltas[i])
        _, frac, scale = sparsify(slot, i, delta, p, preset, rescale)
        kept.append(frac)
        scales.append(scale)
    if preset.sparsify is not None:
        slot.info.update(density_achieved=kept, rescale=scales)
    weights = torch.tensor(p.weight, dtype=dtype, device=base.device).reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if preset.consensus:
        majority = deltas.sum(dim=0) >= 0  # the elected sign: that of the weighted sum (ties to +)
        mask = torch.where(majority, deltas > 0, deltas < 0)  # agreeing entries; zeros never agree
        del majority
        mixed = deltas.mul_(mask).sum(dim=0)
        if normalize:
            if p.semantics == "paper":  # the TIES paper: the mean over the agreeing models
                divisor = mask.sum(dim=0).to(dtype)
            else:  # mergekit: over the agreeing models' weights
                divisor = deltas.copy_(mask).mul_(weights).sum(dim=0)
            divisor[divisor == 0] = 1
        del mask
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if normalize:
        mixed.div_(divisor)
    if p.lambda_ != 1:
        mixed.mul_(p.lambda_)
    return mixed.add_(base)


def _register(name: str, params: type[GTAParams], preset: Preset, reference: str, stochastic: bool = False):
    def fn(slot: TensorSlot, p: GTAParams) -> torch.Tensor:
        return generalized_task_arithmetic(slot, p, preset)

    fn.__name__ = name
    fn.__doc__ = f"{name}: generalized task arithmetic preset {preset}."
    example = {"density": 0.5} if "density" in params.model_fields and name != "task_arithmetic" else {}
    register(name, params=params, reference=reference, stochastic=stochastic, example=example)(fn)


_register("task_arithmetic", GTAParams, Preset(None, False, False, False), "https://arxiv.org/abs/2212.04089")
_register("ties", GTAParams, Preset("magnitude", True, True, False), "https://arxiv.org/abs/2306.01708")
_register("dare_linear", GTAParams, Preset("random", False, False, True), "https://arxiv.org/abs/2311.03099", True)
_register("dare_ties", GTAParams, Preset("random", True, False, True), "https://arxiv.org/abs/2311.03099", True)
_register("breadcrumbs", BreadcrumbsParams, Preset("outliers", False, False, False), "https://arxiv.org/abs/2312.06795")
_register(
    "breadcrumbs_ties", BreadcrumbsParams, Preset("outliers", True, False, False), "https://arxiv.org/abs/2312.06795"
)
_register("della", DellaParams, Preset("della", True, True, True), "https://arxiv.org/abs/2406.11617", True)
_register("della_linear", DellaParams, Preset("della", False, False, True), "https://arxiv.org/abs/2406.11617", True)
