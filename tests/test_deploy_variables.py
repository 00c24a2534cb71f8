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
