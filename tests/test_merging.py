"""Merging: the registry's contract, parameter resolution, hand-computed examples per method,
and a conformance suite over the whole registry."""

from __future__ import annotations

import pytest
import torch

from mergeaudit.errors import ConfigError, UnknownMethodError
from mergeaudit.merging import REGISTRY, TensorSlot
from mergeaudit.merging.params import check_all, evaluate, layer_position, resolve
from mergeaudit.merging.registry import MethodParams, Registry


def t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def params(method: str, n: int, shared: dict | None = None, per_model: list[dict] | None = None) -> MethodParams:
    m = REGISTRY.get(method)
    return resolve(m, "model.layers.0.mlp.up_proj.weight", 0.0, {**m.example, **(shared or {})}, per_model or [{}] * n)


def run(method: str, base, *models, fisher=None, shared=None, per_model=None, seed=0) -> list[float]:
    slot = TensorSlot(
        "w",
        t(base) if base is not None else None,
        tuple(t(m) for m in models),
        tuple(f"m{i}" for i in range(len(models))),
        tuple(t(f) for f in fisher) if fisher else None,
        seed,
    )
    return REGISTRY.get(method).fn(slot, params(method, len(models), shared, per_model)).tolist()


# -- registry and parameters -----------------------------------------------------------------------


def test_registry_refuses_duplicates_and_names_known_methods():
    reg = Registry()
    reg.register("m", params=MethodParams, reference="https://example.org")(lambda s, p: s.models[0])
    with pytest.raises(ValueError, match="already registered"):
        reg.register("m", params=MethodParams, reference="https://example.org")(lambda s, p: s.models[0])
    with pytest.raises(UnknownMethodError, match="known methods: .*dare_ties.*sar.*ties"):
        REGISTRY.get("tiez")


def test_every_method_has_a_reference_and_runs_its_own_example():
    for m in REGISTRY.methods():
        assert m.reference.startswith("https://"), m.name
        assert not m.check_inputs(m.example_models, has_base=True), m.name
        params(m.name, m.example_models)  # the example resolves
    with pytest.raises(ValueError, match="https:// link"):
        Registry().register("m", params=MethodParams, reference="the SAR paper")


def test_every_module_of_the_methods_package_registers_a_method():
    from mergeaudit.merging import methods

    defined = {m.fn.__module__ for m in REGISTRY.methods()}
    assert {f"{methods.__name__}.{name}" for name in methods.MODULES} <= defined
    assert len(methods.MODULES) >= 3


