"""GPU paths: the GPU check script stays runnable (smoke test on the CPU), and, behind the gpu
marker, merges on CUDA through pinned staging equal merges on the CPU, and an evaluation on
CUDA runs in bf16 and gives its memory back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergeaudit.merging.executor import MergePlan, ModelRef, prepare
from mergeaudit.merging.transfer import HostToDevice

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.integration
def test_gpu_check_script_runs_on_cpu(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--size",
            "tiny",
            "--new-tokens",
            "4",
            "--batch",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    steps = {r["step"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(steps) == {"machine", "build", "h2d", "merge", "geometry", "generate", "summary"}
    assert steps["merge"]["experts"] == 3 and steps["merge"]["seconds"] > 0
    assert steps["geometry"]["tensor_rows"] > 0 and steps["generate"]["tokens_per_s"] > 0


def test_host_to_device_passes_cpu_tensors_through():
    t = torch.arange(6.0).reshape(2, 3)
    assert HostToDevice(torch.device("cpu"))(t) is t


def toy_family(root: Path) -> dict[str, str]:
    from mergeaudit.toy.models import build_toy_family

    fam = build_toy_family(str(root), {"a": 0.2, "b": 0.3, "c": 0.1})
    return {"base": fam.base, **fam.variants}


@pytest.mark.gpu
@cuda
def test_ties_on_cuda_equals_cpu(tmp_path):
    uris = toy_family(tmp_path)

    def merged(device: str) -> dict[str, torch.Tensor]:
        plan = MergePlan(
            method="ties",
            base=ModelRef(id="base", uri=uris["base"]),
            models=[ModelRef(id=m, uri=uris[m]) for m in ("a", "b", "c")],
            parameters={"density": 0.5, "weight": 1.0},
            device=device,
        )
        return dict(prepare(plan).stream())

    cpu, gpu = merged("cpu"), merged("cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@cuda
def test_candidate_on_cuda_in_bf16_frees_memory(tmp_path):
    from mergeaudit.audit import release_device_memory
    from mergeaudit.checkpoint import Checkpoint
    from mergeaudit.evaluation.settings import EvalSettings
    from mergeaudit.modeling import build_model

    uris = toy_family(tmp_path)
    base = Checkpoint.open(uris["base"])
    before = torch.cuda.memory_allocated()
    spec = EvalSettings(device="cuda")
    model = build_model(base.config, base.iter_tensors(), spec.device, getattr(torch, spec.torch_dtype))
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_cuda
    del model
    release_device_memory("cuda")
    assert torch.cuda.memory_allocated() <= before
