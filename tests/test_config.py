"""AuditConfig: typed, YAML as data, every problem reported at once."""

from __future__ import annotations

import pydantic
import pytest

from mergeaudit.config import load_config, parse_config
from mergeaudit.errors import ConfigError


def base_config(tmp_path, **over) -> dict:
    cfg = {
        "base": {"name": "base", "uri": str(tmp_path / "base")},
        "models": [
            {"name": "a", "uri": str(tmp_path / "a"), "kind": "rlvr"},
            {"name": "b", "uri": "s3://bkt/b", "kind": "sft"},
        ],
        "strategies": [{"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}, "params": {"normalize": True}}],
        "results_uri": str(tmp_path / "results"),
    }
    cfg.update(over)
    return cfg


def test_valid_config_and_grid_expansion(tmp_path):
    cfg = parse_config(base_config(tmp_path))
    assert cfg.strategies[0].points() == [{"normalize": True, "lambda": 0.5}, {"normalize": True, "lambda": 1.0}]
    assert cfg.strategy_models(cfg.strategies[0]) == ["a", "b"]
    assert cfg.evaluation.tasks == ["mergeaudit_add2"]


def test_all_problems_are_reported_together(tmp_path):
    raw = base_config(
        tmp_path,
        results_uri="gs://bucket/r",
        strategies=[
            {"method": "tiez"},
            {"method": "linear", "models": ["zz"]},
            {"method": "linear", "params": {"weights": [1.0]}},
        ],
        evaluation={"tasks": ["nope"], "batch_size": 0},
        extra_key=1,
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    msg = str(info.value)
    for expected in ("unknown store scheme 'gs'", "batch_size", "extra_key"):
        assert expected in msg


@pytest.mark.slow
def test_cross_field_problems_are_reported_together(tmp_path):
    raw = base_config(
        tmp_path,
        models=[{"name": "a", "uri": str(tmp_path / "a")}, {"name": "a", "uri": str(tmp_path / "a2")}],
        strategies=[
            {"method": "tiez"},
            {"method": "linear", "models": ["zz"]},
            {"method": "linear", "params": {"weights": [1.0]}},
            {"method": "ties", "model_params": {"a": {"density": 2.0}}},
            {"method": "sar"},
        ],
        evaluation={"tasks": ["nope"]},
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    msg = str(info.value)
    for expected in (
        "not unique: a",
        "unknown merge method 'tiez'",
        "unknown models zz",
        "linear does not take weights (it takes: normalize, weight)",
        "density must be in [0, 1]",
        "sar) needs a `fisher:` section",
        "unknown task 'nope'",
    ):
        assert expected in msg


def test_yaml_is_data(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_the_first_rounds_alarm_z_still_reads_as_its_one_sided_level():
    from mergeaudit.results.alarm import AlarmSettings

    assert AlarmSettings(z=2.0).significance == pytest.approx(0.02275, abs=1e-5)
    assert AlarmSettings().significance == 0.05
    for bad in ({"z": 2.0, "significance": 0.1}, {"z": float("nan")}, {"z": -1}, {"z": "2"}):
        with pytest.raises(pydantic.ValidationError):
            AlarmSettings(**bad)


def test_a_landed_checkpoint_named_like_a_model_replaces_it_or_is_refused(tmp_path):
    from mergeaudit.config import CheckpointSpec, with_models

    config = parse_config(base_config(tmp_path))
    landed = CheckpointSpec(name="a", uri=str(tmp_path / "runs" / "a-v2"), kind="rlvr")
    replaced = with_models(config, [landed])
    assert [(m.name, m.uri) for m in replaced.models] == [("a", landed.uri), ("b", "s3://bkt/b")]
    assert with_models(config, [config.models[0]]) == config  # the same checkpoint again: nothing changes
    added = with_models(config, [CheckpointSpec(name="c", uri=str(tmp_path / "c"))])
    assert [m.name for m in added.models] == ["a", "b", "c"]
    strict = parse_config(base_config(tmp_path, landed_same_name="refuse"))
    with pytest.raises(ConfigError, match=r"named 'a' like the configured model at .*/a \(landed_same_name: refuse\)"):
        with_models(strict, [landed])
    with pytest.raises(ConfigError, match="the base's name"):
        with_models(config, [CheckpointSpec(name="base", uri=str(tmp_path / "other"))])


def test_fisher_and_cache_locations_are_validated(tmp_path):
    raw = base_config(
        tmp_path,
        fisher={"calibration": "gs://bkt/calib.jsonl", "cache_uri": "ftp://host/fisher"},
        storage={"cache_dir": "s3://bkt/cache"},
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    msg = str(info.value)
    assert "fisher.calibration: unknown store scheme 'gs'" in msg
    assert "fisher.cache_uri: unknown store scheme 'ftp'" in msg
    assert "storage.cache_dir: 's3://bkt/cache' must be a local folder" in msg
