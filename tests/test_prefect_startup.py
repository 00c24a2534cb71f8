"""The ephemeral Prefect API gets a start-up limit that holds on a loaded 2-core machine (90 s,
not Prefect's 20), and a start-up that still fails is one line naming the setting to raise.

The failure is provoked with a limit of 0 s (Prefect's setting is an integer, and 0 makes it
give up before its first health check), in a child process as `mergeaudit audit` runs."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import yaml

from mergeaudit.checkpoint import write_checkpoint

SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
READ_SETTING = (
    "import mergeaudit.flows; "
    "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; "
    "print(s.value())"
)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (SETTING, "PREFECT_API_URL")}
    env.update(extra)
    return env


def test_flows_raise_the_ephemeral_startup_limit_unless_set():
    out = subprocess.run(
        [sys.executable, "-c", READ_SETTING], capture_output=True, text=True, timeout=300, env=child_env()
    )
    assert out.stdout.strip() == "90", out.stderr[-2000:]
    out = subprocess.run(
        [sys.executable, "-c", READ_SETTING],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(**{SETTING: "45"}),
    )
    assert out.stdout.strip() == "45", "an explicit setting wins"


def test_ephemeral_api_that_does_not_start_is_one_line(tmp_path):
    for name, value in (("base", 0.0), ("ft", 1.0)):
        write_checkpoint(
            str(tmp_path / name), [("model.layers.0.w", torch.full((4, 4), value))], config={"model_type": "llama"}
        )
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": {"name": "base", "uri": str(tmp_path / "base")},
                "models": [{"name": "ft", "uri": str(tmp_path / "ft")}],
                "results_uri": str(tmp_path / "results"),
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "mergeaudit.cli", "audit", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(**{SETTING: "0"}),
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("mergeaudit: error")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and SETTING in errors[0] and "PREFECT_API_URL" in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