def test_gradients_and_filters_resolve_like_mergekit():
    assert layer_position(0, 5) == 0 and layer_position(4, 5) == 1 and layer_position(None, 5) == 0
    assert evaluate([0.1, 0.5, 0.9], "x", 0.25) == pytest.approx(0.3)
    assert evaluate([0.1, 0.5, 0.9], "x", 1.0) == pytest.approx(0.9)
    conds = [{"filter": "mlp", "value": [0.2, 0.4]}, {"value": 0.7}]
    assert evaluate(conds, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.3)
    assert evaluate(conds, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.7
    m = REGISTRY.get("ties")
    p = resolve(m, "model.layers.0.mlp.w", 0.0, {"density": 0.5, "lambda": 2}, [{"density": 0.2}, {}])
    assert p.density == (0.2, 0.5) and p.weight == (1.0, 1.0) and p.lambda_ == 2


def test_bad_parameters_are_reported_together_before_any_tensor():
    tensors = [(f"model.layers.{i}.w", i) for i in range(4)]
    with pytest.raises(ConfigError) as info:
        check_all(
            REGISTRY.get("ties"),
            tensors,
            4,
            {"density": [0.5, 1.5], "bogus": 1, "normalize": True},
            [{"weight": -1.0}, {}],
            has_base=True,
        )
    msg = str(info.value)
    assert "does not take bogus" in msg
    with pytest.raises(ConfigError) as info:
        check_all(
            REGISTRY.get("ties"),
            tensors,
            4,
            {"density": [0.5, 1.5], "normalize": True},
            [{"weight": -1.0}, {}],
            has_base=True,
        )
    msg = str(info.value)
    assert "density must be in [0, 1]" in msg and "and 1 more tensors" in msg
    assert "negative weights" not in msg  # mergekit normalises them (a zero divisor divides by 1)


@pytest.mark.parametrize(
    "method,n,has_base,message",
    [
        ("slerp", 2, True, "slerp merges exactly 1 models besides the base, not 2"),
        ("ties", 2, False, "ties needs a base model"),
        ("model_stock", 1, True, "at least 2"),
        ("nuslerp", 3, True, "exactly 2"),
    ],
)
def test_input_contracts(method, n, has_base, message):
    with pytest.raises(ConfigError, match=message):
        check_all(REGISTRY.get(method), [("w", None)], None, REGISTRY.get(method).example, [{}] * n, has_base)


def test_della_epsilon_must_keep_probabilities_valid():
    with pytest.raises(
        ConfigError, match=r"epsilon must keep density \+- epsilon inside \(0, 1\) \(got density 0.5, epsilon 0.6\)"
    ):
        check_all(REGISTRY.get("della"), [("w", None)], None, {"density": 0.5, "epsilon": 0.6}, [{}], True)
    check_all(REGISTRY.get("della"), [("w", None)], None, {"density": 0.5, "epsilon": 0.4}, [{}], True)


# -- hand-computed examples ------------------------------------------------------------------------


def test_linear():
    assert run("linear", None, [1.0, 2.0], [3.0, 6.0]) == [2.0, 4.0]
    assert run("linear", None, [1.0, 2.0], [3.0, 6.0], per_model=[{"weight": 3.0}, {"weight": 1.0}]) == [1.5, 3.0]
    assert run("linear", None, [1.0], [3.0], shared={"normalize": False}) == [4.0]


def test_task_arithmetic():
    assert run("task_arithmetic", [1.0, 1.0], [2.0, 1.0], [1.0, 3.0]) == [2.0, 3.0]
    assert run("task_arithmetic", [1.0, 1.0], [2.0, 1.0], [1.0, 3.0], shared={"lambda": 0.5}) == [1.5, 2.0]
    assert run(
        "task_arithmetic",
        [1.0, 1.0],
        [2.0, 1.0],
        [1.0, 3.0],
        shared={"normalize": True},
        per_model=[{"weight": 1.0}, {"weight": 3.0}],
    ) == [1.25, 2.5]


def test_ties_magnitude_sign_election_and_both_normalisations():
    base, a, b = [0.0] * 4, [1.0, -2.0, 3.0, 0.5], [-1.0, -1.0, 2.0, 0.1]
    # density 0.5 keeps 2 of 4: a -> [0,-2,3,0]; b -> [-1,0,2,0] (the tie at |1| goes to the lower index)
    assert run("ties", base, a, b, shared={"density": 0.5}) == pytest.approx([-1.0, -2.0, 2.5, 0.0])
    weighted = [{"weight": 2.0}, {"weight": 1.0}]
    assert run("ties", base, a, b, shared={"density": 0.5}, per_model=weighted) == pytest.approx([-1, -2, 8 / 3, 0])
    paper = {"density": 0.5, "semantics": "paper"}
    assert run("ties", base, a, b, shared=paper, per_model=weighted) == pytest.approx([-1.0, -4.0, 4.0, 0.0])


def test_breadcrumbs_drops_outliers_then_small_entries():
    delta = [float(i) for i in range(1, 11)]
    out = run("breadcrumbs", [0.0] * 10, delta, shared={"density": 0.5, "gamma": 0.1})
    assert out == [0, 0, 0, 0, 5, 6, 7, 8, 9, 0]


def test_dare_masks_are_keyed_rescaled_and_order_independent():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(20_000)
    a, b = torch.randn(20_000, generator=g), torch.randn(20_000, generator=g)
    p = params("dare_linear", 2, {"density": 0.3})

    def merge(models, ids, seed=0):
        slot = TensorSlot("layer.w", base, models, ids, None, seed)
        return REGISTRY.get("dare_linear").fn(slot, p), slot.info

    out, info = merge((a, b), ("a", "b"))
    swapped, _ = merge((b, a), ("b", "a"))
    assert torch.equal(out, swapped)  # masks follow the model, not its position
    assert not torch.equal(out, merge((a, b), ("a", "b"), seed=1)[0])
    assert info["density_achieved"] == pytest.approx([0.3, 0.3], abs=0.01)
    # L1 rescale: each masked delta keeps its L1 norm
    alone, _ = merge((a, torch.zeros(20_000)), ("a", "b"))
    assert float(alone.abs().sum()) == pytest.approx(float(a.abs().sum()), rel=1e-4)
    paper = REGISTRY.get("dare_linear").fn(
        TensorSlot("layer.w", base, (a,), ("a",)), params("dare_linear", 1, {"density": 0.3, "semantics": "paper"})
    )
    kept = paper != 0
    assert torch.allclose(paper[kept], a[kept] / 0.3)


def test_della_keeps_about_density_and_prefers_large_magnitudes():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(64, 512, generator=g)
    slot = TensorSlot("w", torch.zeros_like(delta), (delta,), ("a",), None, 0)
    out = REGISTRY.get("della_linear").fn(slot, params("della_linear", 1, {"density": 0.4, "epsilon": 0.2}))
    kept = out != 0
    assert float(kept.float().mean()) == pytest.approx(0.4, abs=0.02)
    big = delta.abs() > delta.abs().median()
    assert float(kept[big].float().mean()) > float(kept[~big].float().mean()) + 0.1


def test_slerp():
    out = run("slerp", [1.0, 0.0], [0.0, 1.0], shared={"t": 0.5})
    assert out == pytest.approx([2**-0.5, 2**-0.5])
    assert run("slerp", [1.0, 1.0], [2.0, 2.0], shared={"t": 0.25}) == pytest.approx([1.25, 1.25])  # collinear


def test_nuslerp_weights_set_t():
    out = run("nuslerp", None, [1.0, 0.0], [0.0, 1.0], per_model=[{"weight": 1.0}, {"weight": 1.0}])
    assert out == pytest.approx([2**-0.5, 2**-0.5])
    with_base = run("nuslerp", [1.0, 1.0], [2.0, 1.0], [1.0, 2.0])
    assert with_base == pytest.approx([1 + 2**-0.5, 1 + 2**-0.5])


def test_model_stock():
    assert run("model_stock", [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]) == pytest.approx([0.0, 0.0])  # orthogonal
    assert run("model_stock", [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]) == pytest.approx([1.0, 1.0])  # agreeing


def test_ram_and_ramplus_keep_unique_updates_whole():
    base, a, b = [0.0, 0.0, 0.0], [1.0, 0.0, 2.0], [0.0, 3.0, 4.0]
    assert run("ram", base, a, b) == pytest.approx([1.0, 3.0, 3.0])
    # each model: 1 shared, 1 unique entry -> rho = 1 -> lambda = 1 + 0.1 * min(1, 0.2) = 1.02
    assert run("ramplus_tl", base, a, b) == pytest.approx([1.02, 3.06, 3.0])


def test_disjoint_mean_uses_the_bf16_update_mask():
    base, a, b = [1.0, 1.0, 1.0], [2.0, 1.0, 3.0], [1.0, 1.0001, 5.0]
    # b's update at index 1 is below bf16 resolution: not an update, a's zero stays zero
    assert run("disjoint_mean", base, a, b) == pytest.approx([2.0, 1.0, 4.0])
    assert run("disjoint_mean", base, a, b, shared={"mask": "abs"}) == pytest.approx([2.0, 1.0001, 4.0], abs=1e-6)
    # +0 -> -0 is no update either (geometry's mask, mergeaudit.updates): b's 2.0 is not halved
    assert run("disjoint_mean", [0.0], [-0.0], [2.0]) == pytest.approx([2.0])


def test_fisher_weighted_average():
    out = run("fisher", [0.0, 0.0], [1.0, 1.0], [3.0, 3.0], fisher=[[1.0, 3.0], [1.0, 1.0]])
    assert out == pytest.approx([2.0, 1.5], rel=1e-4)


def test_gaussian_perturbation_is_scaled_to_the_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 300, generator=g) * 3.0
    slot = TensorSlot("w", None, (x,), ("m",), None, 1)
    out = REGISTRY.get("perturb_gaussian").fn(slot, params("perturb_gaussian", 1, {"scale": 0.1}))
    noise_std = float((out - x).std())
    assert noise_std == pytest.approx(0.1 * float(x.square().mean().sqrt()), rel=0.02)


