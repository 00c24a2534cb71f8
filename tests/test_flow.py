"""End to end: the merge_audit flow on tiny checkpoints, on a local store and on S3."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from mergeaudit import tables
from mergeaudit.config import parse_config
from mergeaudit.toy import build_toy_family


def audit_config(family, results_uri: str) -> dict:
    return {
        "name": "e2e",
        "base": {"name": "base", "uri": family.base},
        "models": [{"name": n, "uri": u, "kind": "rlvr"} for n, u in family.variants.items()],
        "strategies": [{"method": "linear"}, {"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}}],
        "evaluation": {"limit": 8, "batch_size": 8},
        "results_uri": results_uri,
    }


@pytest.mark.slow
def test_flow_on_local_store(prefect_harness, toy_family, tmp_path):
    from mergeaudit.evaluation.arithmetic import make_problems
    from mergeaudit.fisher import calibration_from_problems
    from mergeaudit.flows.merge_audit import merge_audit

    results = str(tmp_path / "results")
    raw = audit_config(toy_family, results)
    raw["strategies"] += [
        {"method": "sar", "params": {"density": 0.8}},
        {"method": "dare_ties", "grid": {"density": [0.3, 0.6]}, "seed": 3},
    ]
    raw["fisher"] = {
        "calibration": str(calibration_from_problems(make_problems("add", 2, 4, 1), tmp_path / "c.jsonl")),
        "max_examples": 2,
    }
    # the two fine-tunes stand in for two saved steps of one run (a wiring check; known answers
    # for series are in test_geometry_series)
    raw["series"] = [
        {
            "name": "run",
            "kind": "rlvr",
            "compare_with": ["ft_b"],
            "steps": [
                {"step": 10, "uri": toy_family.variants["ft_a"]},
                {"step": 20, "uri": toy_family.variants["ft_b"]},
            ],
        }
    ]
    out = merge_audit(parse_config(raw))
    assert set(out["tables"]) == set(tables.SCHEMAS)
    from prefect.artifacts import Artifact

    from mergeaudit.flows.merge_audit import artifact_key

    shown = Artifact.get(artifact_key(raw["name"] if "name" in raw else parse_config(raw).name, "progress"))
    assert shown is not None and shown.type == "progress" and float(shown.data) == 100.0
    assert shown.description.startswith("[7/7 report] 9/9 candidates, done in ")  # the progress line, as last shown
    ckpts = {r["name"]: r for r in tables.read_table(results, "checkpoints").to_pylist()}
    assert {n: (r["role"], r["dtype"], r["model_type"]) for n, r in ckpts.items()} == {
        "base": ("base", "BF16", "llama"),
        "ft_a": ("model", "BF16", "llama"),
        "ft_b": ("model", "BF16", "llama"),
        "run@10": ("series_step", "BF16", "llama"),
        "run@20": ("series_step", "BF16", "llama"),
    }
    series = [r for r in tables.read_table(results, "geometry_series").to_pylist() if r["scope"] == "model"]
    vs_ft_b = {r["step"]: r["overlap_of_step"] for r in series if r["against"] == "model"}
    assert vs_ft_b[20] == 1.0 and 0 < vs_ft_b[10] < 1  # step 20 is ft_b itself
    assert (tmp_path / "results" / "reports" / f"{out['run_id']}.html").exists()
    samples = tables.read_table(results, "samples").to_pylist()
    assert len(samples) == 9 * 8 and {s["verifier"] for s in samples} == {"numeric"}
    cands = tables.read_table(results, "candidates").to_pylist()
    assert [c["kind"] for c in cands].count("merge") == 6 and len(cands) == 9
    assert {c["method"] for c in cands} >= {"sar", "dare_ties", "linear", "task_arithmetic"}
    assert len(list((tmp_path / "results" / "fisher").iterdir())) == 2, "one Fisher per fine-tune, cached"
    scores = ds.dataset(results + "/scores", partitioning="hive").to_table().to_pylist()
    assert {s["candidate_id"] for s in scores} == {c["candidate_id"] for c in cands}
    names = {c["candidate_id"]: (c["name"], c["method"], c["params_hash"]) for c in cands}
    assert all((s["candidate"], s["method"], s["params_hash"]) == names[s["candidate_id"]] for s in scores)
    assert {s["metric"] for s in scores} == {
        "exact_match",
        "numeric_match",
        "avg@1",
        "pass@1",
        "format_rate",
        "truncation_rate",
        "completion_tokens",
        "trace_tokens",
        "verifier_errors",
        "verifier_timeouts",
    } | {f"outcome_{o}" for o in ("correct", "wrong", "no_answer", "truncated", "timeout", "error")}
    assert all(s["n"] == 8 for s in scores)
    # every verifier stderr recomputed from the samples table: per-prompt mean, sd / sqrt(prompts)
    by_prompt: dict[tuple[str, int], list[float]] = {}
    for s in samples:
        by_prompt.setdefault((s["candidate_id"], s["doc_id"]), []).append(s["reward"])
    checked = 0
    for row in (s for s in scores if s["metric"] == "numeric_match"):
        per = [sum(v) / len(v) for (cid, _), v in sorted(by_prompt.items()) if cid == row["candidate_id"]]
        mean = sum(per) / len(per)
        se = (sum((x - mean) ** 2 for x in per) / (len(per) - 1) / len(per)) ** 0.5
        assert (row["value"], row["stderr"]) == (pytest.approx(mean), pytest.approx(se))
        checked += 1
    assert checked == 9
    # one leaderboard: the flow's summary (CLI, table artifact) and the report's, from the tables
    from mergeaudit import report
    from mergeaudit.results import leaderboard, load_run

    assert out["summary"] == [r.model_dump() for r in leaderboard.summary(load_run(results))]
    assert report.leaderboard(report.load_run(results)) == [r.model_dump() for r in leaderboard.rows(load_run(results))]
    geo = tables.read_table(results, "geometry_tensors").to_pylist()
    for name, changed in toy_family.changed.items():
        assert sum(r["changed_bf16"] for r in geo if r["model"] == name and r["scope"] == "tensor") == changed
    (pair,) = [r for r in tables.read_table(results, "geometry_pairs").to_pylist() if r["scope"] == "global"]
    assert (pair["model_a"], pair["model_b"], pair["kind_a"]) == ("ft_a", "ft_b", "rlvr")
    # Fisher was estimated for SAR, so geometry reports each model's Fisher mass on the overlap
    for side in ("a", "b"):
        shares = pair[f"fisher_{side}_overlap_share"], pair[f"fisher_{side}_exclusive_share"]
        assert all(0 < x < 1 for x in shares) and sum(shares) <= 1 + 1e-9
    by_name = {c["name"]: c for c in cands}
    # the merged update is the union of two random masks: 1 - (1-0.1)(1-0.2) = 0.28 changed
    assert by_name["linear(ft_a+ft_b)"]["update_sparsity_bf16"] == pytest.approx(0.72, abs=0.02)
    assert by_name["base"]["update_sparsity_bf16"] == 1.0
    runs = tables.read_table(results, "runs").to_pylist()
    assert runs[0]["audit_name"] == "e2e" and runs[0]["run_id"] == out["run_id"]


@pytest.mark.slow
def test_flow_on_s3(prefect_harness, s3_bucket):
    from mergeaudit.flows.merge_audit import merge_audit

    family = build_toy_family(s3_bucket + "/ckpts", variants={"rl": 0.05})
    raw = audit_config(family, s3_bucket + "/results")
    raw["strategies"] = [{"method": "task_arithmetic"}]
    out = merge_audit(parse_config(raw))
    scores = tables.read_table(s3_bucket + "/results", "scores")
    # base, rl, one merge x 16 metrics: exact_match; reward, avg@1, pass@1, format and truncation rates,
    # completion and trace tokens; six outcome counts; verifier errors and timeouts
    assert scores.num_rows == 16 * 3
    assert out["tables"]["scores"].startswith("s3://")
    assert set(out["bytes_read"]) == set(out["input_sizes"]) == {"base", "rl"}  # test_read_once: the amounts


def test_every_flow_module_imports():
    code = "import mergeaudit.flows.merge_audit as m; print(m.merge_audit.name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "merge-audit"


@pytest.mark.slow
def test_credentials_from_a_prefect_block_never_leak(prefect_harness, s3_bucket, s3_endpoint, monkeypatch, tmp_path):
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect_aws import AwsClientParameters, AwsCredentials

    from mergeaudit import store
    from mergeaudit.flows.merge_audit import merge_audit

    family = build_toy_family(s3_bucket + "/ckpts", variants={"rl": 0.05})
    secret = "s3cr3t-" + "x" * 24
    # moto accepts any key; the secret must travel from the block to the client and nowhere else
    AwsCredentials(
        aws_access_key_id="block-key",
        aws_secret_access_key=secret,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    ).save("audit-s3", overwrite=True)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    raw = audit_config(family, s3_bucket + "/results")
    raw["strategies"] = [{"method": "linear"}]
    raw["storage"] = {"credentials_block": "aws-credentials/audit-s3"}
    state = merge_audit(parse_config(raw), return_state=True)
    out = state.result()
    assert store.locate(s3_bucket).fs.key is None, "the block's credentials ended with the run"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    assert tables.read_table(s3_bucket + "/results", "scores").num_rows == 3 * 16
    for uri in out["tables"].values():
        assert secret.encode() not in store.read_bytes(uri)
    assert secret not in repr(out)

    async def run_logs() -> list[str]:
        flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        async with get_client() as client:
            return [log.message for log in await client.read_logs(log_filter=flt)]

    for _ in range(40):  # logs reach the API in batches
        logs = asyncio.run(run_logs())
        if any("committed" in m for m in logs):
            break
        time.sleep(0.25)
    assert any("committed" in m for m in logs), "the run's logs reached the API"
    assert not [m for m in logs if secret in m]
    assert "s3cr3t" not in repr(store.S3Credentials(access_key_id="k", secret_access_key=secret))


def test_unknown_credentials_block_is_a_config_error(prefect_harness):
    from mergeaudit.errors import ConfigError
    from mergeaudit.flows.credentials import s3_credentials_from_block

    with pytest.raises(ConfigError, match="aws-credentials/absent"):
        s3_credentials_from_block("aws-credentials/absent")


async def _events(prefix: str) -> list[dict]:
    import httpx
    from prefect.settings import PREFECT_API_URL

    async with httpx.AsyncClient(base_url=PREFECT_API_URL.value()) as client:
        resp = await client.post("/events/filter", json={"filter": {"event": {"prefix": [prefix]}}, "limit": 50})
        resp.raise_for_status()
        return resp.json()["events"]


@pytest.mark.slow
def test_regression_commits_the_run_then_fails_the_flow_and_emits_an_event(prefect_harness, toy_family, tmp_path):
    """A previous committed run of the same audit scored every candidate 1.0; the untrained
    toy scores ~0 now: the run is committed, the report published, the event emitted, and the
    flow ends Failed with the summary."""
    import asyncio
    import json
    import time

    from mergeaudit.flows.merge_audit import merge_audit

    results = str(tmp_path / "results")
    raw = {**audit_config(toy_family, results), "name": "alarmed", "strategies": [{"method": "linear"}]}
    names = ["base", "ft_a", "ft_b", "linear(ft_a+ft_b)"]
    tables.write_run(
        results,
        "20261126T000000Z-earlier",
        "2026-11-26",
        {
            "runs": [{"audit_name": "alarmed", "status": "completed"}],
            "candidates": [
                {"candidate_id": f"old{k}", "name": n, "kind": "merge" if "(" in n else "checkpoint", "status": "ok"}
                for k, n in enumerate(names)
            ],
            "scores": [
                {
                    "candidate_id": f"old{k}",
                    "task": "mergeaudit_add2",
                    "metric": "numeric_match",
                    "filter": "verifier",
                    "value": 1.0,
                    "stderr": 0.0,
                    "n": 8,
                }
                for k in range(len(names))
            ],
        },
    )
    state = merge_audit(parse_config(raw), return_state=True)
    assert state.is_failed()
    assert "4 regression(s) against 20261126T000000Z-earlier" in state.message
    run_id = state.result(raise_on_failure=False)["run_id"]
    (run,) = tables.read_table(results, "runs", run_id=run_id).to_pylist()
    assert run["previous_run_id"] == "20261126T000000Z-earlier"
    assert {r["candidate"] for r in json.loads(run["regressions_json"])} == set(names)
    assert (tmp_path / "results" / "reports" / f"{run_id}.html").exists()
    for _ in range(40):  # events reach the API asynchronously
        events = asyncio.run(_events("mergeaudit.regression"))
        if events:
            break
        time.sleep(0.25)
    (event,) = [e for e in events if e["payload"]["run_id"] == run_id]
    assert event["resource"]["prefect.resource.name"] == "alarmed"
    assert len(event["payload"]["regressions"]) == 4


@pytest.mark.slow
def test_a_failing_candidate_is_recorded_and_the_others_still_scored(prefect_harness, tmp_path):
    """A checkpoint deleted after planning: its own evaluation and the merge that reads it fail
    (no retries: not transient), the others are scored, and the run commits all of it."""
    import datetime as dt
    import shutil

    from prefect import flow

    from mergeaudit import audit
    from mergeaudit.flows.merge_audit import evaluate_inline

    family = build_toy_family(str(tmp_path / "ck"), variants={"a": 0.1, "b": 0.2})
    results = str(tmp_path / "results")
    config = parse_config({**audit_config(family, results), "strategies": [{"method": "linear"}]})

    @flow
    def partial():
        records = audit.resolve_checkpoints(config)
        candidates = audit.plan_candidates(config, records)
        shutil.rmtree(family.variants["b"])
        evaluations = [evaluate_inline(config, c) for c in candidates]
        return audit.finish_run(
            config, "r-partial", dt.datetime.now(dt.timezone.utc), records, {}, candidates, evaluations
        )

    outcome = partial()
    assert sorted(outcome.failed) == ["b", "linear(a+b)"]
    assert "2 candidate(s) failed" in outcome.problems()
    cands = {c["name"]: c for c in tables.read_table(results, "candidates").to_pylist()}
    assert {n: c["status"] for n, c in cands.items()} == {
        "base": "ok",
        "a": "ok",
        "b": "failed",
        "linear(a+b)": "failed",
    }
    assert "not found" in cands["b"]["error"] or "missing" in cands["b"]["error"]
    scored = {r["candidate"] for r in tables.read_table(results, "scores").to_pylist()}
    assert scored == {"base", "a"}
    (run,) = tables.read_table(results, "runs").to_pylist()
    assert (run["status"], run["n_candidates"], run["n_failed"]) == ("failed", 4, 2)
