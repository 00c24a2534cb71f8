"""mergekit 0.1.5's remaining merge methods, with its names, parameters, defaults and semantics:
multislerp, sce, karcher, arcee_fusion, nearswap, passthrough. The same mergekit YAML gives the
same tensors through `mergeaudit merge` as through mergekit, bit for bit on fp32 and bf16
checkpoints (tests/test_merging_mergekit_more.py); each is computed in the slot's compute dtype,
as mergekit computes in its `dtype` (arcee_fusion's last step in at least fp32, as mergekit's).

multislerp    barycentric interpolation on the hypersphere (of the task vectors with a base,
              else of the models): unit vectors u_i = x_i / (|x_i| + eps), their weighted mean m
              normalised, tangent vectors u_i - <u_i, m> m averaged with the weights into v, the
              exponential map m cos|v| + v sin|v| / |v| (|v| + eps), scaled by sum_i w_i |x_i|.
              `weight` per model (required: mergekit has no default), `normalize_weights`
              (default true: w / sum w), `eps` (1e-8). One model: that model, unchanged.
              The weighted tangents at the normalised weighted mean sum to zero, so v = 0 up to
              rounding and the result is m x sum_i w_i |x_i|; the steps are kept anyway, so the
              tensors are mergekit's bit for bit.
sce           FuseChat's Select-Calculate-Erase (arXiv 2408.07990), mergekit's version: task
              vectors d_i; select: with `select_topk` < 1 keep the int(select_topk x nonzero)
              entries of largest variance across the models (population variance), zero the
              rest in every d_i; calculate: w_i = mean(d_i^2) / sum_j mean(d_j^2); erase: TIES
              sign election (sign of sum_i d_i, ties to +); base + sum_i w_i a_i d_i /
              max(sum_i w_i a_i, 1e-6) with a_i the agreeing entries. No per-model weights.
karcher       the Karcher (Riemannian) mean of the inputs' directions on the unit sphere with
              equal weights, by at most `max_iter` (10) fixed-point steps of the exponential map
              (stop when the mean tangent is below `tol`, 1e-5), scaled by the mean norm.
arcee_fusion  the model's update kept where it matters: importance = |x - base| x KL(softmax(x)
              || softmax(base)) over the last dimension (each row; a 1-D tensor is one row,
              softmaxes + 1e-8); keep the entries with importance >= median + 1.5 IQR (quantiles
              as sorted[floor(q (n - 1))]); base + (x - base) x mask. Exactly one model.
nearswap      interpolate from the base towards the model by w = clamp(t / max(|base - x|,
              1e-6), 0, 1) per entry: entries closer than `t` (required) take the model's value,
              farther ones move by t, i.e. base + clamp(x - base, -t, t) for t >= 1e-6.
              Exactly one model.
passthrough   one model's tensor copied, times its `scale` when one is set (per model, default
              none). Multi-source `slices:` (layer stacking) are not per-tensor merges:
              mergekit_yaml refuses any `slices:` key before a tensor is read, and a plan with
              two models fails the arity check.

Interpretation choices (where mergekit's behaviour needed a decision here):
- multislerp: where the weighted mean of the unit vectors vanishes, mergekit interpolates
  linearly for two models and raises for more; here the linear sum is also used for more models
  when every task vector is exactly zero (an untouched tensor merges to the base instead of
  failing the merge), and other cancellations raise ConfigError. Weights that sum to 0 with
  `normalize_weights` are refused (mergekit would divide by zero).
- sce: mergekit's fallback is kept: when the models' mean squared updates sum below 1e-6 (RMS
  updates below about 1e-3 / sqrt(K)) the weights are uniform (1/K), so on small updates SCE
  averages the agreeing entries with equal weights (TIES's disjoint mean) whatever the models'
  update sizes (the threshold is absolute, not relative to the weights' scale). Among equal
  variances at the cut the top-k keeps torch.topk's choice, as mergekit (not lower indices).
  `int8_mask` is accepted and changes nothing (masks are boolean here). `select_topk` outside
  [0, 1] is refused (mergekit treats > 1 as 1 and <= 0 as "erase everything").
- karcher: mergekit's karcher gives the base no special role but averages every input it is
  given, and mergekit adds `base_model` to the inputs; so with a base the base is one more
  point of the mean (last, where mergekit appends it; listing it elsewhere only moves rounding).
  Inputs of norm <= tol are left out of the direction but count (with their tiny norm) in the
  scale.
- arcee_fusion: mergekit estimates the quartiles of a tensor of more than 1,000,000 entries from
  1,000,000 entries drawn with replacement from the global RNG; here they are drawn from the
  slot's keyed generator, so the threshold (and the merge) is reproducible for a seed; smaller
  tensors use exact quartiles, as mergekit does, and give the same tensors. mergekit's mask is
  fp32, so with bf16/fp16 compute the masked update is added to the base in fp32 and the result
  is fp32 (mergekit writes it so); the same here.
- passthrough: mergekit counts the base among its at most one input, and adds a base_model the
  models do not list to the inputs; mergekit_yaml does the same for methods without a base, so
  `base_model: X` with `models: [X]` copies X and a base_model other than the model is refused
  (two models), as by mergekit. `scale` applies to the model whether or not it is the base.

References: SCE has a paper; karcher cites the arXiv paper mergekit 0.1.5 cites for it (the
mean itself is Karcher's, 1977); the other four have none and cite mergekit's documentation.

    from mergeaudit.merging import REGISTRY, TensorSlot
    m = REGISTRY.get("nearswap")
    merged = m.fn(TensorSlot("w", base, (model,)), m.params(t=0.001))
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mergeaudit.errors import ConfigError
from mergeaudit.merging import steps
from mergeaudit.merging.registry import MethodParams, TensorSlot, register

MERGEKIT_DOCS = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
SCE_WEIGHT_FLOOR = 1e-6  # mergekit: below this sum of mean squared updates the weights are uniform
SCE_DIVISOR_FLOOR = 1e-6  # mergekit clamps the agreeing weights' sum to at least this
FUSION_EPS = 1e-8  # added to both softmaxes before the KL divergence (mergekit)
FUSION_SAMPLE = 1_000_000  # above this many entries the quartiles come from a sample (mergekit)
NEARSWAP_MIN_DIFF = 1e-6  # |base - model| floor in nearswap's weight (mergekit)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are taken in: float64 for float64 inputs, else float32 (as mergekit)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- multislerp ------------------------------------------------------------------------------------


class MultiSlerpParams(MethodParams):
    PER_MODEL: ClassVar = {"weight": None}  # required: mergekit has no default weight
    weight: tuple[float | None, ...] = ()
    normalize_weights: bool = True
    eps: float = 1e-8

    def check(self, n_models: int) -> list[str]:
        missing = [i for i, w in enumerate(self.weight) if w is None]
        if missing:
            return [
                f"multislerp needs a weight for every model (mergekit has no default; missing for models {missing})"
            ]
        if self.normalize_weights and abs(sum(self.weight)) < 1e-12:
            return [f"weights sum to 0, so they cannot be normalised (got {list(self.weight)})"]
        if self.eps < 0:
            return [f"eps must be >= 0 (got {self.eps})"]
        return []


@register(
    "multislerp",
    params=MultiSlerpParams,
    base="optional",
    min_models=1,
    example={"weight": 1.0},
    reference=MERGEKIT_DOCS,
)
def multislerp(slot: TensorSlot, p: MultiSlerpParams) -> torch.Tensor:
    """Weighted spherical barycentre of the task vectors (or of the models without a base)."""
    xs = slot.inputs()
    if len(xs) == 1:
        return xs[0].clone()
    dtype, base = slot.compute_dtype, slot.base
    points = torch.stack(xs)
    if base is not None:
        points.sub_(base)
    flat = points.reshape(len(xs), -1)
    w = torch.tensor(p.weight, dtype=dtype, device=flat.device)
    if p.normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + p.eps)
    centre = (units * w[:, None]).sum(0)
    centre_norm = torch.linalg.vector_norm(centre)
    if centre_norm < p.eps:
        if len(xs) != 2 and bool(norms.any()):
            raise ConfigError(
                f"multislerp: the weighted mean of the unit vectors of {slot.name!r} is zero "
                f"(antipodal inputs whose weights cancel, weights {list(p.weight)}); change the weights"
            )
        out = (flat * w[:, None]).sum(0)  # linear: the base itself when every task vector is zero
    else:
        centre = centre / centre_norm
        tangents = units - (units * centre).sum(-1, keepdim=True) * centre
        v = (tangents * w[:, None]).sum(0)
        v_norm = torch.linalg.vector_norm(v) + p.eps
        out = (centre * torch.cos(v_norm) + v * (torch.sin(v_norm) / v_norm)) * (norms.squeeze(-1) * w).sum()
    out = out.reshape(slot.models[0].shape)
    return out + base if base is not None else out


# -- sce -------------------------------------------------------------------------------------------


class SCEParams(MethodParams):
    select_topk: float = 1.0
    int8_mask: bool = False  # accepted for mergekit configs; masks are boolean here either way

    def check(self, n_models: int) -> list[str]:
        if not 0 <= self.select_topk <= 1:
            return [f"select_topk must be in [0, 1] (got {self.select_topk})"]
        return []


def select_by_variance(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's select step: mask of the int(fraction x nonzero) entries whose population variance
    across the models (dim 0) is largest, picked by torch.topk as mergekit picks them (so equal
    variances at the cut, common in bf16, keep the same entries)."""
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction) if fraction > 0 else 0
    keep = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
    if k > 0:
        keep[torch.topk(var.abs().reshape(-1), k).indices] = True
    return keep.reshape(var.shape)


