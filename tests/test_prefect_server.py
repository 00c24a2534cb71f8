"""Integration with a real Prefect server on loopback: deployments from prefect.yaml, process
workers for the `cpu` and `gpu` pools, evaluations routed to the GPU pool, the checkpoint
watcher and its event trigger. Runners are stopped before the server (the other order hangs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from mergeaudit import flows, tables
from mergeaudit.toy import build_toy_family
from tests.conftest import free_port

ROOT = Path(flows.__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
pytestmark = pytest.mark.integration


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A server, the pools and the gcl, every deployment of prefect.yaml, and two workers."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",  # only the runs the tests start
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
    )
    family = build_toy_family(str(tmp / "ckpts"), variants={"ft_a": 0.1, "ft_b": 0.2})
    base_cfg = {
        "name": "itest",
        "base": {"name": "base", "uri": family.base},
        "models": [{"name": "ft_a", "uri": family.variants["ft_a"], "kind": "rlvr"}],
        "strategies": [{"method": "task_arithmetic"}],
        "evaluation": {"limit": 4, "batch_size": 4},
        "results_uri": str(tmp / "results"),
    }
    (tmp / "checkpoint.yaml").write_text(yaml.safe_dump(base_cfg))
    nightly = {
        **base_cfg,
        "routing": "pools",
        "results_uri": str(tmp / "nightly"),
        "models": base_cfg["models"] + [{"name": "ft_b", "uri": family.variants["ft_b"], "kind": "sft"}],
    }
    (tmp / "nightly.yaml").write_text(yaml.safe_dump(nightly))
    watched = tmp / "watched"
    watched.mkdir()
    subprocess.run(["cp", "-r", family.variants["ft_b"], str(watched / "step-100")], check=True)
    env.update(
        MERGEAUDIT_PROJECT_DIR=str(ROOT),
        MERGEAUDIT_NIGHTLY_CONFIG=str(tmp / "nightly.yaml"),
        MERGEAUDIT_CHECKPOINT_CONFIG=str(tmp / "checkpoint.yaml"),
        MERGEAUDIT_WATCH_PREFIX=str(watched),
        MERGEAUDIT_WATCH_STATE=str(tmp / "watch_state.json"),
    )
    procs = []
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(tmp / "server.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1).read() == b"true":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Prefect server did not become healthy: " + (tmp / "server.log").read_text()[-2000:])
        subprocess.run(
            [sys.executable, "-m", "mergeaudit.deployments.setup", "--gpu-slots", "2"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        deploy = subprocess.run(
            [*PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        for pool in ("cpu", "gpu"):
            procs.append(
                subprocess.Popen(
                    [*PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
                    env=env,
                    cwd=tmp,
                    stdout=open(tmp / f"worker-{pool}.log", "wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def drive(*args: str) -> dict:
            out = subprocess.run(
                [sys.executable, "-m", "tests.prefect_driver", *args],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            assert out.returncode == 0, out.stderr[-3000:]
            return json.loads(out.stdout.strip().splitlines()[-1])

        yield {"drive": drive, "tmp": tmp, "watched": watched, "nightly": nightly}
    finally:
        for proc in procs:  # runners first, then the server
            _stop(proc)
        _stop(server)


def test_audit_through_the_api_runs_evaluations_on_the_gpu_pool(deployed):
    run = deployed["drive"]("run", "merge-audit/nightly")
    assert run["state"] == "COMPLETED", run
    assert run["work_pool"] == "cpu"
    children = deployed["drive"]("runs", "evaluate/gpu")["runs"]
    assert len(children) == 4  # base, ft_a, ft_b and one merge
    assert {(c["work_pool"], c["state"]) for c in children} == {("gpu", "COMPLETED")}
    results = deployed["nightly"]["results_uri"]
    assert tables.read_table(results, "candidates").num_rows == 4
    assert set(tables.read_table(results, "scores").column("candidate_id").to_pylist()) == set(
        tables.read_table(results, "candidates").column("candidate_id").to_pylist()
    )
    summary = run["result"]["summary"]
    assert {row["candidate"] for row in summary} == {"base", "ft_a", "ft_b", "task_arithmetic(ft_a+ft_b)"}
    # local inputs are read in place: geometry here, and every child's reads reported back and summed
    read, sizes = run["result"]["bytes_read"], run["result"]["input_sizes"]
    assert read["base"] >= 3 * sizes["base"] and read["ft_a"] >= 2 * sizes["ft_a"], (read, sizes)


def test_watcher_announces_once_and_the_event_triggers_an_audit(deployed):
    first = deployed["drive"]("run", "watch-checkpoints/poll")
    assert first["state"] == "COMPLETED"
    (landed,) = first["result"]
    assert landed["uri"] == str(deployed["watched"] / "step-100") and landed["name"] == "step-100"
    triggered = deployed["drive"]("wait", "merge-audit/on-checkpoint", "1", "300")["runs"]
    assert len(triggered) == 1 and triggered[0]["state"] == "COMPLETED", triggered
    assert triggered[0]["parameters"]["add_models"] == [{"name": "step-100", "uri": landed["uri"], "kind": "rlvr"}]
    assert {r["candidate"] for r in triggered[0]["result"]["summary"]} >= {"step-100"}
    # a restarted watcher (a new flow run in a new process) remembers what it announced
    again = deployed["drive"]("run", "watch-checkpoints/poll")
    assert again["state"] == "COMPLETED" and again["result"] == []
