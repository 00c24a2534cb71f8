"""Talks to a real Prefect server for tests/test_prefect_server.py, in its own process (the test
session may hold an ephemeral Prefect API of its own). Prints one JSON object.

    python -m tests.prefect_driver run merge-audit/nightly
    python -m tests.prefect_driver runs evaluate/gpu
    python -m tests.prefect_driver wait merge-audit/on-checkpoint 1 180
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


def main(argv: list[str]) -> dict:
    command = argv[0]
    if command == "run":
        from prefect.deployments import run_deployment

        params = json.loads(argv[2]) if len(argv) > 2 else None
        return describe(run_deployment(argv[1], parameters=params, timeout=900, poll_interval=2))
    if command == "runs":
        return {"runs": [describe(r) for r in asyncio.run(runs_of(argv[1]))]}
    if command == "wait":
        deployment, count, deadline = argv[1], int(argv[2]), time.time() + float(argv[3])
        while True:
            runs = asyncio.run(runs_of(deployment))
            done = [r for r in runs if r.state and r.state.is_final()]
            if len(done) >= count or time.time() > deadline:
                return {"runs": [describe(r) for r in runs]}
            time.sleep(2)
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), default=str))
