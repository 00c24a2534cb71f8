"""The Prefect UI renders a deployment's parameter schema as its run form. Rendered the way
`prefect deploy` does (the flow loaded from prefect.yaml's entrypoint), the merge-audit form
describes every field, offers methods, tasks and devices as choices, shows examples on its JSON
fields, and starts from a config that validates (the UI's Quick Run runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergeaudit import flows

ROOT = Path(flows.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def schema() -> dict:
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    entrypoints = {d["entrypoint"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    (entry,) = [e for e in entrypoints if e.endswith(":merge_audit")]
    return parameter_schema(load_flow_from_entrypoint(str(ROOT / entry))).model_dump()


def undescribed(schema: dict) -> list[str]:
    """Every property of the form and of the models it nests that has no description."""
    missing = [f"parameter {n}" for n, p in schema["properties"].items() if not p.get("description")]
    for model, definition in schema.get("definitions", {}).items():
        props = definition.get("properties", {})
        missing += [f"{model}.{n}" for n, p in props.items() if not p.get("description")]
    return missing


def test_every_field_of_the_form_is_described(schema):
    assert "EvalSettings" in schema["definitions"] and "ProbeSettings" in schema["definitions"]
    assert undescribed(schema) == []


def test_methods_tasks_and_devices_are_choices(schema):
    from mergeaudit.evaluation.runner import shipped_tasks
    from mergeaudit.merging import REGISTRY

    defs = schema["definitions"]
    method = defs["StrategySpec"]["properties"]["method"]
    assert set(method["enum"]) == {m.name for m in REGISTRY.methods()} and "sar" in method["enum"]
    shipped, other = defs["EvalSettings"]["properties"]["tasks"]["items"]["anyOf"]
    assert set(shipped["enum"]) == set(shipped_tasks()) and other["type"] == "string"  # any lm-eval task too
    device = defs["EvalSettings"]["properties"]["device"]
    assert {"auto", "cpu", "cuda"} <= set(device["enum"]) and device["default"] == "auto"
    assert defs["AuditConfig"]["properties"]["routing"]["enum"] == ["inline", "pools"]


def test_the_json_fields_show_examples(schema):
    from mergeaudit.config import StrategySpec

    strategy = schema["definitions"]["StrategySpec"]["properties"]
    for name in ("params", "model_params", "grid"):
        assert strategy[name].get("examples"), f"{name} shows no example"
        assert "e.g." in strategy[name]["description"]
        for example in strategy[name]["examples"]:  # each example is a valid value of its field
            StrategySpec.model_validate({"method": "ties", name: example})


def test_the_form_starts_from_a_config_quick_run_can_run(schema, monkeypatch):
    from mergeaudit import store
    from mergeaudit.config import parse_config

    default = schema["properties"]["config"]["default"]
    monkeypatch.chdir(ROOT)  # the deployments run in the project folder (prefect.yaml's pull step)
    config = parse_config(default, source="the form's default")
    assert len(config.models) >= 2 and config.strategies and config.evaluation.limit
    for ck in [config.base, *config.models]:
        assert store.exists(store.join(ck.uri, "model.safetensors")), ck.uri
    assert not default["results_uri"].startswith("/")  # relative: resolved where the run runs


@pytest.mark.parametrize(
    ("routing", "evaluation", "device"),
    [
        ("pools", {}, "cuda"),
        ("pools", {"device": "auto"}, "cuda"),
        ("pools", {"device": "cpu"}, "cpu"),
        ("inline", {}, "cpu"),
        ("inline", {"device": "cuda"}, "cuda"),
    ],
)
def test_gpu_routing_evaluates_on_cuda_by_default(toy_family, tmp_path, routing, evaluation, device):
    from mergeaudit.config import parse_config

    raw = {
        "base": {"name": "base", "uri": toy_family.base},
        "models": [{"name": "ft_a", "uri": toy_family.variants["ft_a"]}],
        "results_uri": str(tmp_path / "r"),
        "routing": routing,
        "evaluation": evaluation,
    }
    config = parse_config(raw)
    assert config.evaluation.device == device
    assert parse_config(config.model_dump(mode="json")).evaluation.device == device  # what children receive
