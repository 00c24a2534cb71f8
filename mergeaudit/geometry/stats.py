"""Per-element statistics of task vectors: update masks, norms, pairwise overlap and alignment.

Everything here is a sum (a count or a sum of products), so a tensor's figures, a layer's and a
model's are the same accumulators added up, and every ratio is derived from sums at whichever
scope is asked for. All per-entry work for a chunk of a tensor happens in two fused numba
kernels (one per model, one per pair), a single pass over the chunk each.

Update masks (an entry "changed"), all on the bf16-cast values, as the papers compute them:
- bf16: base and fine-tune differ after casting both to bf16 (Mukherjee et al., arXiv
  2505.11711); an update below bf16 resolution is no update, and neither is +0 -> -0;
- rel: |w' - w| > eta * max(|w|, |w'|), eta = 1e-3 by default (Zhu et al., arXiv 2511.08567);
- abs: |w' - w| > abs_tol, 1e-5 by default.
Pairwise figures, the elected-sign disagreement and the principal-weight overlap use the bf16
masks; norms, dots and signs use the stored values.

At layer, module and model scope the sparsities are the unweighted mean over tensors, as
Mukherjee et al. report them; `sparsity_bf16_numel_weighted` keeps 1 - changed / numel.
`update_rank_ratio` and `spectral_drift` there are the unweighted means over the 2-D tensors
that have them (see `spectral`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numba
import torch

from mergeaudit.geometry.kernels import elect4_kernel, elect_kernel, kernel_view, model_kernel, pair_kernel
from mergeaudit.updates import changed_bf16  # noqa: F401 - the bf16 mask, shared with merging

# Entries per kernel call. Calls are few and large because launching numba's parallel region
# costs more than cache misses here (measured 10 ms per 16M-entry bf16 set of 4 at 2**23 vs
# 21 ms at 2**20); below 2**24 the fp32 partial counts stay exact.
CHUNK = 1 << 23


class _Sums:
    """Field-wise accumulation of a dataclass of sums (tensor -> layer -> model)."""

    def add(self, other: _Sums) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class ModelSums(_Sums):
    """Sums over entries of one model's update (per tensor, layer, module or model)."""

    numel: int = 0
    changed_bf16: int = 0
    changed_rel: int = 0
    changed_abs: int = 0
    update_sq: float = 0.0
    base_sq: float = 0.0
    n_tensors: int = 0  # tensors with entries, and the sums of their sparsities:
    sparsity_sum_bf16: float = 0.0
    sparsity_sum_rel: float = 0.0
    sparsity_sum_abs: float = 0.0
    principal_numel: int = 0  # entries of tensors with a principal mask
    principal_changed: int = 0  # ... changed
    principal_overlap: int = 0  # ... inside it
    principal_chance: float = 0.0  # expected overlap for an independent mask: changed * |P| / n
    elect_tensors: int = 0  # tensors where the elected sign was computed (>= 2 models)
    elect_shared: int = 0
    elect_disagree: int = 0
    rank_tensors: int = 0  # 2-D tensors with an update rank, and the sum of their ratios
    rank_ratio_sum: float = 0.0
    drift_tensors: int = 0  # 2-D tensors with a spectral drift, and its sum
    drift_sum: float = 0.0

    def add_spectral(self, figures: Mapping[str, object]) -> None:
        """Record one tensor's spectral figures (for the unweighted means at wider scopes)."""
        if figures.get("update_rank_ratio") is not None:
            self.rank_tensors, self.rank_ratio_sum = 1, float(figures["update_rank_ratio"])
        if figures.get("spectral_drift") is not None:
            self.drift_tensors, self.drift_sum = 1, float(figures["spectral_drift"])

    def close(self) -> ModelSums:
        """Record this tensor's own sparsities (call once per tensor, before adding it up)."""
        if self.numel:
            self.n_tensors = 1
            self.sparsity_sum_bf16 = 1 - self.changed_bf16 / self.numel
            self.sparsity_sum_rel = 1 - self.changed_rel / self.numel
            self.sparsity_sum_abs = 1 - self.changed_abs / self.numel
        return self

    def derived(self, principal_alpha: float | None = None) -> dict[str, float | int | None]:
        n, t = self.numel, self.n_tensors
        upd, base = self.update_sq**0.5, self.base_sq**0.5

        def ratio(x: float, y: float) -> float | None:
            return x / y if y > 0 else None

        out = {
            "numel": n,
            "n_tensors": t,
            "changed_bf16": self.changed_bf16,
            "changed_rel": self.changed_rel,
            "changed_abs": self.changed_abs,
            "sparsity_bf16": ratio(self.sparsity_sum_bf16, t),
            "sparsity_rel": ratio(self.sparsity_sum_rel, t),
            "sparsity_abs": ratio(self.sparsity_sum_abs, t),
            "sparsity_bf16_numel_weighted": 1 - self.changed_bf16 / n if n else None,
            "update_norm": upd,
            "base_norm": base,
            "rel_update_norm": upd / base if base > 0 else None,
            "elected_sign_shared": self.elect_shared if self.elect_tensors else None,
            "elected_sign_disagreement": ratio(self.elect_disagree, self.elect_shared),
            "update_rank_ratio": ratio(self.rank_ratio_sum, self.rank_tensors),
            "spectral_drift": ratio(self.drift_sum, self.drift_tensors),
        }
        if principal_alpha is not None and self.principal_numel:
            out.update(
                principal_alpha=principal_alpha,
                principal_changed=self.principal_changed,
                principal_overlap=self.principal_overlap,
                principal_overlap_share=ratio(self.principal_overlap, self.principal_changed),
                principal_overlap_chance=ratio(self.principal_chance, self.principal_changed),
                principal_lift=ratio(self.principal_overlap, self.principal_chance),
            )
        return out


