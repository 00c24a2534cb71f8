"""The geometry settings: `geometry:` in an audit's YAML, and what every geometry function takes.

One model from the YAML to the kernels: the update masks' tolerances, the spectral figures
(top-k subspaces, exact or randomized SVD), Zhu et al.'s principal weights, and where the
spectral work runs. The randomized SVD's numerics (oversampling, power iterations) are fields
too, with the values measured in benchmarks/bench_geometry.py --accuracy.

    settings = GeometrySettings(top_k_fraction=0.02, device="cuda")
"""

from __future__ import annotations

import pydantic

from mergeaudit.frozen import Frozen


class GeometrySettings(Frozen):
    """Which update-geometry figures to compute, and how (see mergeaudit.geometry)."""

    eta: float = pydantic.Field(1e-3, gt=0, description="Relative tolerance of the `rel` update mask.")
    abs_tol: float = pydantic.Field(1e-5, ge=0, description="Absolute tolerance of the `abs` update mask.")
    spectral: bool = pydantic.Field(True, description="Stable rank, top-k energy shares, principal angles.")
    top_k_fraction: float = pydantic.Field(0.01, gt=0, le=1, description="k as a fraction of min(m, n).")
    exact_max_dim: int = pydantic.Field(1024, ge=1, description="Exact SVD up to this min(m, n); randomized above.")
    exact_max_cost: int = pydantic.Field(
        50_000_000, ge=1, description="...and up to this m * n * min(m, n) (~0.05-0.1 s of fp64 SVD on 2 cores)."
    )
    oversample: int = pydantic.Field(20, ge=0, description="Randomized SVD: extra sketch columns beyond k.")
    power_iters: int = pydantic.Field(6, ge=0, description="Randomized SVD: power iterations (cold start).")
    warm_iters: int = pydantic.Field(2, ge=0, description="Randomized SVD: power iterations from a warm sketch.")
    seed: int = pydantic.Field(0, description="Seed of the randomized SVD's sketch.")
    principal_alpha: float | None = pydantic.Field(
        0.05,
        gt=0,
        le=1,
        description="Zhu et al.'s principal weights: the top alpha of |U_k S_k V_k^T| (null: off). The paper's "
        "value was not found in what we could read: 0.05 is our choice.",
    )
    elected_sign: bool = pydantic.Field(
        True, description="The elected-sign disagreement (one more pass over all models)."
    )
    device: str = pydantic.Field(
        "cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="Where the spectral figures are computed (cuda: on the GPU); exact counts stay on the CPU.",
    )

    def k(self, shape: tuple[int, ...]) -> int:
        """The rank of the top-k subspaces of a matrix of this shape."""
        return max(1, int(round(self.top_k_fraction * min(shape))))

    def exact(self, shape: tuple[int, ...]) -> bool:
        """Whether a matrix of this shape gets an exact SVD (else a randomized one)."""
        m, n = shape
        return min(m, n) <= self.exact_max_dim and m * n * min(m, n) <= self.exact_max_cost
