"""One run of the installed `mergeaudit` console script per command: the entry point, argument
parsing, exit status and printing of a real process. Every other CLI test, error paths included,
calls mergeaudit.cli.main in-process (the `run_cli` fixture), which takes a fraction of a second
instead of a Python start-up and the imports.

`test_every_command_has_a_smoke_test` keeps this list complete when a command is added."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import yaml

from mergeaudit import tables
from mergeaudit.cli import build_parser
from tests.conftest import free_port
from tests.test_report import MERGES, constructed_run

SMOKED: dict[str, str] = {}


def smokes(command: str):
    """Registers the decorated test as the smoke test of `command`."""

    def register(test):
        SMOKED[command] = test.__name__
        return test

    return register


def committed_results(tmp_path, runs: int = 1) -> str:
    root = str(tmp_path / "results")
    for k in range(runs):
        tables.write_run(root, f"r{k + 1}", f"2026-11-2{k + 5}", constructed_run(MERGES))
    return root


def test_every_command_has_a_smoke_test():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(SMOKED) == set(sub.choices), "add a @smokes(COMMAND) test for each new command"


@smokes("audit")
def test_audit_refuses_a_missing_config_in_one_line(console_script, tmp_path):
    out = console_script("audit", str(tmp_path / "absent.yaml"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert out.stderr.startswith("mergeaudit: error:") and out.stderr.count("\n") == 1 and out.stdout == ""


@smokes("demo")
def test_demo_exits_0(demo_run):
    workdir, stdout = demo_run  # the fixture checks the exit status of the session's one demo
    assert f"report: {workdir}" in stdout


@smokes("geometry")
def test_geometry(console_script, toy_family, tmp_path):
    out = console_script(
        "geometry",
        toy_family.base,
        *[f"{n}={u}" for n, u in toy_family.variants.items()],
        "--out",
        str(tmp_path / "res"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ft_a~ft_b" in out.stdout and tables.read_table(str(tmp_path / "res"), "geometry_pairs").num_rows > 0


@smokes("merge")
def test_merge(console_script, toy_family, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": toy_family.base,
                "parameters": {"density": 0.5, "weight": 1.0},
                "models": [{"model": u} for u in toy_family.variants.values()],
            }
        )
    )
    out = console_script("merge", str(cfg), str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("merged ties of 2 models") and (tmp_path / "merged" / "config.json").is_file()


@smokes("fisher")
def test_fisher(console_script, toy_family, tmp_path):
    from mergeaudit.evaluation.arithmetic import make_problems
    from mergeaudit.fisher import calibration_from_problems

    calibration = calibration_from_problems(make_problems("add", 2, 3, seed=7), tmp_path / "c.jsonl")
    out = console_script(
        "fisher", toy_family.variants["ft_a"], str(calibration), "--out", str(tmp_path / "cache"), "--max-examples", "2"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(tmp_path / "cache"))


@smokes("discover")
def test_discover(console_script, toy_family):
    out = console_script("discover", toy_family.root)
    assert out.returncode == 0 and out.stdout.count("True") == 3, out.stdout


@smokes("convert")
def test_convert(console_script, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    (legacy / "pytorch_model.bin").write_bytes(buf.getvalue())
    out = console_script("convert", str(legacy), str(tmp_path / "st"), "--allow-pickle")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "st" / "model.safetensors").is_file()


@smokes("notify-receiver")
@pytest.mark.integration  # a child process, without the console_script fixture that marks the others
def test_notify_receiver_serves_until_stopped(tmp_path):
    port = free_port()
    script = os.path.join(os.path.dirname(sys.executable), "mergeaudit")
    with open(tmp_path / "receiver.log", "w+") as log:
        proc = subprocess.Popen(
            [script, "notify-receiver", "--prefix", "s3://ckpts/rl", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (tmp_path / "receiver.log").read_text()[-2000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
                        assert json.load(reply) == {"status": "ok"}
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the receiver never answered its health check"
                    time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)  # a service manager's stop; SIGINT does the same
            assert proc.wait(timeout=60) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "listening on" in (tmp_path / "receiver.log").read_text()


@smokes("query")
def test_query(console_script, tmp_path):
    sql = "select run_id, count(*) as n from scores group by run_id"
    out = console_script("query", committed_results(tmp_path), sql)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split() for line in out.stdout.splitlines()[2:]] == [["r1", "12"]]


@smokes("vacuum")
def test_vacuum(console_script, tmp_path):
    out = console_script("vacuum", committed_results(tmp_path))
    assert out.returncode == 0 and "0 files removed" in out.stdout, out.stderr[-2000:]


@smokes("methods")
def test_methods(console_script):
    out = console_script("methods")
    assert out.returncode == 0 and "ties" in out.stdout and "dare_ties" in out.stdout, out.stderr[-2000:]


@smokes("report")
def test_report(console_script, tmp_path):
    out = console_script("report", committed_results(tmp_path), "--out", str(tmp_path / "r.html"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "<html" in (tmp_path / "r.html").read_text().lower()


@smokes("regressions")
def test_regressions(console_script, tmp_path):
    out = console_script("regressions", committed_results(tmp_path, runs=2))
    assert out.returncode == 0 and "run r2: no regressions against r1" in out.stdout, (out.stdout, out.stderr[-2000:])


@smokes("submit")
def test_submit_refuses_a_config_that_does_not_validate(console_script, tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text("base: {name: base, uri: gs://nope/base}\n")
    out = console_script("submit", str(path), "--no-preflight")
    assert out.returncode == 2 and "unknown store scheme 'gs'" in out.stderr and out.stderr.count("\n") == 1
