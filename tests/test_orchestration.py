"""Flow semantics under prefect_test_harness: retries only for transient failures, caching
across runs, artifacts, config_uri and add_models, S3 faults absorbed by retries, and every
prefect.yaml entrypoint importing."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mergeaudit import flows, store, tables
from mergeaudit.config import parse_config
from mergeaudit.errors import ConfigError, TransientStoreError
from mergeaudit.toy import build_toy_family

ROOT = Path(flows.__file__).resolve().parent.parent


def test_every_prefect_yaml_entrypoint_imports():
    """Each entrypoint loads as a worker loads it: Prefect runs the file (flows/merge_audit.py)
    as a script, whose absolute imports resolve to the installed mergeaudit.flows, .tasks (no
    placeholder flow: Prefect would otherwise stand one in for a file that fails to import)."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {}
    for dep in spec["deployments"]:
        flow_obj = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]), use_placeholder_flow=False)
        names[f"{flow_obj.name}/{dep['name']}"] = dep["work_pool"]["name"]
    assert names == {
        "merge-audit/nightly": "cpu",
        "merge-audit/on-demand": "cpu",
        "merge-audit/on-checkpoint": "cpu",
        "evaluate/gpu": "gpu",
        "watch-checkpoints/poll": "cpu",
    }
    (trigger,) = next(d for d in spec["deployments"] if d["name"] == "on-checkpoint")["triggers"]
    assert trigger["expect"] == ["mergeaudit.checkpoint.landed"]
    assert next(d for d in spec["deployments"] if d["name"] == "nightly")["schedules"][0]["timezone"]


def test_job_templates_only_use_declared_variables():
    import re

    for path in (ROOT / "deployments").glob("*.json"):
        template = json.loads(path.read_text())
        used = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
        assert used <= set(template["variables"]["properties"]), (path.name, used)


def test_retries_only_for_transient_failures(prefect_harness):
    from prefect import flow, task

    from mergeaudit.tasks.policies import retry_transient

    calls = {"transient": 0, "invalid": 0}

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky() -> str:
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise TransientStoreError("S3 said SlowDown")
        return "ok"

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def invalid() -> None:
        calls["invalid"] += 1
        raise ConfigError("density must be in (0, 1]")

    @flow
    def both() -> str:
        out = flaky()
        invalid()
        return out

    with pytest.raises(ConfigError):
        both()
    assert calls == {"transient": 3, "invalid": 1}


def small_config(family, results: str, **extra) -> dict:
    return {
        "name": "orchestration",
        "base": {"name": "base", "uri": family.base},
        "models": [{"name": n, "uri": u, "kind": "rlvr"} for n, u in family.variants.items()],
        "strategies": [{"method": "task_arithmetic"}],
        "evaluation": {"limit": 4, "batch_size": 4},
        "results_uri": results,
        **extra,
    }


def task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name: r for r in runs}

    runs = asyncio.run(read())
    return {name: (r.state.name, r.run_count) for name, r in runs.items()}


@pytest.mark.slow
def test_rerun_reuses_finished_work_and_publishes_artifacts(prefect_harness, toy_family, tmp_path):
    from prefect.client.orchestration import get_client

    from mergeaudit.flows.merge_audit import artifact_key, merge_audit

    results = str(tmp_path / "results")
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(small_config(toy_family, results)))
    first = merge_audit(config_uri=str(tmp_path / "audit.yaml"), return_state=True)
    evaluations = sorted(store.list_files(store.join(results, "evaluations")).values(), key=lambda f: f.uri)
    second = merge_audit(config_uri=str(tmp_path / "audit.yaml"), return_state=True)
    assert first.is_completed() and second.is_completed()
    states = task_states(second.state_details.flow_run_id)
    geometry = next(v for k, v in states.items() if k.startswith("compute-geometry"))
    assert geometry[0] == "Cached", states
    again = sorted(store.list_files(store.join(results, "evaluations")).values(), key=lambda f: f.uri)
    assert [f.version for f in again] == [f.version for f in evaluations], "stored evaluations are reused"
    runs = tables.read_table(results, "runs").to_pylist()
    assert len(runs) == 2 and tables.read_table(results, "candidates").num_rows == 2 * 4

    async def artifacts():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            keys = [artifact_key("orchestration", "report"), artifact_key("orchestration", "leaderboard")]
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    found = asyncio.run(artifacts())
    assert {a.type for a in found} == {"markdown", "table"} and len(found) == 4  # two runs x two keys
    assert any("Merge leaderboard" in str(a.data) for a in found if a.type == "markdown")


def test_add_models_and_config_checks(prefect_harness, toy_family, tmp_path):
    from mergeaudit.flows.merge_audit import merge_audit

    cfg = small_config(toy_family, str(tmp_path / "r"))
    extra = cfg["models"].pop()
    out = merge_audit(config=parse_config(cfg), add_models=[extra])
    assert {row["candidate"] for row in out["summary"]} >= {extra["name"]}
    with pytest.raises(ConfigError, match="give `config` or `config_uri`"):
        merge_audit(config=None)


