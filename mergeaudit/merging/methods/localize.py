"""Localizing merges: find the entries each task's update lives on, then merge only there.

consensus_ta, consensus_ties   Consensus merging with TALL masks (Wang et al., ICML 2024, arXiv
                               2405.07813): task arithmetic or TIES restricted to the entries
                               at least k tasks need
localize_stitch                Localize-and-Stitch, dataless variant (He et al., arXiv
                               2408.13656): each task's top-magnitude entries, overlaps averaged

    mergeaudit merge ... method: consensus_ta      (parameters: k, mask_lambda, weight, lambda)
    mergeaudit merge ... method: localize_stitch   (parameters: density)

These suit RLVR updates, which live on sparse supports: an entry only one task needs is either
dropped as "selfish" (consensus) or kept whole (localize_stitch).

Consensus merging. Per task, the TALL mask m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t| (>=, as the
paper writes it; the authors' `generate_task_masks` uses >, which differs only where both sides are
equal, e.g. an entry no task moved, whose merged update is 0 either way). lambda_t is `mask_lambda`,
one per model, default 0.4: the authors select it per task on validation data from {0.2, ..., 0.6};
0.4 is that grid's middle, since a merge audit has no validation split. The consensus mask keeps the
entries where at least `k` masks are on (k = 2 by default, the authors' `prun_thre_k`: removes
"catastrophic" entries no task needs and "selfish" ones only one task needs; k = 0 keeps everything,
k above the model count would remove every update and is refused). It restricts the base method's
merged update: base + lambda * (consensus * tau_MTL), as the authors' `merged_tv * consensus_mask`.
Choices:

- tau_t are the weighted task vectors w_t (theta_t - theta_0) (`weight`, default 1); the masks
  compare whole task vectors, before any TIES trimming (the authors pass the untrimmed vectors).
- tau_MTL is the base method's merged update before the global scale `lambda`: consensus_ta uses
  the task-arithmetic sum sum_t w_t tau_t (with `normalize: true`, divided by sum_t w_t). For
  consensus_ties `mask_reference: ties` (default) builds the masks against the TIES-merged
  update, as the authors' code does when it builds TALL masks with TIES (`use_ties`);
  `mask_reference: task_arithmetic` builds them against the task-arithmetic sum.
- consensus_ties runs mergeaudit's TIES (gta.generalized_task_arithmetic: magnitude trim per
  model, sign election, sum of agreeing entries) with the authors' consensus settings: `density`
  0.2 per model (their reset_thresh=20) and the disjoint *sum* (their `merge_func="dis-sum"`),
  not TIES-Merging's disjoint mean; `normalize: true` gives the mean. All GTAParams apply.
- Per tensor: the authors compute tau_MTL and the masks over the flattened model; every step is
  elementwise, so per tensor gives the same masks (except the TIES trim, which is per tensor in
  mergeaudit as in mergekit).

`slot.info`: tall_density (fraction of entries in each model's mask), consensus (fraction of
entries kept), removed (fraction of the merged update's nonzero entries the consensus removed),
plus TIES's density_achieved.

Localize-and-Stitch (dataless). Localize: each task's mask is the top `density` fraction of its
task vector by magnitude (max(1, int(density * n)) entries, ties to the lower index, as
mergeaudit's other magnitude masks). density defaults to 0.05, the sparsity of the authors'
dataless script for language models (`graft_args.sparsity = 5e-2`; their vision script sets a
`sparsity_level` of 0.1); one value per model is accepted. An entry whose update is exactly zero claims nothing
(the authors' mask is |tau| > threshold, so it cannot hold a zero either). Stitch: on an entry
claimed by c tasks each task's update is divided by c (the authors' Stitcher: 1 / (1 + number of
other masks sharing the entry)), summed onto the base; unclaimed entries keep the base. Not
scaled afterwards. The authors rank magnitudes over all trainable tensors at once (one global
threshold) and leave the tensors they do not localize (embeddings, final norms) at the base; here the ranking
is per tensor and every tensor the plan merges is localized. `slot.info`: density_achieved
(per model), claimed (fraction of entries claimed by any task), overlap (by two or more).

All three are symmetric in model order and give the base back for zero updates.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch

from mergeaudit.merging import steps
from mergeaudit.merging.methods.gta import GTAParams, Preset, generalized_task_arithmetic
from mergeaudit.merging.registry import MethodParams, TensorSlot, register


class ConsensusParams(GTAParams):
    PER_MODEL: ClassVar = {"weight": 1.0, "density": 1.0, "mask_lambda": 0.4}
    mask_lambda: tuple[float, ...] = ()
    k: int = 2

    def check(self, n_models: int) -> list[str]:
        problems = super().check(n_models)
        if any(x < 0 for x in self.mask_lambda):
            problems.append(f"mask_lambda must be >= 0 (got {list(self.mask_lambda)})")
        if not 0 <= self.k <= n_models:
            problems.append(f"k must be between 0 and the number of models, {n_models} (got {self.k})")
        return problems


class ConsensusTiesParams(ConsensusParams):
    PER_MODEL: ClassVar = {"weight": 1.0, "density": 0.2, "mask_lambda": 0.4}
    mask_reference: Literal["ties", "task_arithmetic"] = "ties"


TA = Preset(None, consensus=False, normalize=False, rescale=False)
TIES_SUM = Preset("magnitude", consensus=True, normalize=False, rescale=False)


def tall_masks(
    deltas: list[torch.Tensor], weights: tuple[float, ...], reference: torch.Tensor, lambdas: tuple[float, ...]
) -> list[torch.Tensor]:
    """m_t = |w_t tau_t| >= lambda_t |tau_MTL - w_t tau_t| for each task."""
    return [
        (w * d).abs() >= lam * (reference - w * d).abs() for d, w, lam in zip(deltas, weights, lambdas, strict=True)
    ]


def consensus_merge(slot: TensorSlot, p: ConsensusParams, preset: Preset, against_sum: bool) -> torch.Tensor:
    """The preset's merged update restricted to the consensus entries; the TALL masks compare
    each task vector with that merged update, or with the task-arithmetic sum (`against_sum`)."""
    deltas = slot.deltas()
    # the base method's merged update, exactly: the same method over the task vectors on a zero base
    inner = dataclasses.replace(
        slot, base=torch.zeros_like(slot.base), models=tuple(deltas), info={}, dtype=slot.compute_dtype
    )
    merged = generalized_task_arithmetic(inner, p.model_copy(update={"lambda_": 1.0}), preset)
    tau_mtl = merged
    if against_sum:
        tau_mtl = torch.zeros_like(merged)
        for d, w in zip(deltas, p.weight, strict=True):
            tau_mtl.add_(d, alpha=w)
    masks = tall_masks(deltas, p.weight, tau_mtl, p.mask_lambda)
    counts = torch.zeros_like(merged, dtype=torch.int32)
    for m in masks:
        counts.add_(m)
    keep = counts >= p.k
    moved = merged != 0
    slot.info.update(inner.info)
    slot.info.update(
        tall_density=[steps.kept_fraction(m) for m in masks],
        consensus=steps.kept_fraction(keep),
        removed=int(torch.count_nonzero(moved & ~keep)) / max(1, int(torch.count_nonzero(moved))),
    )
    merged = merged.mul_(keep)
    if p.lambda_ != 1:
        merged.mul_(p.lambda_)
    return slot.base + merged


@register(
    "consensus_ta", params=ConsensusParams, min_models=2, reference="https://arxiv.org/abs/2405.07813", example={"k": 2}
)
def consensus_ta(slot: TensorSlot, p: ConsensusParams) -> torch.Tensor:
    return consensus_merge(slot, p, TA, against_sum=False)  # the merged update is the sum already


@register(
    "consensus_ties",
    params=ConsensusTiesParams,
    min_models=2,
    reference="https://arxiv.org/abs/2405.07813",
    example={"k": 2, "density": 0.5},
)
def consensus_ties(slot: TensorSlot, p: ConsensusTiesParams) -> torch.Tensor:
    return consensus_merge(slot, p, TIES_SUM, against_sum=p.mask_reference == "task_arithmetic")


class LocalizeStitchParams(MethodParams):
    PER_MODEL: ClassVar = {"density": 0.05}
    density: tuple[float, ...] = ()

    def check(self, n_models: int) -> list[str]:
        if any(not 0 < d <= 1 for d in self.density):
            return [f"density must be in (0, 1] (got {list(self.density)})"]
        return []


@register(
    "localize_stitch",
    params=LocalizeStitchParams,
    reference="https://arxiv.org/abs/2408.13656",
    example={"density": 0.3},
)
def localize_stitch(slot: TensorSlot, p: LocalizeStitchParams) -> torch.Tensor:
    merged = torch.zeros_like(slot.base)
    claims = torch.zeros_like(slot.base, dtype=torch.int32)
    kept = []
    for d, density in zip(slot.deltas(), p.density, strict=True):
        mask = steps.sparsify_magnitude(d, density) & (d != 0)
        merged.add_(d.mul_(mask))
        claims.add_(mask)
        kept.append(steps.kept_fraction(mask))
    slot.info.update(
        density_achieved=kept, claimed=steps.kept_fraction(claims > 0), overlap=steps.kept_fraction(claims > 1)
    )
    return slot.base + merged.div_(claims.clamp(min=1))
