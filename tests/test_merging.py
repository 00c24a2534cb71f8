"""Merging: the registry's contract, hand-computed examples, and a conformance suite."""

from __future__ import annotations

import pytest
import torch

from mergeaudit.checkpoint import Checkpoint
from mergeaudit.errors import ConfigError, UnknownMethodError
from mergeaudit.merging import REGISTRY, TensorSlot, merge_stream
from mergeaudit.merging.registry import MethodParams, Registry


def slot(base, *models) -> TensorSlot:
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return TensorSlot("w", t(base) if base is not None else None, tuple(t(m) for m in models))


def run(method: str, s: TensorSlot, **params) -> list[float]:
    p = REGISTRY.parse_params(method, params, n_models=len(s.models), has_base=s.base is not None)
    return REGISTRY.get(method).fn(s, p).tolist()


def test_registry_refuses_duplicates_and_names_known_methods():
    reg = Registry()
    reg.register("m", params=MethodParams, reference="x", needs_base=False)(lambda s, p: s.models[0])
    with pytest.raises(ValueError, match="already registered"):
        reg.register("m", params=MethodParams, reference="x", needs_base=False)(lambda s, p: s.models[0])
    with pytest.raises(UnknownMethodError, match="known methods: .*linear.*task_arithmetic"):
        REGISTRY.get("tiez")


def test_bad_params_are_reported_together():
    with pytest.raises(ConfigError) as info:
        REGISTRY.parse_params("task_arithmetic", {"weights": [1.0], "bogus": 1}, n_models=2, has_base=False)
    msg = str(info.value)
    assert "needs a base model" in msg and "bogus" in msg


def test_weights_must_match_model_count():
    with pytest.raises(ConfigError, match="weights has 1 entries for 2 models"):
        REGISTRY.parse_params("linear", {"weights": [1.0]}, n_models=2, has_base=False)


def test_linear_hand_example():
    assert run("linear", slot(None, [1.0, 2.0], [3.0, 6.0])) == [2.0, 4.0]
    assert run("linear", slot(None, [1.0, 2.0], [3.0, 6.0]), weights=[3.0, 1.0]) == [1.5, 3.0]
    assert run("linear", slot(None, [1.0], [3.0]), weights=[1.0, 1.0], normalize=False) == [4.0]


def test_task_arithmetic_hand_example():
    s = slot([1.0, 1.0], [2.0, 1.0], [1.0, 3.0])
    assert run("task_arithmetic", s) == [2.0, 3.0]
    assert run("task_arithmetic", s, **{"lambda": 0.5}) == [1.5, 2.0]
    assert run("task_arithmetic", s, weights=[1.0, 3.0], normalize=True) == [1.25, 2.5]


@pytest.mark.parametrize("method", REGISTRY.names())
def test_conformance(method):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    m = REGISTRY.get(method)
    p = REGISTRY.parse_params(method, {}, n_models=3, has_base=True)
    # zero updates give the base back
    out = m.fn(TensorSlot("w", base, (base.clone(), base.clone(), base.clone())), p)
    assert torch.allclose(out, base, atol=1e-6)
    # shape and dtype kept; deterministic
    models = tuple(base + 0.1 * torch.randn(5, 7, generator=g) for _ in range(3))
    a = m.fn(TensorSlot("w", base, models), p)
    b = m.fn(TensorSlot("w", base, models), p)
    assert a.shape == base.shape and a.dtype == base.dtype and torch.equal(a, b)
    if m.symmetric:
        c = m.fn(TensorSlot("w", base, models[::-1]), p)
        assert torch.allclose(a, c, atol=1e-6)


def test_merge_stream_keeps_the_stored_dtype_and_is_exact(toy_family):
    base = Checkpoint.open(toy_family.base)
    models = [Checkpoint.open(u) for u in toy_family.variants.values()]
    p = REGISTRY.parse_params("task_arithmetic", {"lambda": 1.0}, n_models=2, has_base=True)
    for name, merged in merge_stream("task_arithmetic", p, base, models):
        b = base.get(name).float()
        expected = b + sum(m.get(name).float() - b for m in models)
        assert merged.dtype == torch.bfloat16
        assert torch.equal(merged, expected.to(torch.bfloat16))
