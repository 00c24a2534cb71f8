"""Score a checkpoint on local disk with lm-eval's vLLM backend, in a subprocess.

vLLM owns the GPU memory of the process it runs in and does not give it back, so each
candidate is scored in a fresh `python -m mergeaudit.evaluation.vllm_backend` process that
writes its scores and samples as JSON; the parent only reads that file. Verification happens
in the child with the same runner as the HF path.

    result = evaluate_with_vllm("/tmp/candidate", ["mergeaudit_add2"], settings)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mergeaudit.errors import EvaluationError
from mergeaudit.evaluation.runner import EvalResult, EvalSettings, check_tasks, run_tasks
from mergeaudit.evaluation.sandbox import SandboxLimits


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def evaluate_with_vllm(checkpoint_dir: str, task_names: list[str], settings: EvalSettings) -> EvalResult:
    if not vllm_available():
        raise EvaluationError("backend vllm needs the vllm package, which is not installed; use backend: hf")
    check_tasks(task_names, settings.data_files)
    with tempfile.TemporaryDirectory(prefix="mergeaudit-vllm-out-") as tmp:
        request = Path(tmp) / "request.json"
        out = Path(tmp) / "result.json"
        request.write_text(json.dumps({"checkpoint": checkpoint_dir, "tasks": task_names,
                                       "settings": dataclasses.asdict(settings)}))
        proc = subprocess.run([sys.executable, "-m", "mergeaudit.evaluation.vllm_backend", str(request), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or "").strip().splitlines()[-5:]
            raise EvaluationError("vLLM evaluation failed: " + " | ".join(tail))
        data = json.loads(out.read_text())
    return EvalResult(scores=data["scores"], samples=data["samples"])


def _child(request_path: str, out_path: str) -> None:
    from lm_eval.models.vllm_causallms import VLLM

    request = json.loads(Path(request_path).read_text())
    raw = request["settings"]
    raw["sandbox"] = SandboxLimits(**raw["sandbox"])
    raw["pass_k"] = tuple(raw["pass_k"])
    settings = EvalSettings(**raw)
    lm = VLLM(pretrained=request["checkpoint"], max_length=settings.max_length, seed=settings.seed,
              trust_remote_code=False)
    result = run_tasks(lm, check_tasks(request["tasks"], settings.data_files), settings)
    Path(out_path).write_text(json.dumps({"scores": result.scores, "samples": result.samples}, default=str))


if __name__ == "__main__":
    _child(*sys.argv[1:3])