@dataclass
class PairSums(_Sums):
    """Sums over entries of two models' updates A and B (bf16 masks)."""

    numel: int = 0
    changed_a: int = 0
    changed_b: int = 0
    overlap: int = 0
    overlap_chance: float = 0.0  # expected |A and B| for independent masks, summed per tensor
    sign_conflicts: int = 0
    dot: float = 0.0
    a_sq: float = 0.0
    b_sq: float = 0.0
    overlap_dot: float = 0.0
    overlap_a_sq: float = 0.0
    overlap_b_sq: float = 0.0
    fisher_a: float = 0.0  # Fisher mass of A (where Fisher is given), all entries
    fisher_a_overlap: float = 0.0  # ... on entries both changed
    fisher_a_exclusive: float = 0.0  # ... on entries only A changed
    fisher_b: float = 0.0
    fisher_b_overlap: float = 0.0
    fisher_b_exclusive: float = 0.0

    def derived(self) -> dict[str, float | int | None]:
        a, b, ab, chance = self.changed_a, self.changed_b, self.overlap, self.overlap_chance

        def ratio(x: float, y: float) -> float | None:
            return x / y if y > 0 else None

        union, union_chance = a + b - ab, a + b - chance
        out = {
            "numel": self.numel,
            "changed_a": a,
            "changed_b": b,
            "overlap": ab,
            "overlap_chance": chance,
            "overlap_of_a": ratio(ab, a),
            "overlap_of_a_chance": ratio(chance, a),
            "overlap_of_b": ratio(ab, b),
            "overlap_of_b_chance": ratio(chance, b),
            "jaccard": ratio(ab, union),
            "jaccard_chance": ratio(chance, union_chance),
            "sign_conflict_rate": ratio(self.sign_conflicts, ab),
            "cosine": ratio(self.dot, (self.a_sq * self.b_sq) ** 0.5),
            "cosine_overlap": ratio(self.overlap_dot, (self.overlap_a_sq * self.overlap_b_sq) ** 0.5),
            "norm_ratio": ratio(self.a_sq**0.5, self.b_sq**0.5),
        }
        for name in ("overlap_of_a", "overlap_of_b", "jaccard"):
            out[f"{name}_lift"] = ratio(out[name], out[f"{name}_chance"]) if out[name] is not None else None
        for side in ("a", "b"):
            total = getattr(self, f"fisher_{side}")
            out[f"fisher_{side}_overlap_share"] = ratio(getattr(self, f"fisher_{side}_overlap"), total)
            out[f"fisher_{side}_exclusive_share"] = ratio(getattr(self, f"fisher_{side}_exclusive"), total)
        return out


