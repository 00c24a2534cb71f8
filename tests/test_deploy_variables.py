"""A deployment made while its environment variables were unset gets empty parameters; its runs
fail at once, naming the variable, instead of a puzzle about an empty store URI."""

from __future__ import annotations

import pytest

from mergeaudit.errors import ConfigError


def test_an_empty_config_uri_names_the_variables():
    from mergeaudit.flows.merge_audit import resolve_config

    with pytest.raises(ConfigError, match=r"\$MERGEAUDIT_NIGHTLY_CONFIG .*\$MERGEAUDIT_CHECKPOINT_CONFIG"):
        resolve_config(None, " ")


@pytest.mark.parametrize(
    ("prefixes", "state_uri", "named"),
    [([""], "/tmp/state.json", "MERGEAUDIT_WATCH_PREFIX"), (["/tmp/ckpts"], "", "MERGEAUDIT_WATCH_STATE")],
)
def test_an_empty_watch_parameter_names_its_variable(prefixes, state_uri, named):
    from mergeaudit.flows.watch import watch_checkpoints

    with pytest.raises(ConfigError, match=rf"\${named} was unset when watch-checkpoints/poll was deployed"):
        watch_checkpoints.fn(prefixes, state_uri)


def test_the_deploy_step_names_every_unset_variable(monkeypatch):
    from mergeaudit.deployments.steps import UnsetVariablesError, require_variables

    monkeypatch.setenv("MERGEAUDIT_PROJECT_DIR", "/srv/mergeaudit")
    monkeypatch.setenv("MERGEAUDIT_WATCH_STATE", " ")  # blank counts as unset
    monkeypatch.delenv("MERGEAUDIT_WATCH_PREFIX", raising=False)
    names = ["MERGEAUDIT_PROJECT_DIR", "MERGEAUDIT_WATCH_PREFIX", "MERGEAUDIT_WATCH_STATE"]
    with pytest.raises(UnsetVariablesError, match=r"poll reads \$MERGEAUDIT_WATCH_PREFIX, \$MERGEAUDIT_WATCH_STATE"):
        require_variables(names, "watch-checkpoints/poll")
    assert require_variables(names[:1]) == {"checked": names[:1]}


def test_every_deployment_checks_the_variables_it_reads_at_deploy_time():
    """prefect.yaml: each deployment's build step names exactly the $MERGEAUDIT_* variables that
    its own definition (and the shared pull step) reads."""
    import re
    from pathlib import Path

    import yaml

    from mergeaudit import flows

    text = (Path(flows.__file__).resolve().parent.parent / "prefect.yaml").read_text()
    spec = yaml.safe_load(text)
    pulled = set(re.findall(r"\$(MERGEAUDIT_\w+)", yaml.safe_dump(spec["pull"])))
    for dep in spec["deployments"]:
        (step,) = dep["build"]
        checked = step["mergeaudit.deployments.steps.require_variables"]["names"]
        reads = pulled | set(
            re.findall(r"\$(MERGEAUDIT_\w+)", yaml.safe_dump({k: v for k, v in dep.items() if k != "build"}))
        )
        assert set(checked) == reads, dep["name"]


def test_setup_refuses_a_heartbeat_timeout_that_would_crash_every_run():
    from datetime import timedelta

    from mergeaudit.deployments import setup

    assert setup.problems(2, 540, 900) == []
    wrong = setup.problems(0, 60, 0)
    assert len(wrong) == 3 and "must exceed the heartbeat interval (180 s" in wrong[1]
    heartbeat, pending = setup.automations(540, 900)
    assert heartbeat.trigger.within == timedelta(seconds=540) and pending.trigger.within == timedelta(seconds=900)
    assert heartbeat.trigger.match_related.root == {
        "prefect.resource.role": "tag",
        "prefect.resource.id": "prefect.tag.mergeaudit",
    }
    assert (
        # Running opens the window too: a run killed before its first heartbeat sends none
        heartbeat.trigger.after == {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}
        and "prefect.flow-run.Completed" in heartbeat.trigger.expect
        and "prefect.flow-run.Running" not in heartbeat.trigger.expect
    )
    assert (
        pending.trigger.after == {"prefect.flow-run.Pending"} and "prefect.flow-run.Running" in pending.trigger.expect
    )
