"""Which entries of a tensor an update changed, by the one definition geometry and merging share.

An entry changed when base and fine-tune differ after casting both to bf16 (Mukherjee et al.,
arXiv 2505.11711): an update below bf16 resolution is no update, and neither is +0 -> -0.
Geometry counts these masks (its fused numba kernels compute the same test chunk by chunk);
merge methods that keep updates whole (`disjoint_mean`, `sar`) mask with them. Plain torch, on
any device, so merging needs neither geometry nor numba for it.

    changed = changed_bf16(base_tensor, finetuned_tensor)   # bool tensor, base's shape
"""

from __future__ import annotations

import torch


def changed_bf16(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Mask of entries that differ after casting both to bf16 (+0 -> -0 is no change)."""
    a, b = base.to(torch.bfloat16).view(torch.int16), ft.to(torch.bfloat16).view(torch.int16)
    return (a != b) & ((a | b) & 0x7FFF != 0)
