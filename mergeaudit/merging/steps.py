"""The shared steps merge methods are built from: sparsify, elect a sign, aggregate, rescale.

TIES, DARE, breadcrumbs and DELLA are presets over these (mergekit's generalized task
arithmetic), not copies of each other. Magnitude selection is O(n): a k-th value threshold
(`kthvalue` on CPU, `topk` on CUDA where kthvalue is 70x slower), ties broken by index so the
kept count is exact and deterministic. With mergekit's semantics, when equal magnitudes
straddle the threshold (common with bf16/fp16 inputs), the kept entries are those of
mergekit's own sort (torch.argsort, whose order among equal values is its own), so only
those tensors pay for a full sort. Random masks come from the
slot's keyed generator on the CPU, so they are the same on any device and in any order.
"""

from __future__ import annotations

import torch

L1_EPS = 1e-7  # below this the L1 norm is treated as zero and no rescale happens (as mergekit)


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor (1 <= k <= numel)."""
    if a.is_cuda:
        return torch.topk(a, k, sorted=False).values.min()
    return torch.kthvalue(a, a.numel() - k + 1).values


def top_k_mask(a: torch.Tensor, k: int, zeros_free: bool = False, sort_ties: bool = False) -> torch.Tensor:
    """Mask of the k largest entries of a 1-D tensor; among equal values lower indices win,
    or, with `sort_ties`, the entries torch.argsort(a, descending=True)[:k] picks (mergekit's
    selection, whose order among equal values is the sort's own), computed only when equal
    values straddle the threshold.

    `zeros_free` is for magnitudes of an update, where a zero entry contributes nothing
    whether kept or not: the threshold is then searched among the nonzero entries only (an
    RLVR update is 70-95% zeros, so this is 3-20x less work), and when k reaches past them
    the mask is just the nonzero entries.
    """
    n = a.numel()
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(a, dtype=torch.bool)
    values = a
    if zeros_free:
        nonzero = a != 0
        values = a[nonzero]
        if k >= values.numel():
            return nonzero
    thr = kth_largest(values, k)
    del values
    above = a > thr
    need = k - int(torch.count_nonzero(above))
    tied = a == thr
    if int(torch.count_nonzero(tied)) == need:  # the common case: no tie straddles the threshold
        return above | tied
    if sort_ties:
        return sorted_mask(a, 0, k, descending=True)
    return above | (tied & (torch.cumsum(tied, 0, dtype=torch.int32) <= need))


def sorted_mask(a: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """Mask of the entries at positions [lo, hi) of torch.sort(a)'s order (mergekit's way)."""
    mask = torch.zeros_like(a, dtype=torch.bool)
    order = torch.argsort(a, descending=True) if descending else torch.sort(a, descending=False).indices
    mask[order[lo:hi]] = True
    return mask


def rank_window_mask(
    a: torch.Tensor, lo: int, hi: int, zeros_free: bool = False, sort_ties: bool = False
) -> torch.Tensor:
    """Mask of entries whose ascending rank lies in [lo, hi) (the top-k masks are nested);
    `sort_ties`: ranked by torch.sort(a) when equal values straddle a boundary (mergekit)."""
    n = a.numel()
    mask = top_k_mask(a, n - lo, zeros_free) & ~top_k_mask(a, n - hi, zeros_free)
    if sort_ties and int(torch.count_nonzero(mask)) == hi - lo and _clean_cut(a, lo) and _clean_cut(a, hi):
        return mask
    return sorted_mask(a, lo, hi, descending=False) if sort_ties else mask


def _clean_cut(a: torch.Tensor, rank: int) -> bool:
    """True when no value is shared by entries on both sides of ascending rank `rank`."""
    if rank <= 0 or rank >= a.numel():
        return True
    below = torch.kthvalue(a, rank).values  # the largest value below the cut
    above = torch.kthvalue(a, rank + 1).values  # the smallest above it
    return bool(below < above)


def sparsify_magnitude(delta: torch.Tensor, density: float, sort_ties: bool = False) -> torch.Tensor:
    """Keep the max(1, int(density * n)) largest-magnitude entries (mergekit's count);
    `sort_ties`: among equal magnitudes at the threshold, those mergekit keeps."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    return top_k_mask(delta.abs().reshape(-1).float(), k, zeros_free=True, sort_ties=sort_ties).reshape(delta.shape)


def sparsify_outliers(delta: torch.Tensor, density: float, gamma: float, sort_ties: bool = False) -> torch.Tensor:
    """Model breadcrumbs: drop the `gamma` largest magnitudes, then the smallest, keeping
    int(density * n) entries (mergekit: fewer outliers are dropped when needed)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return rank_window_mask(
        delta.abs().reshape(-1).float(), n_bot, n_bot + target, zeros_free=True, sort_ties=sort_ties
    ).reshape(delta.shape)


def sparsify_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (mask drawn on the CPU)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    probs = torch.full(delta.shape, float(density), dtype=torch.float32)
    return torch.bernoulli(probs, generator=generator).bool().to(delta.device)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities: density - eps + 2 eps * (normalised magnitude rank within
    each row); 1-D tensors are one row. Ranks need a per-row sort."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().float().argsort(dim=1).argsort(dim=1).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1).nan_to_num(0.0)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


def sparsify_della(delta: torch.Tensor, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.bernoulli(probs.float().cpu(), generator=generator).bool().to(delta.device)


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mask (in place) and scale so the L1 norm matches the unmasked one (mergekit's DARE/DELLA
    rescale); returns the masked delta and the factor."""
    before = float(delta.abs().sum())
    masked = delta.mul_(kept)
    after = float(masked.abs().sum())
    if before < L1_EPS or after < L1_EPS:
        return masked, 1.0
    return masked.mul_(before / after), before / after


def elect_sign(weighted: list[torch.Tensor]) -> torch.Tensor:
    """TIES sign election over weighted deltas: +1 where their sum is >= 0 (ties to +), else -1."""
    total = torch.zeros_like(weighted[0])
    for d in weighted:
        total.add_(d)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def agreeing(delta: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mask of entries whose sign matches the elected sign (+1/-1; zeros never agree)."""
    return (delta * sign) > 0


def kept_fraction(mask: torch.Tensor) -> float:
    """Fraction of nonzero (True) entries."""
    return int(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 1.0
