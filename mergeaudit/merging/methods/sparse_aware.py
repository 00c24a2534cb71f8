"""Merges built for sparse, near-orthogonal (RLVR) updates: an update only one model made
should survive whole, not be divided by the number of models.

ram, ramplus_tl   Reinforced Agent Merging (arXiv 2601.13572), mergekit 0.1.x semantics:
                  an entry is updated when |delta| > epsilon; unique entries are kept whole,
                  shared ones averaged over their contributors (ramplus_tl scales each model's
                  unique entries by 1 + r * min(alpha, shared/unique)).
disjoint_mean     ours: the same idea with the bf16 update mask that geometry counts
                  (`mergeaudit.updates`: an update below bf16 resolution is no update, nor is
                  +0 -> -0) or |delta| > epsilon, and per-model weights that scale each task
                  vector first.
fisher            diagonal-Fisher-weighted averaging (Matena & Raffel, arXiv 2111.09832) of
                  the task vectors: base + sum_i w_i F_i d_i / sum_i w_i F_i.
sar               Sensitivity-aware Resolving Merging (arXiv 2606.18521); see below.

SAR. The paper's description (its abstract; we have not seen its method section) is: "resolves
conflicts in overlapping update regions via Fisher Information-based sensitivity arbitration,
followed by magnitude-aware sparsification and rescaling". Every concrete choice is ours:

- task vectors: d_i = w_i (theta_i - theta_base), with a `weight` per model (default 1).
- update regions: m_i marks the entries whose bf16 value moved (`mask: bf16`, the default: an
  update below bf16 resolution is no update) or where |d_i| > `epsilon` (`mask: abs`); an entry
  updated by two or more models is overlapping, by one exclusive.
- Fisher Information: each model's diagonal Fisher on its own calibration set (`mergeaudit
  fisher`), divided by its own mean over the tensor, per model and per tensor
  (`fisher_normalize: mean`, the default; `none` keeps the raw scales), plus `fisher_floor`
  (1e-6, in units of that mean) so that no entry weighs exactly 0.
- sensitivity: s_i = F_i d_i^2, the second-order loss increase of dropping d_i
  (`sensitivity: magnitude` sets F = 1 and needs no Fisher).
- arbitration on overlaps: `fisher_sign_average` (default) elects the sign of
  sum_i m_i s_i sign(d_i) and averages the agreeing updates weighted by Fisher,
  sum_i a_i F_i d_i / sum_i a_i F_i; `winner_take_all` keeps the update with the largest s_i.
- exclusive entries (not named by the paper): kept whole, never divided by the model count.
- magnitude-aware sparsification: of the merged update's nonzero entries keep the top `density`
  (default 0.9) by Fisher-weighted magnitude mean_i(F_i) * merged^2 (merged^2 without Fisher);
  done once on the merged update, not per model before arbitration.
- rescaling: `rescale: l1` (default) scales the kept entries so the merged update keeps its L1
  norm (mergekit's DARE/DELLA rule); `inverse_density` scales them by support / kept, i.e.
  1 / achieved density (the DARE paper's 1/p); `none`. `rescale: true / false` (older configs)
  mean `l1` / `none`.
- global scale (not in the abstract; task arithmetic's lambda): base + `lambda` * merged update,
  applied last, after rescaling.

Why normalise the Fisher, and by the mean: arbitration compares F_i of different models at the
same entry, so a factor common to one model's whole Fisher (calibration-set size, a sum rather
than a mean over tokens, response lengths, how peaked the model is) would decide conflicts on
its own: with raw Fisher, one expert's Fisher x100 won 92% of the conflicting entries of a
synthetic pair instead of 50% (tests/test_sar.py), and 97% instead of 47% on the toy family's
two experts with Fisher estimated on 16 addition problems; normalised, the share is the same at
x1 and x100 (50% and 49%). Dividing by the mean or by the sum over the tensor gives the same
ratios between models (they share numel), so the same merge; the mean keeps values near 1,
which makes `fisher_floor` a relative floor and keeps fp32 away from underflow on 100M-entry
tensors. Not the median (diagonal Fisher is heavy-tailed and mostly
near 0, so the median can be 0), not the mean over each model's own update support (it would
reward a model for updating low-Fisher entries), not one factor per model across tensors (it
would leave per-tensor scale differences between the experts' Fisher estimates). What still
decides a conflict is each entry's Fisher relative to the rest of that model's tensor, times d^2.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pydantic
import torch

from mergeaudit.merging import steps
from mergeaudit.merging.registry import MethodParams, TensorSlot, register
from mergeaudit.updates import changed_bf16


class RamParams(MethodParams):
    epsilon: float = 1e-5


class RamPlusParams(RamParams):
    r: float = 0.1
    alpha: float = 0.2


def _ram_parts(slot: TensorSlot, epsilon: float):
    deltas = torch.stack(slot.deltas()).reshape(len(slot.models), -1)
    nonzero = deltas.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return deltas, nonzero, counts, counts > 1, counts == 1


@register("ram", params=RamParams, reference="https://arxiv.org/abs/2601.13572")
def ram(slot: TensorSlot, p: RamParams) -> torch.Tensor:
    deltas, nonzero, counts, overlap, unique = _ram_parts(slot, p.epsilon)
    dz = deltas * nonzero
    merged = (dz * unique + dz * overlap / counts.clamp(min=1)).sum(dim=0)
    return slot.base + merged.reshape_as(slot.base)


@register("ramplus_tl", params=RamPlusParams, reference="https://arxiv.org/abs/2601.13572")
def ramplus_tl(slot: TensorSlot, p: RamPlusParams) -> torch.Tensor:
    deltas, nonzero, counts, overlap, unique = _ram_parts(slot, p.epsilon)
    shared = (nonzero & overlap).sum(dim=1)
    only = (nonzero & unique).sum(dim=1)
    lam = 1 + p.r * (shared / only.clamp(min=p.epsilon)).clamp(min=0, max=p.alpha)
    dz = deltas * nonzero
    merged = (dz * unique * lam.unsqueeze(-1) + dz * overlap / counts.clamp(min=1)).sum(dim=0)
    return slot.base + merged.reshape_as(slot.base)


class MaskedParams(MethodParams):
    PER_MODEL: ClassVar = {"weight": 1.0}
    weight: tuple[float, ...] = ()
    mask: Literal["bf16", "abs"] = "bf16"
    epsilon: float = 1e-5


def update_masks(slot: TensorSlot, deltas: torch.Tensor, p: MaskedParams) -> torch.Tensor:
    """Stacked masks of the entries each model updated."""
    if p.mask == "abs":
        return deltas.abs() > p.epsilon
    return torch.stack([changed_bf16(slot.base, m) for m in slot.models])


def weighted_deltas(slot: TensorSlot, weights: tuple[float, ...]) -> torch.Tensor:
    d = torch.stack(slot.deltas())
    return d * torch.tensor(weights, dtype=d.dtype, device=d.device).reshape(-1, *[1] * slot.base.dim())


@register(
    "disjoint_mean", params=MaskedParams, reference="https://arxiv.org/abs/2306.01708"
)  # TIES-Merging's disjoint mean, without trim and election
def disjoint_mean(slot: TensorSlot, p: MaskedParams) -> torch.Tensor:
    """Updates made by one model are kept whole; overlapping ones are averaged."""
    deltas = weighted_deltas(slot, p.weight)
    masks = update_masks(slot, deltas, p)
    counts = masks.sum(dim=0)
    merged = (deltas * masks).sum(dim=0) / counts.clamp(min=1)
    slot.info.update(exclusive=steps.kept_fraction(counts == 1), overlap=steps.kept_fraction(counts > 1))
    return slot.base + merged


class FisherParams(MethodParams):
    PER_MODEL: ClassVar = {"weight": 1.0}
    weight: tuple[float, ...] = ()
    fisher_floor: float = 1e-6

    def check(self, n_models: int) -> list[str]:
        if any(w <= 0 for w in self.weight):
            return [f"fisher weights must be positive (got {list(self.weight)})"]
        return []

    def uses_fisher(self) -> bool:
        return True


def floored_fisher(slot: TensorSlot, floor: float) -> torch.Tensor:
    f = torch.stack([x.to(slot.compute_dtype) for x in slot.fisher]).clamp(min=0)
    return f + floor * f.mean().clamp(min=torch.finfo(f.dtype).tiny)


@register("fisher", params=FisherParams, base="optional", reference="https://arxiv.org/abs/2111.09832")
def fisher(slot: TensorSlot, p: FisherParams) -> torch.Tensor:
    f = floored_fisher(slot, p.fisher_floor)
    w = torch.tensor(p.weight, dtype=f.dtype, device=f.device).reshape(-1, *[1] * (f.dim() - 1))
    x = torch.stack(slot.deltas() if slot.base is not None else slot.inputs())
    merged = (w * f * x).sum(dim=0) / (w * f).sum(dim=0)
    return slot.base + merged if slot.base is not None else merged


class SarParams(MaskedParams):
    arbitration: Literal["fisher_sign_average", "winner_take_all"] = "fisher_sign_average"
    sensitivity: Literal["fisher", "magnitude"] = "fisher"
    fisher_normalize: Literal["mean", "none"] = "mean"
    density: float = 0.9
    rescale: Literal["l1", "inverse_density", "none"] = "l1"
    lambda_: float = pydantic.Field(1.0, alias="lambda")
    fisher_floor: float = 1e-6

    @pydantic.field_validator("rescale", mode="before")
    @classmethod
    def _rescale_bool(cls, v):
        # earlier configs wrote `rescale: true/false`; true meant L1 matching
        return {True: "l1", False: "none"}.get(v, v) if isinstance(v, bool) else v

    def check(self, n_models: int) -> list[str]:
        problems = [] if 0 < self.density <= 1 else [f"density must be in (0, 1] (got {self.density})"]
        if self.fisher_floor < 0:
            problems.append(f"fisher_floor must be >= 0 (got {self.fisher_floor})")
        return problems

    def uses_fisher(self) -> bool:
        return self.sensitivity == "fisher"


def sar_fisher(slot: TensorSlot, p: SarParams) -> torch.Tensor:
    """Each model's Fisher for this tensor divided by its own mean over the tensor, plus
    `fisher_floor` (in units of that mean); a model with no Fisher mass here gets the floor
    alone. `fisher_normalize: none` keeps the raw scales (floor x the mean of all models)."""
    if p.fisher_normalize == "none":
        return floored_fisher(slot, p.fisher_floor)
    f = torch.stack([x.to(slot.compute_dtype) for x in slot.fisher]).clamp(min=0)
    mean = f.reshape(len(slot.fisher), -1).mean(dim=1).reshape(-1, *[1] * (f.dim() - 1))
    f = torch.where(mean > 0, f / mean.clamp(min=torch.finfo(f.dtype).tiny), f)
    return f + p.fisher_floor


@register("sar", params=SarParams, reference="https://arxiv.org/abs/2606.18521")
def sar(slot: TensorSlot, p: SarParams) -> torch.Tensor:
    deltas = weighted_deltas(slot, p.weight)
    masks = update_masks(slot, deltas, p)
    f = sar_fisher(slot, p) if p.sensitivity == "fisher" else torch.ones_like(deltas)
    sens = f * deltas.square() * masks
    counts = masks.sum(dim=0)
    exclusive = (deltas * masks).sum(dim=0) * (counts == 1)
    if p.arbitration == "winner_take_all":
        winner = sens.argmax(dim=0, keepdim=True)
        resolved = deltas.gather(0, winner).squeeze(0)
        conflicts = (counts > 1) & (masks & (deltas.sign() != resolved.sign())).any(dim=0)
    else:
        sign = torch.where((sens * deltas.sign()).sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
        agree = masks & (deltas.sign() == sign)
        resolved = (agree * f * deltas).sum(dim=0) / (agree * f).sum(dim=0).clamp(min=torch.finfo(f.dtype).tiny)
        conflicts = (counts > 1) & (masks & (deltas.sign() != sign)).any(dim=0)
    merged = torch.where(counts > 1, resolved, exclusive)
    kept = merged != 0
    support = int(kept.sum())
    if p.density < 1 and support:
        score = (f.mean(dim=0) * merged.square()).reshape(-1)
        score = torch.where(kept.reshape(-1), score, torch.full_like(score, -1.0))
        kept = steps.top_k_mask(score, max(1, int(p.density * support))).reshape(merged.shape)
    n_kept = int(kept.sum())
    scale = 1.0
    if p.rescale == "l1":
        merged, scale = steps.rescale_l1(merged, kept)
    else:
        merged = merged.mul_(kept)
        if p.rescale == "inverse_density" and n_kept:
            scale = support / n_kept
            merged.mul_(scale)
    if p.lambda_ != 1:
        merged.mul_(p.lambda_)
    slot.info.update(
        exclusive=steps.kept_fraction(counts == 1),
        overlap=steps.kept_fraction(counts > 1),
        conflicts=steps.kept_fraction(conflicts),
        density_achieved=support and n_kept / support,
        rescale=scale,
    )
    return slot.base + merged