@dataclass
class TensorSums:
    models: list[ModelSums]
    pairs: dict[tuple[int, int], PairSums] = field(default_factory=dict)


def fisher_sums(p: PairSums, fa: torch.Tensor, fb: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add the Fisher mass of models A and B on their overlap and exclusive entries to `p`
    (`a`, `b`: their bf16 update masks)."""
    both = a & b
    for side, f, own, other in (("a", fa.float(), a, b), ("b", fb.float(), b, a)):
        setattr(p, f"fisher_{side}", getattr(p, f"fisher_{side}") + float(f.sum(dtype=torch.float64)))
        setattr(
            p, f"fisher_{side}_overlap", getattr(p, f"fisher_{side}_overlap") + float(f[both].sum(dtype=torch.float64))
        )
        setattr(
            p,
            f"fisher_{side}_exclusive",
            getattr(p, f"fisher_{side}_exclusive") + float(f[own & ~other].sum(dtype=torch.float64)),
        )


def tensor_sums(
    base: torch.Tensor,
    fts: list[torch.Tensor],
    eta: float = 1e-3,
    abs_tol: float = 1e-5,
    elected_sign: bool = True,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> TensorSums:
    """Model and pair sums for one tensor of the base and of each fine-tuned model; `pairs`
    (indices i < j into `fts`) limits the pairs computed (default: all of them).

    The fused kernels read chunks of CHUNK entries in their stored dtype; partial sums are fp32
    within a chunk (per thread and vector lane: counts exact, as CHUNK < 2**24; sums of squares
    and products within 1e-4 relative, checked against an fp64 reference in the tests) and
    fp64 across chunks.
    """
    b_flat = base.reshape(-1)
    ft_flat = [f.reshape(-1) for f in fts]
    n = b_flat.numel()
    out = TensorSums([ModelSums() for _ in fts])
    pairs = list(itertools.combinations(range(len(fts)), 2)) if pairs is None else list(pairs)
    for i, j in pairs:
        out.pairs[(i, j)] = PairSums()
    b_all = kernel_view(b_flat)
    f_all = [kernel_view(f) for f in ft_flat]
    for start in range(0, n, CHUNK):
        b = b_all[start : start + CHUNK]
        fs = [f[start : start + CHUNK] for f in f_all]
        for acc, f in zip(out.models, fs, strict=True):
            c_bf, c_rel, c_abs, usq, bsq = model_kernel(b, f, eta, abs_tol)
            acc.numel += b.shape[0]
            acc.changed_bf16 += int(c_bf)
            acc.changed_rel += int(c_rel)
            acc.changed_abs += int(c_abs)
            acc.update_sq += float(usq)
            acc.base_sq += float(bsq)
        for i, j in pairs:
            ov, conf, dot, odot, oa, ob = pair_kernel(b, fs[i], fs[j])
            p = out.pairs[(i, j)]
            p.numel += b.shape[0]
            p.overlap += int(ov)
            p.sign_conflicts += int(conf)
            p.dot += float(dot)
            p.overlap_dot += float(odot)
            p.overlap_a_sq += float(oa)
            p.overlap_b_sq += float(ob)
        if elected_sign and len(fs) >= 2 and len({f.dtype for f in fs}) == 1:
            if len(fs) <= 4:  # fp32 partial counts are exact below 2**24 entries per chunk
                counts = elect4_kernel(b, *fs, *[b] * (4 - len(fs)))
                shared, disagree = counts[: len(fs)], counts[4 : 4 + len(fs)]
            else:
                shared, disagree = elect_kernel(b, tuple(fs), max(1, numba.get_num_threads()))
            for acc, sh, dis in zip(out.models, shared, disagree, strict=True):
                acc.elect_tensors = 1
                acc.elect_shared += int(sh)
                acc.elect_disagree += int(dis)
    for acc in out.models:
        acc.close()
    for (i, j), p in out.pairs.items():
        a, b = out.models[i], out.models[j]
        p.changed_a, p.changed_b = a.changed_bf16, b.changed_bf16
        p.a_sq, p.b_sq = a.update_sq, b.update_sq
        p.overlap_chance = a.changed_bf16 * b.changed_bf16 / n if n else 0.0
    return out
