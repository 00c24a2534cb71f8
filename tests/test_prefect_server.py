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
from pathlib import Path

import pytest
import yaml

from mergeaudit import flows, tables
from mergeaudit.toy import build_toy_family
from tests.conftest import alive, free_port, start_prefect_server, stop_process

ROOT = Path(flows.__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
pytestmark = pytest.mark.integration


def run_processes(worker_pid: int) -> dict:
    """The processes a worker launched for flow runs, by flow-run id."""
    import psutil

    found = {}
    for proc in psutil.Process(worker_pid).children(recursive=True):
        try:
            run = proc.environ().get("PREFECT__FLOW_RUN_ID")
        except psutil.Error:
            continue
        if run:
            found[run] = proc
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """What a machine dying does to a worker: SIGKILL to it and every process under it (its flow
    runs run in sessions of their own, so the process group is not enough)."""
    import psutil

    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


HEARTBEAT = 30  # seconds between flow-run heartbeats (Prefect's minimum) for the workers' runs
HEARTBEAT_TIMEOUT = 75  # the zombie automation: a run silent this long is marked Crashed
PENDING_TIMEOUT = 60
# minutes of sampling per evaluation (100 prompts x 128 samples; 16 samples took 25 s here), so
# both children still run when their worker dies: the first starts ~10 s before the second, and
# the whole of add2 greedy takes 3 s
LONG_EVAL = {"limit": 100, "batch_size": 4, "device": "cpu", "num_samples": 128, "temperature": 1.0}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A server, the pools, the gcl and the automations, every deployment of prefect.yaml, and
    a worker per pool (`workers` starts and stops them)."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",  # only the runs the tests start
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT),
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
        "evaluation": {**base_cfg["evaluation"], "device": "cpu"},  # pools default to cuda; no GPU here
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
    workers: dict[str, subprocess.Popen] = {}

    def start_worker(pool: str) -> subprocess.Popen:
        workers[pool] = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
            env=env,
            cwd=tmp,
            stdout=open(tmp / f"worker-{pool}.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return workers[pool]

    server = start_prefect_server(env, port, tmp / "server.log")
    try:
        setup = [
            *("--gpu-slots", "2", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)),
            *("--pending-timeout", str(PENDING_TIMEOUT)),
        ]
        subprocess.run(
            [sys.executable, "-m", "mergeaudit.deployments.setup", *setup],
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
            start_worker(pool)

        def drive(*args: str, timeout: float = 1200) -> dict:
            out = subprocess.run(
                [sys.executable, "-m", "tests.prefect_driver", *args],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            assert out.returncode == 0, out.stderr[-3000:]
            return json.loads(out.stdout.strip().splitlines()[-1])

        yield {
            "drive": drive,
            "tmp": tmp,
            "env": env,
            "watched": watched,
            "nightly": nightly,
            "checkpoint": base_cfg,
            "family": family,
            "workers": workers,
            "start_worker": start_worker,
        }
    finally:
        for proc in workers.values():  # runners first, then the server
            stop_process(proc)
        stop_process(server)


def ids(runs: list[dict]) -> str:
    return ",".join(r["id"] for r in runs) or "-"


def test_a_deployment_whose_variables_are_unset_is_refused_at_deploy_time(deployed):
    env = {k: v for k, v in deployed["env"].items() if k != "MERGEAUDIT_NIGHTLY_CONFIG"}
    out = subprocess.run(
        [*PREFECT, "--no-prompt", "deploy", "--name", "nightly"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "merge-audit/nightly reads $MERGEAUDIT_NIGHTLY_CONFIG at deploy time" in out.stdout + out.stderr
    kept = deployed["drive"]("deployment", "merge-audit/nightly")["parameters"]
    assert kept["config_uri"] == str(deployed["tmp"] / "nightly.yaml")  # the deployment is left as it was


def test_setup_creates_the_zombie_automations_and_the_gpu_pool_limit(deployed):
    from mergeaudit.deployments.setup import HEARTBEAT_AUTOMATION, PENDING_AUTOMATION

    state = deployed["drive"]("server-state")
    ours = {k: v for k, v in state["automations"].items() if k.startswith("mergeaudit:")}  # not the triggers'
    assert ours == {
        HEARTBEAT_AUTOMATION: {"within": HEARTBEAT_TIMEOUT, "enabled": True},
        PENDING_AUTOMATION: {"within": PENDING_TIMEOUT, "enabled": True},
    }
    assert state["pool_limits"] == {"cpu": None, "gpu": 2} and state["gpu_slots"]["limit"] == 2


def test_quick_run_of_the_deployed_form_audits_the_shipped_experts(deployed):
    """What the UI's Quick Run does: a run of the deployment with the form's defaults."""
    schema = deployed["drive"]("deployment", "merge-audit/on-demand")["schema"]
    assert schema["properties"]["config"]["default"]["name"] == "quick-run"
    assert "enum" in schema["definitions"]["StrategySpec"]["properties"]["method"]
    run = deployed["drive"]("run", "merge-audit/on-demand")
    assert run["state"] == "COMPLETED", run
    assert {"base", "rl_add", "rl_sub"} <= {r["candidate"] for r in run["result"]["summary"]}


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


def test_landed_events_that_break_the_contract_or_collide_are_reported(deployed):
    drive, tmp = deployed["drive"], deployed["tmp"]
    known = ids(drive("runs", "merge-audit/on-checkpoint")["runs"])
    landed = str(deployed["watched"] / "step-100")
    # a resource id outside mergeaudit.checkpoint.*: the run it starts fails, saying so
    drive("emit", "ckpt.step-100", json.dumps({"name": "step-100", "uri": landed, "kind": "rlvr"}))
    (bad,) = drive("wait", "merge-audit/on-checkpoint", "1", "300", known)["runs"]
    assert bad["state"] == "FAILED" and "'ckpt.step-100' breaks the event contract" in bad["message"], bad
    # named like the standing config's model ft_a, at another URI: replaces it (the default)
    known = ids(drive("runs", "merge-audit/on-checkpoint")["runs"])
    drive("emit", "mergeaudit.checkpoint.ft-a-2", json.dumps({"name": "ft_a", "uri": landed, "kind": "rlvr"}))
    (replaced,) = drive("wait", "merge-audit/on-checkpoint", "1", "300", known)["runs"]
    assert replaced["state"] == "COMPLETED", replaced
    run_id = replaced["result"]["run_id"]
    rows = tables.read_table(deployed["checkpoint"]["results_uri"], "checkpoints", run_id=run_id).to_pylist()
    assert {r["name"]: r["uri"] for r in rows}["ft_a"] == landed
    # the same with `landed_same_name: refuse` in the standing config (read at run time)
    (tmp / "checkpoint.yaml").write_text(yaml.safe_dump({**deployed["checkpoint"], "landed_same_name": "refuse"}))
    known = ids(drive("runs", "merge-audit/on-checkpoint")["runs"])
    drive("emit", "mergeaudit.checkpoint.ft-a-3", json.dumps({"name": "ft_a", "uri": landed, "kind": "rlvr"}))
    (refused,) = drive("wait", "merge-audit/on-checkpoint", "1", "300", known)["runs"]
    assert refused["state"] == "FAILED" and "landed_same_name: refuse" in refused["message"], refused
    assert deployed["family"].variants["ft_a"] in refused["message"]  # both URIs named


def pools_audit(deployed, name: str, **overrides) -> dict:
    """A `routing: pools` audit of the base and ft_a (two evaluate runs) as a run parameter."""
    cfg = {
        **deployed["checkpoint"],
        "name": name,
        "strategies": [],
        "routing": "pools",
        "evaluation": {"limit": 24, "batch_size": 4, "device": "cpu"},
        "results_uri": str(deployed["tmp"] / name),
        **overrides,
    }
    return {"config": cfg}


def test_a_killed_gpu_worker_fails_the_audit_within_minutes_and_frees_its_slots(deployed):
    """The GPU worker's machine dies mid-evaluation: the automations mark its runs Crashed (no
    heartbeat, or stuck Pending), the parent sees them end and fails with one line per child,
    and the `gpu` slot a dead evaluation held returns when its lease runs out."""
    drive = deployed["drive"]
    # a run whose process died before its first heartbeat reached the server: Running, and silent
    stalled = drive("stall", "merge-audit/on-demand")
    assert stalled["state"] == "RUNNING", stalled
    known = ids(drive("runs", "evaluate/gpu")["runs"])
    holder = subprocess.Popen(  # holds a `gpu` slot the way a CUDA evaluation does (tasks.audit)
        [sys.executable, "-c", HOLD_SLOT], env=deployed["env"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    audit = pools_audit(deployed, "killed", evaluation=LONG_EVAL, child_timeout=600)
    parent = drive("submit", "merge-audit/on-demand", json.dumps(audit))
    running = drive("running", "evaluate/gpu", "2", "300", known)["runs"]
    assert [r["state"] for r in running] == ["RUNNING", "RUNNING"], running
    _kill_tree(deployed["workers"]["gpu"])
    holder.kill()
    killed_at = time.time()
    done = drive("final", parent["id"], "600")
    took = time.time() - killed_at
    children = [r for r in drive("runs", "evaluate/gpu")["runs"] if r["id"] not in known]
    assert done["state"] == "FAILED", done  # the parent sent heartbeats throughout: not Crashed
    assert took < HEARTBEAT_TIMEOUT + 120, f"the audit took {took:.0f} s to fail after the kill: {children}"
    assert len(children) == 2 and {c["state"] for c in children} == {"CRASHED"}, children
    stalled = drive("final", stalled["id"], "60")
    assert stalled["state"] == "CRASHED" and "no heartbeat" in stalled["message"], stalled
    logs = "\n".join(drive("logs", parent["id"])["logs"])
    for child in children:  # one line per child run, with its id and how it ended
        assert f"evaluate run {child['id']} on pool gpu" in logs and "ended CRASHED" in logs
    deadline = time.time() + 120
    while drive("server-state")["gpu_slots"]["active"] and time.time() < deadline:
        time.sleep(5)
    assert drive("server-state")["gpu_slots"]["active"] == 0  # the dead holder's lease ran out


def test_without_a_gpu_worker_the_audit_says_so_and_fails_at_its_deadline(deployed):
    """Then a worker starts again, and its process alone is killed while both evaluations run
    (what a second SIGTERM, kill -9 or the OOM killer does): Prefect leaves them running, they
    see their worker gone and stop themselves (flows/lifetime.py), each reporting its own crash,
    no process of theirs is left, the audit fails at once, and a worker started afterwards finds
    the pool's slots free. (A worker that shuts down cleanly SIGKILLs its runs instead: the
    killed-machine test above covers runs that end without a word.)"""
    drive = deployed["drive"]
    gpu = deployed["workers"].get("gpu")
    if gpu is not None and gpu.poll() is None:
        _kill_tree(gpu)
    deadline = time.time() + 240  # the server marks a silent worker offline after 3 heartbeats
    while "ONLINE" in drive("server-state")["workers"]["gpu"] and time.time() < deadline:
        time.sleep(5)
    run = drive("run", "merge-audit/on-demand", json.dumps(pools_audit(deployed, "no-worker", child_timeout=20)))
    assert run["state"] == "FAILED" and "2 candidate(s) failed" in run["message"], run
    logs = "\n".join(drive("logs", run["id"])["logs"])
    assert "work pool gpu has no worker online" in logs
    assert logs.count("ended TIMED_OUT") == 2 and "not finished after child_timeout=20 s" in logs
    known = ids(drive("runs", "evaluate/gpu")["runs"])
    worker = deployed["start_worker"]("gpu")
    parent = drive(
        "submit", "merge-audit/on-demand", json.dumps(pools_audit(deployed, "stopped", evaluation=LONG_EVAL))
    )
    running = drive("running", "evaluate/gpu", "2", "300", known)["runs"]
    assert [r["state"] for r in running] == ["RUNNING", "RUNNING"], running
    processes = run_processes(worker.pid)
    assert sorted(processes) == sorted(r["id"] for r in running), processes
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone: its runs run in sessions of their own
    worker.wait(timeout=30)
    stopped_at = time.time()
    done = drive("final", parent["id"], "600")
    assert done["state"] == "FAILED" and time.time() - stopped_at < HEARTBEAT_TIMEOUT - 15, done
    children = [r for r in drive("runs", "evaluate/gpu")["runs"] if r["id"] not in known]
    assert {c["state"] for c in children} == {"CRASHED"} and len(children) == 2, children
    for child in children:  # reported by the run itself, not by the zombie automation
        assert "aborted by a termination signal" in child["message"], child
        logs = "\n".join(drive("logs", child["id"])["logs"])
        assert f"the worker that started this run (pid {worker.pid}) is gone" in logs, child
    deadline = time.time() + 40  # flows/lifetime.py's grace (30 s) is the longest any may take
    while any(alive(p.pid) for p in processes.values()) and time.time() < deadline:
        time.sleep(1)
    left = {run: p.pid for run, p in processes.items() if alive(p.pid)}
    assert not left, left  # nothing of theirs computes on
    deployed["start_worker"]("gpu")
    again = drive("run", "merge-audit/on-demand", json.dumps(pools_audit(deployed, "restarted")))
    assert again["state"] == "COMPLETED", again


HOLD_SLOT = """
import time
from prefect.concurrency.sync import concurrency
from mergeaudit.tasks.audit import GPU_LEASE_SECONDS, GPU_LIMIT
with concurrency(GPU_LIMIT, occupy=1, strict=True, lease_duration=GPU_LEASE_SECONDS):
    print("holding", flush=True)
    time.sleep(3600)
"""
