"""multislerp, sce, karcher, arcee_fusion, nearswap and passthrough: hand-computed examples, the
refusals, and parity with mergekit 0.1.5 (the same YAML gives the same tensors) on a tiny fp32
Llama family."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.errors import ConfigError
from mergeaudit.merging import REGISTRY, TensorSlot
from mergeaudit.merging.executor import prepare, run_merge
from mergeaudit.merging.mergekit_yaml import load_mergekit_config
from mergeaudit.merging.params import check_all, resolve
from tests import test_mergekit_parity
from tests.test_mergekit_parity import run_mergekit
from tests.test_mergekit_parity_dtypes import assert_same_as_mergekit, family

fp32_family = test_mergekit_parity.fp32_family  # the parity suite's fixture: a tiny fp32 Llama family

R2 = 2**-0.5


def merge(
    method: str, base, *models, shared: dict | None = None, per_model: list[dict] | None = None, dtype=torch.float32
) -> torch.Tensor:
    m = REGISTRY.get(method)
    p = resolve(m, "model.layers.0.mlp.up_proj.weight", 0.0, shared or {}, per_model or [{}] * len(models))
    slot = TensorSlot(
        "w",
        torch.tensor(base, dtype=dtype) if base is not None else None,
        tuple(torch.tensor(x, dtype=dtype) for x in models),
        tuple(f"m{i}" for i in range(len(models))),
    )
    return m.fn(slot, p)


def refused(method: str, n: int, shared: dict, per_model: list[dict] | None = None, has_base: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        check_all(REGISTRY.get(method), [("w", None)], None, shared, per_model or [{}] * n, has_base)
    return str(info.value)


def test_registered_with_mergekit_contracts():
    contracts = {
        name: (m.base, m.min_models, m.max_models, m.symmetric)
        for name in ("multislerp", "sce", "karcher", "arcee_fusion", "nearswap", "passthrough")
        for m in [REGISTRY.get(name)]
    }
    assert contracts == {
        "multislerp": ("optional", 1, None, True),
        "sce": ("required", 1, None, True),
        "karcher": ("optional", 1, None, True),
        "arcee_fusion": ("required", 1, 1, False),
        "nearswap": ("required", 1, 1, False),
        "passthrough": ("none", 1, 1, True),
    }
    assert REGISTRY.get("sce").reference == "https://arxiv.org/abs/2408.07990"
    assert all(REGISTRY.get(n).fn.__module__.endswith("mergekit_more") for n in contracts)


# -- multislerp ------------------------------------------------------------------------------------


def test_multislerp_is_the_normalised_weighted_direction_times_the_weighted_norm():
    w = [{"weight": 1.0}, {"weight": 1.0}]
    assert merge("multislerp", None, [1.0, 0.0], [0.0, 1.0], per_model=w).tolist() == pytest.approx([R2, R2])
    # norms 2 and 1 average to 1.5 along the bisector
    assert merge("multislerp", None, [2.0, 0.0], [0.0, 1.0], per_model=w).tolist() == pytest.approx([1.5 * R2] * 2)
    # weights 3:1 tilt the direction to (3, 1) / sqrt(10) (the tangent-space step adds nothing)
    out = merge("multislerp", None, [1.0, 0.0], [0.0, 1.0], per_model=[{"weight": 3.0}, {"weight": 1.0}])
    assert out.tolist() == pytest.approx([3 / 10**0.5, 1 / 10**0.5], rel=1e-6)
    three = merge("multislerp", None, [2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], shared={"weight": 1.0})
    assert three.tolist() == pytest.approx([2 / 3**0.5] * 3, rel=1e-6)
    # with a base the task vectors are interpolated
    with_base = merge("multislerp", [1.0, 1.0], [2.0, 1.0], [1.0, 2.0], shared={"weight": 1.0})
    assert with_base.tolist() == pytest.approx([1 + R2, 1 + R2], rel=1e-6)
    # without normalisation the weights also scale the norm: (1 + 1) x unit bisector
    loose = merge("multislerp", None, [1.0, 0.0], [0.0, 1.0], shared={"weight": 1.0, "normalize_weights": False})
    assert loose.tolist() == pytest.approx([2 * R2, 2 * R2], rel=1e-6)
    assert merge("multislerp", [0.0, 0.0], [3.0, 4.0], shared={"weight": 0.1}).tolist() == [3.0, 4.0]  # one model


def test_multislerp_cancelling_inputs_fall_back_or_are_refused():
    # two antipodal task vectors: mergekit's linear fallback
    assert merge("multislerp", [1.0, 1.0], [2.0, 1.0], [0.0, 1.0], shared={"weight": 1.0}).tolist() == [1.0, 1.0]
    # an untouched tensor (every task vector zero) merges to the base, for any number of models
    untouched = merge("multislerp", [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], shared={"weight": 1.0})
    assert untouched.tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError, match="weighted mean of the unit vectors .* is zero"):
        merge("multislerp", None, [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], per_model=[{"weight": 1.0}] * 3)


def test_multislerp_needs_every_weight():
    assert "needs a weight for every model" in refused("multislerp", 2, {}, [{"weight": 1.0}, {}])
    assert "weights sum to 0" in refused("multislerp", 2, {}, [{"weight": 1.0}, {"weight": -1.0}])
    check_all(
        REGISTRY.get("multislerp"),
        [("w", None)],
        None,
        {"normalize_weights": False},
        [{"weight": 1.0}, {"weight": -1.0}],
        has_base=False,
    )


# -- sce -------------------------------------------------------------------------------------------


def test_sce_weights_by_mean_square_and_erases_disagreeing_entries():
    base, a, b = [0.0] * 4, [1.0, -2.0, 3.0, 0.0], [-1.0, -1.0, 1.5, 0.5]
    # energies 3.5 and 1.125 -> weights 28/37, 9/37; elected signs of [0, -3, 4.5, 0.5]: + - + +
    out = merge("sce", base, a, b)
    assert out.tolist() == pytest.approx([1.0, -65 / 37, 97.5 / 37, 0.5], rel=1e-6)
    # select_topk 0.5: variances [1, .25, .5625, .0625] keep entries 0 and 2; weights 40/53, 13/53
    out = merge("sce", base, a, b, shared={"select_topk": 0.5})
    assert out.tolist() == pytest.approx([1.0, 0.0, 139.5 / 53, 0.0], rel=1e-6)
    assert merge("sce", [1.0] * 4, [2.0] * 4, shared={"select_topk": 0.0}).tolist() == [1.0] * 4


def test_sce_small_updates_get_uniform_weights_as_in_mergekit():
    # mean squared updates summing below 1e-6 fall back to weights 1/K
    small = merge("sce", [0.0] * 4, [1e-4, -2e-4, 3e-4, 0.0], [-1e-4, -1e-4, 1.5e-4, 0.5e-4])
    assert small.tolist() == pytest.approx([1e-4, -1.5e-4, 2.25e-4, 0.5e-4], rel=1e-5)
    assert "select_topk must be in [0, 1]" in refused("sce", 2, {"select_topk": 1.5})
    assert "sce does not take weight" in refused("sce", 2, {"weight": 1.0})


# -- karcher ---------------------------------------------------------------------------------------


def test_karcher_is_the_spherical_mean_times_the_mean_norm():
    assert merge("karcher", None, [1.0, 0.0], [0.0, 1.0]).tolist() == pytest.approx([R2, R2], rel=1e-6)
    assert merge("karcher", None, [2.0, 0.0], [0.0, 4.0]).tolist() == pytest.approx([3 * R2, 3 * R2], rel=1e-6)
    # two points at angle 0 and one at 90 degrees: the mean angle is 30 degrees, not the
    # Euclidean mean's atan(1/2) = 26.6 degrees
    out = merge("karcher", None, [1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    assert out.tolist() == pytest.approx([math.cos(math.pi / 6), math.sin(math.pi / 6)], abs=1e-5)
    one_step = merge("karcher", None, [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], shared={"max_iter": 0})
    assert one_step.tolist() == pytest.approx([2 / 5**0.5, 1 / 5**0.5], rel=1e-6)
    # a base is one more point of the mean (mergekit adds base_model to the inputs)
    with_base = merge("karcher", [1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    assert with_base.tolist() == pytest.approx(out.tolist(), abs=1e-6)
    # a zero input counts in the scale, not in the direction
    assert merge("karcher", None, [2.0, 0.0], [0.0, 0.0]).tolist() == pytest.approx([1.0, 0.0])
    assert "max_iter must be >= 0" in refused("karcher", 2, {"max_iter": -1})


# -- arcee_fusion ----------------------------------------------------------------------------------


def test_arcee_fusion_keeps_the_outliers_of_importance():
    d = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0]
    base = [[0.0] * 8, [0.5] * 8]
    # one changed row: quartiles of kl x [1..7, 100] at ranks 1, 3, 5 -> threshold kl x (4 + 1.5 x 4)
    out = merge("arcee_fusion", base[:1], [d])
    assert out.tolist() == [[0.0] * 7 + [100.0]]
    # with an unchanged row (KL 0) the quartiles pool 8 zeros: ranks 3, 7, 11 -> 0, 0, 4 kl; keep >= 6
    out = merge("arcee_fusion", base, [d, [0.5] * 8])
    assert out.tolist() == [[0.0] * 5 + [6.0, 7.0, 100.0], [0.5] * 8]
    # most entries unchanged: the threshold is 0 and the whole update is kept
    sparse = [[0.0] * 7 + [3.0]]
    assert merge("arcee_fusion", [[0.0] * 8], sparse).tolist() == sparse
    assert "exactly 1" in refused("arcee_fusion", 2, {})


def test_arcee_fusion_samples_large_tensors_reproducibly():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 1000, generator=g)
    x = base + 0.01 * torch.randn(1100, 1000, generator=g)
    m = REGISTRY.get("arcee_fusion")

    def fuse(seed: int) -> torch.Tensor:
        return m.fn(TensorSlot("w", base, (x,), ("a",), None, seed), m.params())

    first = fuse(0)
    assert torch.equal(first, fuse(0))
    kept = first != base
    assert 0.001 < float(kept.float().mean()) < 0.2  # the outliers of |d| x KL, not everything


# -- nearswap --------------------------------------------------------------------------------------


def test_nearswap_moves_each_entry_at_most_t_towards_the_model():
    out = merge("nearswap", [0.0, 0.0, 0.0, 1.0], [0.5, -0.05, 2.0, 1.0], shared={"t": 0.1})
    assert out.tolist() == pytest.approx([0.1, -0.05, 0.1, 1.0])  # base + clamp(model - base, -t, t)
    assert merge("nearswap", [1.0], [3.0], shared={"t": -1.0}).tolist() == [1.0]
    assert "t: Field required" in refused("nearswap", 1, {})
    assert "exactly 1" in refused("nearswap", 2, {"t": 0.1})


# -- passthrough -----------------------------------------------------------------------------------


def test_passthrough_copies_and_scales_one_model():
    x = torch.tensor([1.0, -2.0])
    m = REGISTRY.get("passthrough")
    copied = m.fn(TensorSlot("w", None, (x,), ("a",)), m.params(scale=(None,)))
    assert torch.equal(copied, x) and copied is not x
    assert merge("passthrough", None, [1.0, -2.0], per_model=[{"scale": 0.5}]).tolist() == [0.5, -1.0]
    assert merge("passthrough", [9.0, 9.0], [1.0, -2.0], shared={"scale": 2.0}).tolist() == [2.0, -4.0]
    bf16 = merge("passthrough", None, [1.0, 3.0], dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.tolist() == [1.0, 3.0]
    assert "exactly 1" in refused("passthrough", 2, {}, has_base=False)


def test_passthrough_slices_are_refused_before_any_tensor(fp32_family, tmp_path):
    cfg = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": fp32_family["a"], "layer_range": [0, 2]}]},
            {"sources": [{"model": fp32_family["b"], "layer_range": [1, 3]}]},
        ],
    }
    path = tmp_path / "frankenmerge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="slices: layer slices are not supported"):
        load_mergekit_config(path)
    # mergekit adds an unlisted base_model to the inputs: two inputs, which passthrough refuses
    other_base = {
        "merge_method": "passthrough",
        "models": [{"model": fp32_family["a"]}],
        "base_model": fp32_family["base"],
    }
    path.write_text(yaml.safe_dump(other_base))
    with pytest.raises(ConfigError, match="passthrough merges exactly 1 models besides the base, not 2"):
        prepare(load_mergekit_config(path))  # checked with the headers, before any tensor is read


# -- parity with mergekit 0.1.5 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def spread_family(fp32_family, tmp_path_factory):
    """Beside fp32_family: its fine-tunes with updates x0.01 (`small_*`: SCE's uniform-weight
    fallback) and two models far from the base and from each other (`far_*`: Karcher's
    iterations and multislerp matter only when the points are far apart on the sphere)."""
    root = str(tmp_path_factory.mktemp("spread"))
    base = Checkpoint.open(fp32_family["base"])
    uris = {}

    def write(name: str, fn) -> None:
        tensors = ((n, fn(n, t)) for n, t in base.iter_tensors())
        uris[name] = write_checkpoint(store.join(root, name), tensors, source=base, dtype=torch.float32)

    for v in ("a", "b", "c"):
        tuned = Checkpoint.open(fp32_family[v])
        write(f"small_{v}", lambda n, t, tuned=tuned: t + 0.01 * (tuned.get(n) - t))
    for i, (keep, spread) in enumerate([(0.0, 1.0), (0.6, 0.5)]):
        g = torch.Generator().manual_seed(100 + i)
        write(
            f"far_{i}",
            lambda n, t, g=g, keep=keep, spread=spread: (
                keep * t + spread * (t.abs().mean() + 1e-2) * torch.randn(t.shape, generator=g)
            ),
        )
    return {**fp32_family, **uris}


def configs(u: dict[str, str]) -> dict[str, dict]:
    m = lambda name, **p: {"model": u[name], **({"parameters": p} if p else {})}  # noqa: E731
    abc = [m("a"), m("b"), m("c")]
    return {
        "multislerp": {
            "models": [m("a", weight=1.0), m("b", weight=2.0), m("c", weight=0.5)],
            "base_model": u["base"],
            "merge_method": "multislerp",
        },
        "multislerp_no_base": {
            "models": [m("a", weight=1.0), m("b", weight=[0.2, 0.8])],
            "merge_method": "multislerp",
            "parameters": {"normalize_weights": False},
        },
        "sce": {"models": abc, "base_model": u["base"], "merge_method": "sce", "parameters": {"select_topk": 0.4}},
        "sce_all": {"models": [m("base"), m("a"), m("b")], "base_model": u["base"], "merge_method": "sce"},
        "multislerp_far": {
            "models": [m("a", weight=1.0), m("far_0", weight=0.5), m("far_1", weight=[1.0, 2.0])],
            "base_model": u["base"],
            "merge_method": "multislerp",
        },
        "sce_small": {
            "models": [m("small_a"), m("small_b"), m("small_c")],
            "base_model": u["base"],
            "merge_method": "sce",
            "parameters": {"select_topk": 0.6},
        },
        "karcher": {"models": abc, "base_model": u["base"], "merge_method": "karcher"},
        "karcher_far": {"models": [m("a"), m("far_0"), m("far_1")], "merge_method": "karcher"},
        "karcher_far_base": {
            "models": [m("far_0"), m("far_1")],
            "base_model": u["base"],
            "merge_method": "karcher",
            "parameters": {"max_iter": 3},
        },
        "karcher_no_base": {
            "models": [m("a"), m("b")],
            "merge_method": "karcher",
            "parameters": {"max_iter": 20, "tol": 1e-7},
        },
        "arcee_fusion": {"models": [m("a")], "base_model": u["base"], "merge_method": "arcee_fusion"},
        "nearswap": {
            "models": [m("b")],
            "base_model": u["base"],
            "merge_method": "nearswap",
            "parameters": {"t": [0.0001, 0.003, 0.001]},
        },
        "passthrough": {"models": [m("a", scale=0.5)], "merge_method": "passthrough"},
        "passthrough_base": {"models": [m("base")], "base_model": u["base"], "merge_method": "passthrough"},
    }


NAMES = ("base", "a", "b", "c", "small_a", "small_b", "small_c", "far_0", "far_1")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(configs({k: "x" for k in NAMES})))
def test_same_tensors_as_mergekit(spread_family, tmp_path, case):
    cfg = {**configs(spread_family)[case], "dtype": "float32"}
    run_mergekit(cfg, str(tmp_path / "mergekit"))
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = run_merge(load_mergekit_config(path), str(tmp_path / "ours"))  # what `mergeaudit merge` runs
    theirs, ours = Checkpoint.open(str(tmp_path / "mergekit")), Checkpoint.open(str(tmp_path / "ours"))
    base, a = Checkpoint.open(spread_family["base"]), Checkpoint.open(spread_family["a"])
    assert sorted(ours.keys()) == sorted(theirs.keys())
    worst, identical, moved = 0.0, 0, 0
    for name in ours.keys():
        x, y = ours.get(name), theirs.get(name)
        assert x.dtype == y.dtype == torch.float32
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), f"{case} {name}: max diff {float((x - y).abs().max())}"
        big = y.abs() > 1e-3
        worst = max(worst, float(((x - y).abs()[big] / y.abs()[big]).max()) if big.any() else 0.0)
        identical += torch.equal(x, y)
        moved += not torch.equal(x, base.get(name)) and not torch.equal(x, a.get(name))
    print(f"\nparity {case}: max relative difference {worst:.2e}, {identical}/{len(ours.keys())} tensors bit-identical")
    assert report["plan"]["method"] == cfg["merge_method"]
    if case != "passthrough_base":
        assert moved, "the merge equals an input everywhere: the comparison would prove nothing"


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    return family(str(tmp_path_factory.mktemp("bf16")), dict.fromkeys(("base", "a", "b", "c"), torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", None])
@pytest.mark.parametrize("case", ["multislerp", "sce", "karcher", "arcee_fusion", "nearswap", "passthrough"])
def test_bf16_checkpoints_bit_identical_to_mergekit(bf16_family, tmp_path, case, dtype):
    """bf16 inputs computed in bf16 (equal variances at SCE's cut, bf16 rounding of every step)
    and without `dtype` (promoted per tensor): the same tensors and dtypes, bit for bit."""
    cfg = {
        **configs({**bf16_family, "far_0": "", "far_1": "", "small_a": "", "small_b": "", "small_c": ""})[case],
        **({"dtype": dtype} if dtype else {}),
    }
    assert_same_as_mergekit(cfg, tmp_path)
