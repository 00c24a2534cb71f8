"""Create mergeaudit's work pools, its `gpu` concurrency limit and the automations that mark
dead runs Crashed, on the current Prefect API.

    python -m mergeaudit.deployments.setup --gpu-slots 2                  # process pools `cpu` and `gpu`
    python -m mergeaudit.deployments.setup --gpu-slots 8 --kubernetes     # `gpu` as a Kubernetes pool

The pools get the base job templates in this folder (the env they set routes lm-eval, s3fs
and mergeaudit logs into the flow-run logs); existing pools are updated in place. `--gpu-slots`
is the number of GPUs: it is the `gpu` pool's own concurrency (workers never start more
evaluation runs than that, however many runs are queued) and the `gpu` global concurrency limit
(evaluations holding a GPU at once, across workers and inline audits).

Two automations (created, or updated in place, by name) keep a dead worker from leaving runs
that look alive, so the audit waiting on them sees a final state within minutes:
- a Running run of a `mergeaudit`-tagged deployment that sends no heartbeat (the flow engine
  sends one every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds, 180 by default) for
  `--heartbeat-timeout` seconds after it started Running or after its last heartbeat is marked
  Crashed (default: three heartbeats of this process's setting); the window opens at Running
  too, so a process killed before its first heartbeat reached the server is caught;
- a run left Pending (a worker took it and died before starting it) is marked Crashed after
  `--pending-timeout` seconds (default 900: room for pulling an image).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).parent
TAG = "mergeaudit"  # every deployment in prefect.yaml carries it; its runs inherit it
HEARTBEAT_AUTOMATION = "mergeaudit: crash runs that stopped sending heartbeats"
PENDING_AUTOMATION = "mergeaudit: crash runs stuck in Pending"
FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def heartbeat_seconds() -> int:
    """The heartbeat interval of flow runs started with this process's Prefect settings."""
    from prefect.settings import get_current_settings

    return get_current_settings().flows.heartbeat_frequency or 180


def automations(heartbeat_timeout: float, pending_timeout: float) -> list:
    """The zombie-run automations (Prefect's "detect zombie flows" recipe, scoped to mergeaudit's
    runs by their tag): a proactive trigger per flow run that fires when the expected event does
    not follow within the window."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    runs = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
    ours = ResourceSpecification({"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"})

    def crash(message: str) -> ChangeFlowRunState:
        return ChangeFlowRunState(state=StateType.CRASHED, message=message)

    return [
        AutomationCore(
            name=HEARTBEAT_AUTOMATION,
            description="Marks a mergeaudit flow run Crashed when its process stopped sending heartbeats "
            "(a killed worker or machine); created by mergeaudit.deployments.setup.",
            trigger=EventTrigger(
                match=runs,
                match_related=ours,
                # Running opens the window too: a process killed before its first heartbeat
                # reached the server (a worker dying just after starting a run) sends none
                after={"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in FINAL)},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=heartbeat_timeout),
            ),
            actions=[crash(f"no heartbeat for {heartbeat_timeout:g} s: its worker or machine died")],
        ),
        AutomationCore(
            name=PENDING_AUTOMATION,
            description="Marks a mergeaudit flow run Crashed when it stays Pending (its worker died before "
            "starting it); created by mergeaudit.deployments.setup.",
            trigger=EventTrigger(
                match=runs,
                match_related=ours,
                after={"prefect.flow-run.Pending"},
                expect={
                    "prefect.flow-run.Running",
                    "prefect.flow-run.Scheduled",
                    *(f"prefect.flow-run.{s}" for s in FINAL),
                },
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=pending_timeout),
            ),
            actions=[crash(f"Pending for {pending_timeout:g} s: the worker that took it never started it")],
        ),
    ]


def problems(gpu_slots: int, heartbeat_timeout: float, pending_timeout: float) -> list[str]:
    """What is wrong with the settings (empty: nothing)."""
    out = [] if gpu_slots >= 1 else ["--gpu-slots must be at least 1"]
    if heartbeat_timeout <= heartbeat_seconds():
        out.append(
            f"--heartbeat-timeout {heartbeat_timeout:g} s must exceed the heartbeat interval "
            f"({heartbeat_seconds()} s, PREFECT_FLOWS_HEARTBEAT_FREQUENCY), or every run is marked Crashed"
        )
    if pending_timeout <= 0:
        out.append("--pending-timeout must be positive")
    return out


async def setup(
    gpu_slots: int, kubernetes: bool = False, heartbeat_timeout: float | None = None, pending_timeout: float = 900
) -> float:
    """Create or update the pools, the limit and the automations; returns the heartbeat timeout used."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    heartbeat_timeout = heartbeat_timeout or 3 * heartbeat_seconds()
    wrong = problems(gpu_slots, heartbeat_timeout, pending_timeout)
    if wrong:
        raise ValueError("; ".join(wrong))
    pools = [
        ("cpu", "process", HERE / "process-cpu.json", None),
        (
            "gpu",
            "kubernetes" if kubernetes else "process",
            HERE / ("kubernetes-gpu.json" if kubernetes else "process-gpu.json"),
            gpu_slots,
        ),
    ]
    async with get_client() as client:
        for name, kind, template, limit in pools:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=kind,
                    base_job_template=json.loads(template.read_text()),
                    concurrency_limit=limit,
                ),
                overwrite=True,
            )
        await client.upsert_global_concurrency_limit_by_name("gpu", gpu_slots)
        for automation in automations(heartbeat_timeout, pending_timeout):
            existing = await client.read_automations_by_name(automation.name)
            if existing:
                await client.update_automation(existing[0].id, automation)
                for extra in existing[1:]:
                    await client.delete_automation(extra.id)
            else:
                await client.create_automation(automation)
    return heartbeat_timeout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-slots", type=int, default=1, help="GPUs: the gpu pool's concurrency and the gpu limit")
    ap.add_argument("--kubernetes", action="store_true", help="make `gpu` a Kubernetes pool requesting GPUs")
    ap.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        help="seconds without a heartbeat before a run is marked Crashed (default: 3 heartbeat intervals)",
    )
    ap.add_argument(
        "--pending-timeout", type=float, default=900, help="seconds in Pending before a run is marked Crashed"
    )
    args = ap.parse_args()
    wrong = problems(args.gpu_slots, args.heartbeat_timeout or 3 * heartbeat_seconds(), args.pending_timeout)
    if wrong:
        ap.error("; ".join(wrong))
    heartbeat = asyncio.run(setup(args.gpu_slots, args.kubernetes, args.heartbeat_timeout, args.pending_timeout))
    print(
        f"work pools cpu and gpu ready (gpu pool concurrency {args.gpu_slots}); global concurrency limit "
        f"gpu = {args.gpu_slots}; runs without a heartbeat for {heartbeat:g} s or Pending for "
        f"{args.pending_timeout:g} s are marked Crashed"
    )


if __name__ == "__main__":
    main()
