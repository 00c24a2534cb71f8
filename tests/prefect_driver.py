"""Talks to a real Prefect server for tests/test_prefect_server.py, in its own process (the test
session may hold an ephemeral Prefect API of its own). Prints one JSON object.

    python -m tests.prefect_driver run merge-audit/nightly [PARAMS_JSON]   # start a run, wait for it
    python -m tests.prefect_driver submit merge-audit/on-demand PARAMS_JSON  # start one, do not wait
    python -m tests.prefect_driver runs evaluate/gpu
    python -m tests.prefect_driver wait merge-audit/on-checkpoint 1 180 [KNOWN_IDS]  # final runs, new ones
    python -m tests.prefect_driver running evaluate/gpu 1 180 KNOWN_IDS      # new runs Running
    python -m tests.prefect_driver final FLOW_RUN_ID 300                     # wait for a final state
    python -m tests.prefect_driver logs FLOW_RUN_ID
    python -m tests.prefect_driver emit RESOURCE_ID PAYLOAD_JSON
    python -m tests.prefect_driver deployment merge-audit/on-demand
    python -m tests.prefect_driver stall merge-audit/on-demand   # a run set Running with no process
    python -m tests.prefect_driver server-state                              # automations, pools, limits, workers
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


def describe(run) -> dict:
    result = None
    if run.state and run.state.is_completed():
        try:
            result = run.state.result()
        except Exception as exc:  # noqa: BLE001 - reported, the test decides
            result = f"<unreadable: {type(exc).__name__}>"
    return {
        "id": str(run.id),
        "name": run.name,
        "state": run.state.type.value if run.state else None,
        "message": run.state.message if run.state else None,
        "work_pool": run.work_pool_name,
        "parameters": run.parameters,
        "result": result,
    }


async def runs_of(deployment: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        dep = await client.read_deployment_by_name(deployment)
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


async def read_run(run_id: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(run_id)


async def run_logs(run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
        return [log.message for log in logs]


async def server_state() -> dict:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        automations = await client.read_automations()
        pools = {p.name: p.concurrency_limit for p in await client.read_work_pools()}
        limit = await client.read_global_concurrency_limit_by_name("gpu")
        workers = {
            pool: [str(getattr(w.status, "value", w.status)) for w in await client.read_workers_for_work_pool(pool)]
            for pool in pools
        }
    return {
        "automations": {
            a.name: {"within": a.trigger.within.total_seconds(), "enabled": a.enabled} for a in automations
        },
        "pool_limits": pools,
        "gpu_slots": {"limit": limit.limit, "active": limit.active_slots},
        "workers": workers,
    }


def wait_runs(deployment: str, count: int, deadline: float, known: set[str], want) -> list:
    while True:
        runs = [r for r in asyncio.run(runs_of(deployment)) if str(r.id) not in known]
        if len([r for r in runs if want(r)]) >= count or time.time() > deadline:
            return runs
        time.sleep(1)


def main(argv: list[str]) -> dict:
    command = argv[0]
    if command in ("run", "submit"):
        from prefect.deployments import run_deployment

        params = json.loads(argv[2]) if len(argv) > 2 else None
        timeout = 900 if command == "run" else 0
        return describe(run_deployment(argv[1], parameters=params, timeout=timeout, poll_interval=2))
    if command == "runs":
        return {"runs": [describe(r) for r in asyncio.run(runs_of(argv[1]))]}
    if command in ("wait", "running"):
        deployment, count, deadline = argv[1], int(argv[2]), time.time() + float(argv[3])
        known = set(argv[4].split(",")) if len(argv) > 4 else set()
        if command == "wait":
            runs = wait_runs(deployment, count, deadline, known, lambda r: r.state and r.state.is_final())
        else:
            runs = wait_runs(deployment, count, deadline, known, lambda r: r.state and r.state.is_running())
        return {"runs": [describe(r) for r in runs]}
    if command == "final":
        deadline = time.time() + float(argv[2])
        while True:
            run = asyncio.run(read_run(argv[1]))
            if (run.state and run.state.is_final()) or time.time() > deadline:
                return describe(run)
            time.sleep(1)
    if command == "logs":
        return {"logs": asyncio.run(run_logs(argv[1]))}
    if command == "emit":
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker

        event = emit_event(
            event="mergeaudit.checkpoint.landed", resource={"prefect.resource.id": argv[1]}, payload=json.loads(argv[2])
        )
        EventsWorker.drain_all()  # sent before this process exits
        return {"id": str(event.id) if event else None}
    if command == "deployment":
        from prefect.client.orchestration import get_client

        async def read() -> dict:
            async with get_client() as client:
                dep = await client.read_deployment_by_name(argv[1])
                return {"parameters": dep.parameters, "schema": dep.parameter_openapi_schema}

        return asyncio.run(read())
    if command == "stall":  # a run whose process died before its first heartbeat: Running, silent
        from prefect.client.orchestration import get_client
        from prefect.states import Pending, Running

        async def stall() -> dict:
            async with get_client() as client:
                dep = await client.read_deployment_by_name(argv[1])
                # created Pending, so no worker takes it (workers take Scheduled runs)
                run = await client.create_flow_run_from_deployment(dep.id, state=Pending())
                await client.set_flow_run_state(run.id, Running(), force=True)
                return describe(await client.read_flow_run(run.id))

        return asyncio.run(stall())
    if command == "server-state":
        return asyncio.run(server_state())
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), default=str))