@register("sce", params=SCEParams, min_models=1, reference="https://arxiv.org/abs/2408.07990")
def sce(slot: TensorSlot, p: SCEParams) -> torch.Tensor:
    """Select high-variance entries, weight each model by its mean squared update, erase the
    entries that disagree with the elected sign, average the rest with those weights. Sums over
    the models are first-dimension reductions of the stacked deltas (one rounding, as mergekit)."""
    base = slot.base
    deltas = torch.stack(slot.deltas())
    if p.select_topk < 1:
        keep = select_by_variance(deltas, p.select_topk)
        deltas.mul_(keep)
        slot.info["density_achieved"] = steps.kept_fraction(keep)
    energy = deltas.square().reshape(len(deltas), -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / len(deltas)) if abs(total) < SCE_WEIGHT_FLOOR else energy / total
    slot.info["sce_weights"] = weights.tolist()
    sign = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(base.dtype)  # TIES election, ties to +
    kept = (deltas.sign() == sign) * weights.reshape(-1, *([1] * base.dim()))  # w_i a_i
    merged = (deltas * kept).sum(dim=0)
    return base + merged / kept.sum(dim=0).clamp(min=SCE_DIVISOR_FLOOR)


# -- karcher ---------------------------------------------------------------------------------------


class KarcherParams(MethodParams):
    max_iter: int = 10
    tol: float = 1e-5

    def check(self, n_models: int) -> list[str]:
        problems = []
        if self.max_iter < 0:
            problems.append(f"max_iter must be >= 0 (got {self.max_iter})")
        if self.tol < 0:
            problems.append(f"tol must be >= 0 (got {self.tol})")
        return problems


