"""Create mergeaudit's work pools and its `gpu` concurrency limit on the current Prefect API.

    python -m mergeaudit.deployments.setup --gpu-slots 2                  # process pools `cpu` and `gpu`
    python -m mergeaudit.deployments.setup --gpu-slots 8 --kubernetes     # `gpu` as a Kubernetes pool

The pools get the base job templates in this folder (the env they set routes lm-eval, s3fs
and mergeaudit logs into the flow-run logs); existing pools are updated in place. The `gpu`
global concurrency limit caps how many evaluations hold a GPU at once, across workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

HERE = Path(__file__).parent


async def setup(gpu_slots: int, kubernetes: bool = False) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pools = [
        ("cpu", "process", HERE / "process-cpu.json"),
        (
            "gpu",
            "kubernetes" if kubernetes else "process",
            HERE / ("kubernetes-gpu.json" if kubernetes else "process-gpu.json"),
        ),
    ]
    async with get_client() as client:
        for name, kind, template in pools:
            await client.create_work_pool(
                WorkPoolCreate(name=name, type=kind, base_job_template=json.loads(template.read_text())),
                overwrite=True,
            )
        await client.upsert_global_concurrency_limit_by_name("gpu", gpu_slots)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-slots", type=int, default=1, help="GPUs that evaluations may hold at once")
    ap.add_argument("--kubernetes", action="store_true", help="make `gpu` a Kubernetes pool requesting GPUs")
    args = ap.parse_args()
    asyncio.run(setup(args.gpu_slots, args.kubernetes))
    print(f"work pools cpu and gpu ready; global concurrency limit gpu = {args.gpu_slots}")


if __name__ == "__main__":
    main()