class FaultyS3(BaseHTTPRequestHandler):
    """Forwards to moto, but answers the first `failures` requests with 503 SlowDown."""

    protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue`, which botocore sends on PUT
    upstream = ""
    failures = 0
    served_faults = 0
    lock = threading.Lock()

    def _handle(self) -> None:
        with FaultyS3.lock:
            fail = FaultyS3.served_faults < FaultyS3.failures
            FaultyS3.served_faults += fail
        body = self._body()
        if fail:
            payload = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("host", "transfer-encoding", "content-length", "expect")
        }
        headers.setdefault("Content-Type", "binary/octet-stream")  # else urllib claims a form body
        req = urllib.request.Request(self.upstream + self.path, data=body or None, method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(req) as resp:
                status, headers, data = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            status, headers, data = err.code, err.headers, err.read()
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers
            pass
        return b"".join(chunks)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_s3_faults_are_retried_without_duplicating_rows(prefect_harness, s3_bucket, s3_endpoint, monkeypatch):
    from mergeaudit.flows.merge_audit import merge_audit

    family = build_toy_family(s3_bucket + "/ckpts", variants={"rl": 0.1})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), FaultyS3)
    FaultyS3.upstream, FaultyS3.failures, FaultyS3.served_faults = s3_endpoint, 12, 0
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{proxy.server_address[1]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # let the faults reach our retry policy
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    try:
        state = merge_audit(config=parse_config(small_config(family, s3_bucket + "/results")), return_state=True)
    finally:
        proxy.shutdown()
    assert state.is_completed(), state.message
    assert FaultyS3.served_faults == 12
    states = task_states(state.state_details.flow_run_id)
    assert any(count > 1 for _, count in states.values()), f"some task retried: {states}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    assert tables.read_table(s3_bucket + "/results", "candidates").num_rows == 3
    scores = tables.read_table(s3_bucket + "/results", "scores")
    assert scores.num_rows == 3 * 16  # reward, avg@1, pass@1, rates, token lengths, outcome counts, ...


@pytest.mark.parametrize("device,takes_slot", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_only_gpu_evaluations_take_a_gpu_slot(monkeypatch, device, takes_slot):
    """A CPU evaluation holds no GPU, so it asks for no `gpu` slot (the request alone cost ~2 s
    per candidate); a CUDA one takes its slot before anything is evaluated."""
    from mergeaudit import audit
    from mergeaudit.evaluation.settings import EvalSettings
    from mergeaudit.tasks import audit as audit_tasks

    calls = []

    class Slot:
        def __init__(self, *args, **kwargs):
            calls.append(args)
            assert kwargs.get("lease_duration", 300) <= 60  # a dead holder's slot returns within a minute

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(audit_tasks, "concurrency", Slot)
    monkeypatch.setattr(audit, "evaluate_to_store", lambda *a: calls.append("evaluated") or "record")
    assert audit_tasks.evaluate_candidate.fn(None, EvalSettings(device=device), None, "mem://r") == "record"
    assert calls == ([("gpu",), "evaluated"] if takes_slot else ["evaluated"])


def test_submit_starts_a_deployment_run_with_the_yaml_config(prefect_harness, toy_family, tmp_path, run_cli):
    """`mergeaudit submit` validates the YAML (and opens the checkpoints), then creates a run of
    the deployment with the config as its parameter, without waiting for a worker."""
    from prefect.client.orchestration import get_client

    from mergeaudit.flows.merge_audit import merge_audit

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(merge_audit)
        client.create_deployment(flow_id=flow_id, name="submit-test", entrypoint="flows/merge_audit.py:merge_audit")
    raw = small_config(toy_family, str(tmp_path / "r"))
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = run_cli("submit", str(path), "--deployment", "merge-audit/submit-test")
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split("(")[1].split(")")[0]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert parse_config(run.parameters["config"]) == parse_config(raw)
    assert run.state.is_scheduled()
    missing = run_cli("submit", str(path), "--deployment", "merge-audit/absent")
    assert missing.returncode == 2 and "no deployment 'merge-audit/absent'" in missing.stderr


def test_a_pool_without_a_worker_fails_the_audit_at_the_child_timeout(prefect_harness, toy_family, tmp_path):
    """routing: pools with nothing to run the evaluate runs: each child is cancelled after
    `child_timeout`, and the audit commits its tables and ends Failed, one line per child."""
    from prefect.client.orchestration import get_client

    from mergeaudit.flows.evaluate import evaluate
    from mergeaudit.flows.merge_audit import merge_audit

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(evaluate)
        client.create_deployment(flow_id=flow_id, name="no-worker", entrypoint="flows/evaluate.py:evaluate")
    raw = small_config(toy_family, str(tmp_path / "r"), routing="pools", evaluate_deployment="evaluate/no-worker")
    state = merge_audit(config=parse_config({**raw, "child_timeout": 3}), return_state=True)
    assert state.is_failed()
    assert "candidate(s) failed" in state.message
    result = state.result(raise_on_failure=False)
    assert len(result["failed"]) == 4  # base, two fine-tunes, one merge
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    children = [r for r in runs if r.name.startswith("evaluate-")]
    assert len(children) == 4 and all(r.state.type.value in ("CANCELLING", "CANCELLED") for r in children)
