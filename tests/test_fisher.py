"""Diagonal Fisher estimation: correct on a model where it can be computed by hand, cached by
fingerprint, and used by the fisher and sar merges."""

from __future__ import annotations

import json

import pytest
import torch

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint
from mergeaudit.errors import ConfigError
from mergeaudit.evaluation.arithmetic import make_problems
from mergeaudit.fisher import (
    FisherSettings,
    calibration_from_problems,
    compute_fisher,
    estimate_fisher,
    read_calibration,
)
from mergeaudit.modeling import build_model, load_tokenizer


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    problems = make_problems("add", 2, 6, seed=7)
    return str(calibration_from_problems(problems, tmp_path_factory.mktemp("cal") / "c.jsonl"))


def test_fisher_equals_mean_squared_per_example_gradients(toy_family, calibration):
    ck = Checkpoint.open(toy_family.base)
    rows = read_calibration(calibration, 4)
    model = build_model(ck.config, ck.iter_tensors())
    tok = load_tokenizer(ck.uri)
    with torch.enable_grad():
        fisher = compute_fisher(model, tok, rows, FisherSettings(calibration=calibration))
        # by hand for one parameter: mean over examples of (d/dw sum log p(response tokens))^2
        name = "model.norm.weight"
        grads = []
        for row in rows:
            p, r = tok(row["prompt"])["input_ids"], tok(row["response"])["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0, :-1]
            logp = torch.log_softmax(logits, -1)[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)].sum()
            (g,) = torch.autograd.grad(logp, model.get_parameter(name))
            grads.append(g.square())
    assert torch.allclose(fisher[name], torch.stack(grads).mean(0), rtol=1e-4, atol=1e-10)
    assert all((f >= 0).all() for f in fisher.values()) and float(fisher[name].sum()) > 0


def test_estimate_writes_a_cached_checkpoint(toy_family, calibration, tmp_path):
    cache = str(tmp_path / "fisher")
    settings = FisherSettings(calibration=str(calibration), cache_uri=str(cache), max_examples=3)
    uri = estimate_fisher(toy_family.variants["ft_a"], settings)
    ck = Checkpoint.open(uri)
    assert set(ck.keys()) == set(Checkpoint.open(toy_family.base).keys())
    meta = json.loads(store.read_bytes(store.join(uri, "fisher.json")))
    assert meta["examples"] == 3
    assert meta["model_fingerprint"] == Checkpoint.open(toy_family.variants["ft_a"]).fingerprint
    mtime = store.info(store.join(uri, "model.safetensors")).version
    assert estimate_fisher(toy_family.variants["ft_a"], settings) == uri
    assert store.info(store.join(uri, "model.safetensors")).version == mtime, "a cached Fisher is not recomputed"


def test_bad_calibration_fails_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\nnot json\n{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="line 2: not JSON.*line 3: needs string fields"):
        read_calibration(str(bad), 10)
    with pytest.raises(ConfigError, match="calibration file .*absent.jsonl"):
        read_calibration(str(tmp_path / "absent.jsonl"), 10)


@pytest.mark.parametrize("method,params", [("fisher", {}), ("sar", {}), ("sar", {"arbitration": "winner_take_all"})])
def test_fisher_based_merges_run_end_to_end(toy_family, calibration, tmp_path, method, params):
    from mergeaudit.merging.executor import MergePlan, ModelRef, run_merge

    cache = str(tmp_path / "fisher")
    models = [ModelRef(id=n, uri=u) for n, u in toy_family.variants.items()]
    settings = FisherSettings(calibration=str(calibration), cache_uri=str(cache), max_examples=2)
    fisher = {m.id: estimate_fisher(m.uri, settings) for m in models}
    plan = MergePlan(
        method=method, base=ModelRef(id="base", uri=toy_family.base), models=models, parameters=params, fisher=fisher
    )
    report = run_merge(plan, str(tmp_path / "out"))
    assert Checkpoint.open(str(tmp_path / "out")).keys() == Checkpoint.open(toy_family.base).keys()
    if method == "sar":
        info = next(iter(report["tensors"].values()))
        assert 0 <= info["exclusive"] <= 1 and 0 < info["density_achieved"] <= 1
    with pytest.raises(ConfigError, match="needs a diagonal Fisher for every model"):
        run_merge(plan.model_copy(update={"fisher": {}}), str(tmp_path / "out2"))