def test_gaussian_perturbation_scaled_to_the_task_vector_on_its_support():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 300, generator=g)
    support = torch.rand(200, 300, generator=g) < 0.2
    delta = 0.01 * torch.randn(200, 300, generator=g) * support
    x = base + delta
    m = REGISTRY.get("perturb_gaussian")

    def perturb(scale_to: str, model=x):
        slot = TensorSlot("w", base, (model,), ("m",), None, 1)
        return m.fn(slot, params("perturb_gaussian", 1, {"scale": 0.5, "scale_to": scale_to})), slot.info

    tv, info = perturb("task_vector")
    noise = tv - x
    moved = x != base  # the exact support in fp32 (an update can round to nothing)
    assert torch.equal(noise != 0, moved)  # only the update's entries are perturbed
    rms_update = float(delta[moved].square().mean().sqrt())
    assert float(noise[moved].std()) == pytest.approx(0.5 * rms_update, rel=0.03)
    assert info["noise_std"] == pytest.approx(0.5 * rms_update, rel=1e-5)
    assert info["support"] == pytest.approx(0.2, abs=0.01)
    # the same draw as the weight-RMS scaling, only scaled differently
    rms, rms_info = perturb("weight_rms")
    assert torch.allclose((noise / info["noise_std"])[moved], ((rms - x) / rms_info["noise_std"])[moved], atol=1e-3)
    unchanged, _ = perturb("task_vector", model=base.clone())
    assert torch.equal(unchanged, base)


