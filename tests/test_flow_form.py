"""The Prefect UI renders the merge-audit flow's parameter schema as its run form: every
parameter is described, and a strategy's method is a choice among the registered methods."""

from __future__ import annotations


def test_the_run_form_describes_its_parameters_and_offers_the_methods():
    from mergeaudit.flows.merge_audit import merge_audit
    from mergeaudit.merging import REGISTRY

    schema = merge_audit.parameters.model_dump()
    for name in ("config", "config_uri", "add_models"):
        assert schema["properties"][name].get("description"), f"{name} has no description in the form"
    method = schema["definitions"]["StrategySpec"]["properties"]["method"]
    assert set(method["enum"]) == {m.name for m in REGISTRY.methods()} and "sar" in method["enum"]
    assert method["description"].startswith("Registry name")
