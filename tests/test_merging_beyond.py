"""Merge methods beyond mergekit (subspace.py, localize.py): hand-computed examples per method.

Small tensors whose SVDs and masks are worked out by hand (the arithmetic is in the comments);
the registry-wide conformance suite in test_merging.py covers zero updates, dtype and symmetry.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergeaudit.errors import ConfigError
from mergeaudit.merging import REGISTRY, TensorSlot
from mergeaudit.merging.params import check_all, resolve


def t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def merge(method: str, base, *deltas, shared=None, per_model=None, dtype=None):
    """(merged, info) for models base + delta_i; base and deltas are nested lists or tensors."""
    base = base if isinstance(base, torch.Tensor) else t(base)
    models = tuple(base + (d if isinstance(d, torch.Tensor) else t(d)) for d in deltas)
    m = REGISTRY.get(method)
    p = resolve(
        m, "model.layers.0.mlp.up_proj.weight", 0.0, {**m.example, **(shared or {})}, per_model or [{}] * len(models)
    )
    slot = TensorSlot("w", base, models, tuple(f"m{i}" for i in range(len(models))), dtype=dtype)
    return m.fn(slot, p), slot.info


def deg(x: float) -> float:
    return math.radians(x)


# -- TSV-Merge -------------------------------------------------------------------------------------


def test_tsv_keeps_each_tasks_top_triplets():
    # 4x4, three tasks: k = 4 // 3 = 1 triplet each. A = diag(3, 1, 0, 0) keeps (e1, 3), drops the 1;
    # B keeps (e3, 2); C keeps (e4, 0.7). The kept vectors are orthonormal already: the merge is
    # diag(3, 0, 2, 0.7).
    a, b, c = torch.diag(t([3, 1, 0, 0])), torch.diag(t([0, 0, 2, 0.5])), torch.diag(t([0, 0, 0, 0.7]))
    out, info = merge("tsv", torch.zeros(4, 4), a, b, c)
    assert torch.allclose(out, torch.diag(t([3, 0, 2, 0.7])), atol=1e-6)
    assert info["rank_kept"] == [1, 1, 1] and info["interference"] == pytest.approx(0, abs=1e-6)
    # rank_fraction 0.5: two triplets each; B's (e4, 0.5) now kept, C's e4 collides with it
    two, info = merge("tsv", torch.zeros(4, 4), a, b, shared={"rank_fraction": 0.5})
    assert torch.allclose(two, torch.diag(t([3, 1, 2, 0.5])), atol=1e-6) and info["rank_kept"] == [2, 2]


def test_tsv_decorrelates_left_vectors_symmetrically():
    # A = 2 u_a e1^T with u_a at 0 degrees, B = 1 u_b e2^T with u_b at 60 degrees; one triplet each.
    # The nearest orthonormal pair to (u_a, u_b) turns both 15 degrees away from their bisector
    # (30 degrees): u_a -> -15, u_b -> 75. V = (e1, e2) is orthonormal already. Merge: columns
    # 2 u_a' and 1 u_b'.
    a = t([[2.0, 0.0], [0.0, 0.0]])
    b = t([[0.0, math.cos(deg(60))], [0.0, math.sin(deg(60))]])
    base = t([[1.0, -1.0], [0.5, 2.0]])
    want = t([[2 * math.cos(deg(-15)), math.cos(deg(75))], [2 * math.sin(deg(-15)), math.sin(deg(75))]])
    out, info = merge("tsv", base, a, b)
    assert torch.allclose(out - base, want, atol=1e-5)
    assert info["interference"] == pytest.approx(math.sqrt(2) * 0.5, rel=1e-5)  # off-diagonals cos 60
    swapped, _ = merge("tsv", base, b, a)
    assert torch.allclose(swapped, out, atol=1e-6)
    halved, _ = merge("tsv", base, a, b, shared={"alpha": 0.5})
    assert torch.allclose(halved - base, 0.5 * want, atol=1e-5)


def test_tsv_a_zero_task_vector_adds_no_directions():
    # the untouched tensor of one model contributes no singular vectors; otherwise an arbitrary
    # basis vector of its null space would be orthogonalised against e1 and e2 and rotate them
    a, c = torch.diag(t([2, 0, 0])), torch.diag(t([0, 1, 0]))
    out, info = merge("tsv", torch.zeros(3, 3), a, torch.zeros(3, 3), c)
    assert torch.allclose(out, torch.diag(t([2, 1, 0])), atol=1e-6)
    assert info["rank_kept"] == [1, 0, 1]


def test_tsv_one_task_at_full_rank_is_the_task_vector_and_vectors_take_the_mean():
    g = torch.Generator().manual_seed(0)
    base, d = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    out, info = merge("tsv", base, d, shared={"alpha": 0.5})  # 1 model: k = 3, all triplets
    assert torch.allclose(out, base + 0.5 * d, atol=1e-5) and info["rank_kept"] == [3]
    vec, _ = merge("tsv", [1.0, 1.0], [1.0, 0.0], [0.0, 2.0], shared={"alpha": 2.0})
    assert vec.tolist() == pytest.approx([2.0, 3.0])  # 1 + 2 * mean
    with pytest.raises(ConfigError, match=r"rank_fraction must be in \(0, 1\]"):
        check_all(REGISTRY.get("tsv"), [("w", None)], None, {"rank_fraction": 1.5}, [{}, {}], True)


# -- Iso-C and Iso-CTS -----------------------------------------------------------------------------


def test_iso_c_flattens_the_spectrum_of_the_sum():
    # sum = [[2, 1], [1, 2]]: singular values 3 and 1 (eigenvalues, it is symmetric positive
    # definite), so U V^T = I and the mean is 2: the update is 2 I.
    base = t([[1.0, 0.5], [-1.0, 0.0]])
    out, info = merge("iso_c", base, [[2.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 2.0]])
    assert torch.allclose(out - base, 2 * torch.eye(2), atol=1e-5)
    assert info["rank"] == 2 and info["sigma_mean"] == pytest.approx(2.0)
    # sum = [[0, 3], [1, 0]]: singular values 3, 1; U V^T is the swap [[0, 1], [1, 0]]; scaled by alpha
    out, _ = merge(
        "iso_c", torch.zeros(2, 2), [[0.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]], shared={"alpha": 0.5}
    )
    assert torch.allclose(out, t([[0.0, 1.0], [1.0, 0.0]]), atol=1e-5)


def test_iso_c_spectrum_is_the_nonzero_singular_values():
    # sum = diag(3, 0) has rank 1: its one direction keeps 3 (the paper's mean over both singular
    # values, 1.5, would also put 1.5 on a null direction that any SVD routine may choose)
    out, info = merge("iso_c", torch.zeros(2, 2), [[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(out, t([[3.0, 0.0], [0.0, 0.0]]), atol=1e-6)
    assert info["rank"] == 1 and info["sigma_mean"] == pytest.approx(3.0)
    vec, _ = merge("iso_c", [0.0, 0.0], [1.0, 2.0], [3.0, 0.0])
    assert vec.tolist() == pytest.approx([2.0, 1.0])  # 1-D: the mean of the task vectors


def test_iso_cts_keeps_task_specific_directions_the_sum_cancels():
    # 4x4, two tasks, common_space_fraction 0.5: k = 2 common, s = 1 per task.
    # A = diag(4, 2, 1, 0), B = diag(4, 2, -1, 2): sum = diag(8, 4, 0, 2); common = e1 (8), e2 (4).
    # Residuals: A -> diag(0, 0, 1, 0), top (e3, 1); B -> diag(0, 0, -1, 2), top (e4, 2).
    # All four directions orthonormal; sigma_mean = (8 + 4 + 1 + 2) / 4 = 3.75: update 3.75 I.
    a, b = torch.diag(t([4, 2, 1, 0])), torch.diag(t([4, 2, -1, 2]))
    out, info = merge("iso_cts", torch.zeros(4, 4), a, b, shared={"common_space_fraction": 0.5})
    assert torch.allclose(out, 3.75 * torch.eye(4), atol=1e-5)
    assert info["common_rank"] == 2 and info["task_rank"] == [1, 1] and info["sigma_mean"] == pytest.approx(3.75)
    # Iso-C loses A's e3 (cancelled in the sum): rank 3, mean (8 + 4 + 2) / 3
    iso, info = merge("iso_c", torch.zeros(4, 4), a, b)
    assert torch.allclose(iso, 14 / 3 * torch.diag(t([1, 1, 0, 1])), atol=1e-5) and info["rank"] == 3


def test_iso_cts_with_no_room_for_task_directions_is_iso_c():
    # 5x7, three tasks, fraction 0.8: k = 4, s = round(1 / 3) = 0, so k becomes 5: all common
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 7, generator=g)
    deltas = [0.1 * torch.randn(5, 7, generator=g) for _ in range(3)]
    cts, info = merge("iso_cts", base, *deltas, shared={"common_space_fraction": 0.8})
    iso, _ = merge("iso_c", base, *deltas)
    assert info["common_rank"] == 5 and torch.allclose(cts, iso, atol=1e-5)
    with pytest.raises(ConfigError, match=r"common_space_fraction must be in \[0, 1\]"):
        check_all(REGISTRY.get("iso_cts"), [("w", None)], None, {"common_space_fraction": 2}, [{}, {}], True)


def test_iso_cts_subspace_sizes_follow_the_authors_rounding():
    # 4x4, three tasks, fraction 0.5: k = 2, s = round(2 / 3) = 1 (not 2 // 3 = 0), k becomes 4 - 3
    # = 1. A, B, C = diag(5, 1, 0, 0), diag(5, 0, 2, 0), diag(5, 0, 0, 3): common e1 (15), task
    # directions e2 (1), e3 (2), e4 (3); sigma_mean = 21 / 4.
    deltas = [torch.diag(t(v)) for v in ([5, 1, 0, 0], [5, 0, 2, 0], [5, 0, 0, 3])]
    out, info = merge("iso_cts", torch.zeros(4, 4), *deltas, shared={"common_space_fraction": 0.5})
    assert info["common_rank"] == 1 and info["task_rank"] == [1, 1, 1]
    assert torch.allclose(out, 5.25 * torch.eye(4), atol=1e-5)
    # 10x10, six tasks, fraction 0.1: k = 1, s = round(9 / 6) = 2 is capped at 10 // 6 = 1, so k = 4
    g = torch.Generator().manual_seed(1)
    _, info = merge(
        "iso_cts",
        torch.zeros(10, 10),
        *[torch.randn(10, 10, generator=g) for _ in range(6)],
        shared={"common_space_fraction": 0.1},
    )
    assert info["common_rank"] == 4 and info["task_rank"] == [1] * 6


def test_iso_cts_a_task_inside_the_common_subspace_adds_no_direction():
    # A = Q diag(4, 2, 0, 0) Q^T lies in the common subspace (q1, q2) of the sum Q diag(8, 4, 0, 1) Q^T;
    # its residual is rounding noise, which must not become a direction worth sigma_mean.
    # Kept: q1 (8), q2 (4), B's q4 (1): update 13/3 Q diag(1, 1, 0, 1) Q^T.
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    a, b = q @ torch.diag(t([4, 2, 0, 0])) @ q.T, q @ torch.diag(t([4, 2, 0, 1])) @ q.T
    out, info = merge("iso_cts", torch.zeros(4, 4), a, b, shared={"common_space_fraction": 0.5})
    assert info["task_rank"] == [0, 1] and info["sigma_mean"] == pytest.approx(13 / 3, rel=1e-5)
    assert torch.allclose(out, 13 / 3 * q @ torch.diag(t([1, 1, 0, 1])) @ q.T, atol=1e-5)


def test_subspace_methods_compute_bf16_in_float32():
    base = torch.zeros(2, 2, dtype=torch.bfloat16)
    out, _ = merge("iso_c", base, t([[2.0, 1.0], [0.0, 0.0]]).bfloat16(), t([[0.0, 0.0], [1.0, 2.0]]).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), 2 * torch.eye(2), atol=1e-2)


# -- consensus merging (TALL masks) ----------------------------------------------------------------

# mask_lambda 0.5; tau_MTL = A + B + C = [2, 2, 0, 0.2, 3, 4.5]; m_t = |tau_t| >= 0.5 |tau_MTL - tau_t|:
#   entry 0: A 1 >= 0.5, B 1 >= 0.5, C 0 >= 1 no                    -> 2 tasks
#   entry 1: A 2 >= 0, B 0 >= 1 no, C no                             -> 1 (selfish)
#   entry 2: nobody moved: 0 >= 0 for all                            -> 3 (value 0)
#   entry 3: A 1 >= 0.4, B 1 >= 0.6, C 0.2 >= 0                      -> 3
#   entry 4: A 1 >= 0.5 * 2 = 1 (equal: >= keeps it), B 2 >= 0.5    -> 2
#   entry 5: A 4 >= 0.25, B 0.5 >= 2 no, C no                        -> 1 (selfish)
TA_A, TA_B, TA_C = [1.0, 2.0, 0.0, 1.0, 1.0, 4.0], [1.0, 0.0, 0.0, -1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.2, 0.0, 0.0]
HALF = {"mask_lambda": 0.5}


def test_consensus_ta_keeps_entries_at_least_k_tasks_need():
    base = [1.0] * 6
    out, info = merge("consensus_ta", base, TA_A, TA_B, TA_C, shared=HALF)
    assert (out - 1).tolist() == pytest.approx([2.0, 0.0, 0.0, 0.2, 3.0, 0.0], abs=1e-6)
    assert info["consensus"] == pytest.approx(4 / 6) and info["removed"] == pytest.approx(2 / 5)
    assert info["tall_density"] == pytest.approx([1.0, 4 / 6, 2 / 6])  # C: entries 2 and 3
    one, _ = merge("consensus_ta", base, TA_A, TA_B, TA_C, shared={**HALF, "k": 1})
    assert (one - 1).tolist() == pytest.approx([2.0, 2.0, 0.0, 0.2, 3.0, 4.5], abs=1e-6)  # task arithmetic
    three, _ = merge("consensus_ta", base, TA_A, TA_B, TA_C, shared={**HALF, "k": 3, "lambda": 0.5})
    assert (three - 1).tolist() == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.0, 0.0], abs=1e-6)


def test_consensus_ta_mask_lambda_is_per_model():
    # B's lambda 0.1: entry 5 becomes 0.5 >= 0.1 * 4, so two tasks need it and it stays
    out, _ = merge("consensus_ta", [0.0] * 6, TA_A, TA_B, TA_C, per_model=[HALF, {"mask_lambda": 0.1}, HALF])
    assert out.tolist() == pytest.approx([2.0, 0.0, 0.0, 0.2, 3.0, 4.5], abs=1e-6)


def test_consensus_k_cannot_exceed_the_models():
    with pytest.raises(ConfigError, match="k must be between 0 and the number of models, 2"):
        check_all(REGISTRY.get("consensus_ta"), [("w", None)], None, {"k": 3}, [{}, {}], True)
    with pytest.raises(ConfigError, match="at least 2"):
        check_all(REGISTRY.get("consensus_ta"), [("w", None)], None, {}, [{}], True)


# A = [1, -2, 3, 0.5], B = [1, 1, -1, 0], density 1 (no trim): elected signs [+, -, +, +];
# TIES disjoint sum [2, -2, 3, 0.5]. Masks against it (lambda 0.5):
#   entry 0: A 1 >= 0.5, B 1 >= 0.5 -> keep; entry 1: B 1 >= 1.5 no; entry 2: B 1 >= 2 no;
#   entry 3: B 0 >= 0.25 no  ->  [2, 0, 0, 0].
# Against the task-arithmetic sum [2, -1, 2, 0.5]: entry 1: A 2 >= 0.5, B 1 >= 1 -> keep -2.
TIES_A, TIES_B = [1.0, -2.0, 3.0, 0.5], [1.0, 1.0, -1.0, 0.0]


def test_consensus_ties_restricts_the_ties_merge():
    full = {**HALF, "density": 1.0}
    out, info = merge("consensus_ties", [0.0] * 4, TIES_A, TIES_B, shared=full)
    assert out.tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0])
    assert info["removed"] == pytest.approx(3 / 4)
    ta_ref, _ = merge("consensus_ties", [0.0] * 4, TIES_A, TIES_B, shared={**full, "mask_reference": "task_arithmetic"})
    assert ta_ref.tolist() == pytest.approx([2.0, -2.0, 0.0, 0.0])
    mean, _ = merge("consensus_ties", [0.0] * 4, TIES_A, TIES_B, shared={**full, "normalize": True})
    assert mean.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])  # disjoint mean: entry 0 is (1 + 1) / 2


def test_consensus_ties_trims_before_electing_but_masks_whole_task_vectors():
    # density 0.5 keeps 2 of 4: A -> [0, -2, 3, 0]; B -> [1, 1, 0, 0] (ties to the lower index).
    # Signs of the sum [1, -1, 3, 0]: [+, -, +, +]; TIES sum [1, -2, 3, 0]. Masks use untrimmed
    # A, B: entry 0 A 1 >= 0, B 1 >= 0 -> keep 1; entry 1 B 1 >= 1.5 no; entry 2 B 1 >= 2 no.
    out, info = merge("consensus_ties", [0.0] * 4, TIES_A, TIES_B, shared={**HALF, "density": 0.5})
    assert out.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert info["density_achieved"] == [0.5, 0.5]


# -- Localize-and-Stitch ---------------------------------------------------------------------------


def test_localize_stitch_averages_overlapping_claims():
    # density 0.2 of 10 entries: 2 per task. A claims entries 0 (4) and 1 (-3), not 2 (0.1);
    # B claims 3 (5) and 0 (2). Entry 0 is claimed twice: (4 + 2) / 2.
    a = [4.0, -3.0, 0.1] + [0.0] * 7
    b = [2.0, 0.0, 0.0, 5.0] + [0.0] * 6
    base = [1.0] * 10
    out, info = merge("localize_stitch", base, a, b, shared={"density": 0.2})
    assert (out - 1).tolist() == pytest.approx([3.0, -3.0, 0.0, 5.0] + [0.0] * 6)
    assert info["density_achieved"] == [0.2, 0.2]
    assert info["claimed"] == pytest.approx(0.3) and info["overlap"] == pytest.approx(0.1)
    # C at density 1 claims only the entry it moved: entry 0 is shared by three, the rest unchanged
    c = [0.5] + [0.0] * 9
    densities = [{"density": 0.2}, {"density": 0.2}, {"density": 1.0}]
    three, info = merge("localize_stitch", base, a, b, c, per_model=densities)
    assert (three - 1).tolist() == pytest.approx([6.5 / 3, -3.0, 0.0, 5.0] + [0.0] * 6)
    assert info["density_achieved"] == pytest.approx([0.2, 0.2, 0.1])


def test_localize_stitch_default_density_against_topk():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, 30, generator=g)
    deltas = [torch.randn(20, 30, generator=g) for _ in range(3)]
    out, info = merge("localize_stitch", base, *deltas, shared={"density": 0.05})
    # independently: each task's 30 (5% of 600) largest magnitudes, overlaps divided by their count
    masks = []
    for d in deltas:
        m = torch.zeros(600, dtype=torch.bool)
        m[torch.topk(d.abs().reshape(-1), 30).indices] = True
        masks.append(m.reshape(20, 30))
    counts = torch.stack(masks).sum(0)
    want = sum(d * m for d, m in zip(deltas, masks, strict=True)) / counts.clamp(min=1)
    assert torch.allclose(out, base + want, atol=1e-5)
    assert info["density_achieved"] == [0.05, 0.05, 0.05]
    assert REGISTRY.get("localize_stitch").params.PER_MODEL["density"] == 0.05
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        check_all(REGISTRY.get("localize_stitch"), [("w", None)], None, {"density": 0.0}, [{}], True)