def karcher_mean(points: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean of the points' directions on the unit sphere times their mean
    norm; norms and stopping tests in float32 (float64 for float64 points)."""
    if len(points) == 1:
        return points[0].clone()
    dtype, wide = points[0].dtype, _wide(points[0].dtype)
    alpha = [1.0 / len(points)] * len(points)
    norms = [torch.linalg.vector_norm(x.to(wide)) for x in points]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(points[0])
    total = sum(alpha[i] for i in valid)
    pairs = [(alpha[i] / total, (points[i] / norms[i]).to(dtype)) for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in pairs:
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(wide))
    mean = pairs[0][1].clone() if float(mean_norm) < tol else (mean / mean_norm).to(dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in pairs:
            cos = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)  # log map of u at mean
        step = torch.linalg.vector_norm(tangent.to(wide))
        if float(step) < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(dtype)  # exp map
        length = torch.linalg.vector_norm(mean.to(wide))
        if float(length) > tol:
            mean = (mean / length).to(dtype)
    scale = sum(a * n for a, n in zip(alpha, norms))
    return (scale * mean).to(dtype)


@register("karcher", params=KarcherParams, base="optional", min_models=1, reference="https://arxiv.org/abs/2603.04972")
def karcher(slot: TensorSlot, p: KarcherParams) -> torch.Tensor:
    """Karcher mean of the models and, when there is one, the base (mergekit averages every input)."""
    points = slot.inputs() + ([slot.base] if slot.base is not None else [])
    return karcher_mean(points, p.max_iter, p.tol)


# -- arcee_fusion ----------------------------------------------------------------------------------


class ArceeFusionParams(MethodParams):
    pass


def fusion_importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| times the KL divergence of softmax(x) from softmax(base) over each row."""
    p = torch.softmax(x, dim=-1) + FUSION_EPS
    q = torch.softmax(base, dim=-1) + FUSION_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (x - base).abs() * kl


def outlier_threshold(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """median + 1.5 IQR of the scores, quantile q being the value of rank floor(q (n - 1));
    from FUSION_SAMPLE entries drawn with replacement when there are more."""
    flat = scores.reshape(-1)
    if flat.numel() > FUSION_SAMPLE:
        picks = torch.randint(flat.numel(), (FUSION_SAMPLE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    n = flat.numel()
    q1, median, q3 = (
        torch.kthvalue(flat.cpu(), int(q * (n - 1)) + 1).values.to(flat.device) for q in (0.25, 0.5, 0.75)
    )
    return median + 1.5 * (q3 - q1)


@register(
    "arcee_fusion",
    params=ArceeFusionParams,
    min_models=1,
    max_models=1,
    symmetric=False,
    stochastic=True,
    reference=MERGEKIT_DOCS,
)
def arcee_fusion(slot: TensorSlot, p: ArceeFusionParams) -> torch.Tensor:
    """The base plus the model's update on its high-importance outliers (random only in the
    quartile sample of tensors above FUSION_SAMPLE entries)."""
    base, x = slot.base, slot.inputs()[0]
    importance = fusion_importance(x, base)
    keep = importance >= outlier_threshold(importance, slot.generator(0))
    slot.info["density_achieved"] = steps.kept_fraction(keep)
    return base + (x - base) * keep.float()  # an fp32 mask, as mergekit's: bf16/fp16 merge into fp32


# -- nearswap --------------------------------------------------------------------------------------


class NearSwapParams(MethodParams):
    t: float


@register(
    "nearswap",
    params=NearSwapParams,
    min_models=1,
    max_models=1,
    symmetric=False,
    example={"t": 0.01},
    reference=MERGEKIT_DOCS,
)
def nearswap(slot: TensorSlot, p: NearSwapParams) -> torch.Tensor:
    """Per entry, from the base towards the model by min(1, t / |base - model|)."""
    base, x = slot.base, slot.inputs()[0]
    w = (p.t / (base - x).abs().clamp(min=NEARSWAP_MIN_DIFF)).clamp(0, 1)
    return w * x + (1 - w) * base


# -- passthrough -----------------------------------------------------------------------------------


class PassthroughParams(MethodParams):
    PER_MODEL: ClassVar = {"scale": None}
    scale: tuple[float | None, ...] = ()


@register("passthrough", params=PassthroughParams, base="none", min_models=1, max_models=1, reference=MERGEKIT_DOCS)
def passthrough(slot: TensorSlot, p: PassthroughParams) -> torch.Tensor:
    """The one model's tensor (a copy), times `scale` when set."""
    x = slot.models[0].to(slot.compute_dtype, copy=True)
    scale = p.scale[0] if p.scale else None
    return x if scale is None else x.mul_(scale)
