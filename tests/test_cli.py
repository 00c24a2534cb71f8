"""The `mergeaudit` command: user errors exit 2 with one line and no traceback.

Each command runs in this process through mergeaudit.cli.main (the `run_cli` fixture);
tests/test_cli_smoke.py runs the installed console script once per command."""

from __future__ import annotations

import pytest
import yaml


def write(tmp_path, cfg) -> str:
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def good_config(toy_family, tmp_path) -> dict:
    return {
        "base": {"name": "base", "uri": toy_family.base},
        "models": [{"name": n, "uri": u} for n, u in toy_family.variants.items()],
        "results_uri": str(tmp_path / "results"),
    }


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c.update(results_uri="gs://bucket/x"), "unknown store scheme 'gs'"),
        (lambda c: c["models"].append({"name": "gone", "uri": "/nonexistent/ckpt"}), "/nonexistent/ckpt"),
        (lambda c: c.update(strategies=[{"method": "tiez"}]), "unknown merge method 'tiez'"),
        (lambda c: c.pop("base"), "base: Field required"),
    ],
)
def test_user_errors_exit_2_with_one_line(run_cli, toy_family, tmp_path, mutate, message):
    cfg = good_config(toy_family, tmp_path)
    mutate(cfg)
    out = run_cli("audit", write(tmp_path, cfg))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    assert len([line for line in out.stderr.splitlines() if line.startswith("mergeaudit: error")]) == 1
    assert not (tmp_path / "results").exists(), "nothing is written for invalid input"


def test_missing_config_file(run_cli, tmp_path):
    out = run_cli("audit", str(tmp_path / "absent.yaml"))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_discover_and_convert_commands(run_cli, toy_family, tmp_path):
    import io

    import torch

    out = run_cli("discover", toy_family.root)
    assert out.returncode == 0 and out.stdout.count("True") == 3, out.stdout
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    (legacy / "pytorch_model.bin").write_bytes(buf.getvalue())
    refused = run_cli("convert", str(legacy), str(tmp_path / "st"))
    assert refused.returncode == 2 and "explicit opt-in" in refused.stderr
    done = run_cli("convert", str(legacy), str(tmp_path / "st"), "--allow-pickle")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "st" / "model.safetensors").is_file()


def test_geometry_command_writes_both_tables(run_cli, toy_family, tmp_path):
    from mergeaudit import tables

    out = run_cli(
        "geometry",
        toy_family.base,
        *[f"{n}={u}" for n, u in toy_family.variants.items()],
        "--out",
        str(tmp_path / "res"),
        "--kind",
        "ft_a=rlvr",
        "--kind",
        "ft_b=sft",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ft_a~ft_b" in out.stdout
    rows = tables.read_table(str(tmp_path / "res"), "geometry_tensors").to_pylist()
    assert {r["kind"] for r in rows if r["model"] == "ft_a"} == {"rlvr"}
    assert tables.read_table(str(tmp_path / "res"), "geometry_pairs").num_rows > 0
    assert tables.read_table(str(tmp_path / "res"), "runs").to_pylist()[0]["audit_name"] == "geometry"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--kind", "nobody=rlvr"], "no model named 'nobody'"),
        (["--kind", "ft_a=dpo"], "kind"),
        (["--top-k-fraction", "2"], "top_k_fraction"),
    ],
)
def test_geometry_command_bad_input(run_cli, toy_family, tmp_path, extra, message):
    out = run_cli(
        "geometry", toy_family.base, f"ft_a={toy_family.variants['ft_a']}", "--out", str(tmp_path / "res"), *extra
    )
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "res").exists()


def _results_with_a_leftover(tmp_path) -> tuple[str, object]:
    from mergeaudit import tables

    root = str(tmp_path / "results")
    tables.write_run(
        root,
        "r1",
        "2026-11-27",
        {"scores": [{"candidate_id": "c1", "task": "t", "metric": "m", "filter": "none", "value": 0.5, "n": 2}]},
    )
    leftover = tmp_path / "results" / "_commits" / ".r2.json.tmp-0123456789ab"
    leftover.write_text("{")
    return root, leftover


def test_vacuum_command_prints_what_it_removed(tmp_path, capsys):
    from mergeaudit.cli import main

    root, leftover = _results_with_a_leftover(tmp_path)
    assert main(["vacuum", root]) == 0  # younger than the default threshold: kept
    assert leftover.exists() and "0 files removed" in capsys.readouterr().out
    assert main(["vacuum", root, "--older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert f"removed {leftover}" in out and "1 files removed" in out and not leftover.exists()


@pytest.mark.parametrize(
    "sql",
    [
        "select * from scores, read_csv('/etc/passwd')",
        "copy scores to '{tmp}/exfil.csv'",
        "select * from read_parquet('{tmp}/results/scores/*/*/*.parquet')",
    ],
)
def test_query_command_cannot_reach_files(tmp_path, capsys, sql):
    from mergeaudit.cli import main

    root, _ = _results_with_a_leftover(tmp_path)
    assert main(["query", root, sql.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mergeaudit: error: query failed: Permission Error" in err
    assert not (tmp_path / "exfil.csv").exists()
    assert main(["query", root, "select task, value from scores"]) == 0
    assert "0.5000" in capsys.readouterr().out
