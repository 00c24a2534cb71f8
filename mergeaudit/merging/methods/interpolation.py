"""Interpolating merges: linear, slerp, nuslerp, model_stock (mergekit 0.1.x semantics); and
perturb_gaussian, the Gaussian-noise fragility probe (noise scaled to the weights' RMS or to the
task vector on its support)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from mergeaudit.merging.registry import MethodParams, TensorSlot, register


class LinearParams(MethodParams):
    PER_MODEL: ClassVar = {"weight": 1.0}
    weight: tuple[float, ...] = ()
    normalize: bool = True

    def check(self, n_models: int) -> list[str]:
        if self.normalize and abs(sum(self.weight)) < 1e-12:
            return [f"weights sum to 0, so they cannot be normalised (got {list(self.weight)})"]
        return []


@register("linear", params=LinearParams, base="none", reference="https://arxiv.org/abs/2203.05482")
def linear(slot: TensorSlot, p: LinearParams) -> torch.Tensor:
    """Model soup: sum_i w_i x_i (divided by sum_i w_i when normalising), in fp32 or wider, on
    the inputs rounded to the compute dtype first and with the weights and their sum as fp32
    (fp64) tensors, as mergekit does."""
    first = slot.models[0]
    dtype = torch.float64 if slot.compute_dtype == torch.float64 else torch.float32
    weights = torch.tensor(p.weight, dtype=dtype, device=first.device)
    out = torch.zeros_like(first, dtype=dtype)
    for x, w in zip(slot.inputs(), weights, strict=True):
        out.addcmul_(x, w)
    if p.normalize:
        out.div_(weights.sum())
    return out.to(slot.compute_dtype)


class SlerpParams(MethodParams):
    t: float


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation of two whole tensors as vectors; linear when nearly collinear."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.to(dtype).reshape(-1), v1.to(dtype).reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        out = (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b
    return out.reshape(v0.shape)


@register(
    "slerp",
    params=SlerpParams,
    min_models=1,
    max_models=1,
    symmetric=False,
    example={"t": 0.3},
    reference="https://dl.acm.org/doi/10.1145/325165.325242",
)  # Shoemake, SIGGRAPH 1985
def slerp_method(slot: TensorSlot, p: SlerpParams) -> torch.Tensor:
    """From the base (t = 0) to the other model (t = 1) along the great circle."""
    return slerp(p.t, slot.base, slot.inputs()[0]).to(slot.compute_dtype)


class NuSlerpParams(MethodParams):
    PER_MODEL: ClassVar = {"weight": 1.0}
    weight: tuple[float, ...] = ()
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register(
    "nuslerp",
    params=NuSlerpParams,
    base="optional",
    min_models=2,
    max_models=2,
    reference="https://github.com/arcee-ai/mergekit",
)
def nuslerp_method(slot: TensorSlot, p: NuSlerpParams) -> torch.Tensor:
    """Slerp of two models (or of their task vectors, with a base) at t = w1 / (w0 + w1)."""
    total = sum(p.weight)
    t = 0.5 if abs(total) < 1e-6 else p.weight[1] / total
    a, b = slot.inputs()
    if slot.base is not None:
        return slot.base + nuslerp(t, a - slot.base, b - slot.base, p.nuslerp_row_wise, p.nuslerp_flatten)
    return nuslerp(t, a, b, p.nuslerp_row_wise, p.nuslerp_flatten)


class ModelStockParams(MethodParams):
    filter_wise: bool = False


@register("model_stock", params=ModelStockParams, min_models=2, reference="https://arxiv.org/abs/2403.19522")
def model_stock(slot: TensorSlot, p: ModelStockParams) -> torch.Tensor:
    """Interpolate between the base and the models' average by the mean pairwise cosine of
    the task vectors: t = K cos / (1 + (K - 1) cos); the base where that is singular."""
    w0, ws = slot.base, slot.inputs()
    shape = w0.shape
    if p.filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, torch.ones_like(denom), denom))
    average = sum(ws) / k
    slot.info["model_stock_t"] = float(t.mean())
    return (t * average + (1 - t) * w0).reshape(shape)


class GaussianParams(MethodParams):
    scale: float
    scale_to: Literal["weight_rms", "task_vector"] = "weight_rms"

    def check(self, n_models: int) -> list[str]:
        return [] if self.scale >= 0 else [f"scale must be >= 0 (got {self.scale})"]

    def check_base(self, has_base: bool) -> list[str]:
        if self.scale_to == "task_vector" and not has_base:
            return ["perturb_gaussian with scale_to: task_vector needs a base model (the task vector is model - base)"]
        return []


@register(
    "perturb_gaussian",
    params=GaussianParams,
    base="optional",
    min_models=1,
    max_models=1,
    stochastic=True,
    example={"scale": 0.0},
    reference="https://arxiv.org/abs/1609.04836",
)  # Keskar et al.: sharpness under weight perturbation
def perturb_gaussian(slot: TensorSlot, p: GaussianParams) -> torch.Tensor:
    """Fragility probe, not a merge: the model plus Gaussian noise e ~ N(0, 1) times a per-tensor
    standard deviation, drawn from the slot's keyed generator (the same draw for both scalings).

    `scale_to: weight_rms` (default): std = `scale` x the tensor's RMS, noise on every entry.
    `scale_to: task_vector`: std = `scale` x the RMS of the task vector d = model - base over
    its support (the entries where d != 0 exactly, in the compute dtype), and noise only on that
    support, as the fragility literature perturbs an update; a tensor the fine-tune left
    unchanged stays unchanged. A base stored in another dtype than the model makes rounding
    differences look like updates (see geometry's dtype check)."""
    x = slot.inputs()[0].float()
    noise = torch.randn(x.shape, generator=slot.generator(0), dtype=torch.float32).to(x.device)
    if p.scale_to == "weight_rms":
        std = float(torch.linalg.vector_norm(x)) / max(1, x.numel()) ** 0.5 * p.scale
        slot.info.update(noise_std=std)
        return (x + noise * std).to(slot.compute_dtype)
    d = x - slot.base.float()
    support = d != 0
    n = int(support.sum())
    std = float(torch.linalg.vector_norm(d)) / n**0.5 * p.scale if n else 0.0
    slot.info.update(noise_std=std, support=n / max(1, x.numel()))
    return (x + noise.mul_(support) * std).to(slot.compute_dtype)