def test_gaussian_task_vector_scaling_needs_a_base():
    m = REGISTRY.get("perturb_gaussian")
    with pytest.raises(ConfigError, match="scale_to: task_vector needs a base model"):
        check_all(m, [("w", None)], None, {"scale": 0.1, "scale_to": "task_vector"}, [{}], has_base=False)
    check_all(m, [("w", None)], None, {"scale": 0.1}, [{}], has_base=False)
    check_all(m, [("w", None)], None, {"scale": 0.1, "scale_to": "task_vector"}, [{}], has_base=True)


# -- conformance over the registry -----------------------------------------------------------------


@pytest.mark.parametrize("method", REGISTRY.names())
def test_conformance(method):
    g = torch.Generator().manual_seed(0)
    m = REGISTRY.get(method)
    n = m.example_models
    base = torch.randn(5, 7, generator=g)
    fisher = tuple(torch.rand(5, 7, generator=g) + 0.1 for _ in range(n))
    ids = tuple(f"m{i}" for i in range(n))
    p = params(method, n)
    # zero updates give the base back
    zero = m.fn(TensorSlot("w", base, tuple(base.clone() for _ in range(n)), ids, fisher, 0), p)
    assert torch.allclose(zero, base, atol=1e-6)
    # shape and dtype kept; deterministic for a seed
    models = tuple(base + 0.1 * torch.randn(5, 7, generator=g) for _ in range(n))
    a = m.fn(TensorSlot("w", base, models, ids, fisher, 7), p)
    b = m.fn(TensorSlot("w", base, models, ids, fisher, 7), p)
    assert a.shape == base.shape and a.dtype == base.dtype and torch.equal(a, b)
    if m.symmetric and n > 1:
        order = list(reversed(range(n)))
        c = m.fn(
            TensorSlot(
                "w",
                base,
                tuple(models[i] for i in order),
                tuple(ids[i] for i in order),
                tuple(fisher[i] for i in order),
                7,
            ),
            p,
        )
        assert torch.allclose(a, c, atol=1e-5)


# -- randomness follows the checkpoint, not the spelling of its path ---------------------------------


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_masks_are_keyed_by_checkpoint_fingerprint(tmp_path, monkeypatch, method):
    from mergeaudit.checkpoint import Checkpoint, write_checkpoint
    from mergeaudit.merging.executor import MergePlan, ModelRef, prepare

    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
    base = {n: torch.randn(64, 64 if "proj" in n else 1, generator=g).squeeze(-1) for n in names}
    update = {n: torch.randn(b.shape, generator=g) * (torch.rand(b.shape, generator=g) < 0.5) for n, b in base.items()}

    def write(name: str, factor: float) -> str:
        tensors = ((n, b + factor * update[n]) for n, b in base.items())
        return write_checkpoint(str(tmp_path / name), tensors, config={"num_hidden_layers": 1})

    base_uri = write("base", 0.0)
    write("a", 1.0)
    write("a_changed", 2.0)  # the same update support, doubled: a new version of "a"
    monkeypatch.chdir(tmp_path)

    def kept(uri: str, model_id: str) -> dict[str, torch.Tensor]:
        """The entries the method kept (its mask on the update's support), per tensor."""
        plan = MergePlan(
            method=method,
            base=ModelRef(id="base", uri=base_uri),
            models=[ModelRef(id=model_id, uri=uri)],
            parameters={"density": 0.5},
            seed=3,
        )
        return {n: t != base[n] for n, t in prepare(plan).stream()}

    spellings = [kept(uri, uri) for uri in ("./a", str(tmp_path / "a"), "a/")] + [kept("a", "another-id")]
    assert all(
        m.keys() == spellings[0].keys() and all(torch.equal(m[n], spellings[0][n]) for n in m) for m in spellings[1:]
    )
    name = names[0]
    assert 0.2 < float(spellings[0][name].float().mean()) < 0.3  # density 0.5 of a 50% update
    changed = kept("a_changed", "./a")
    same = spellings[0][name] == changed[name]
    assert float(same.float().mean()) < 0.85, "a changed checkpoint must draw a new mask"
    fingerprints = [Checkpoint.open(uri).fingerprint for uri in ("./a", "a/", "a_changed")]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
