"""The GPU check: merge, geometry and generation on CUDA, on a Qwen2-0.5B-shaped model built here.

Builds (random weights, no hub) a Qwen2-0.5B-shaped base in bf16 and three RLVR-like experts
(each changes a random 10% of every tensor), then reports, each measured in this run:

  h2d        host-to-device bandwidth from pinned and from pageable memory (1 GiB, best of 3)
  read       every safetensors file of the family read start to end (page cache warm)
  merge      ties (density 0.3) over the three experts on the device, every merged tensor
             produced (not written): input bytes / seconds, as a ratio of the pinned bandwidth
             (goal >= 0.7)
  geometry   the geometry stage (exact counts on the CPU, spectral figures on the device) vs the
             raw read of the same bytes
  generate   HF `generate` in bf16 at batch 32: new tokens per second
  memory     peak GPU memory of each step

One JSON line per step, then a summary. `--device cpu --size tiny` runs the same code on a CPU
(the test suite does, so the script stays runnable). Run it through gpu_check.sh on a GPU machine.

    python benchmarks/gpu_check.py [--device cuda] [--size qwen2-0.5b|tiny] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {  # vocab, hidden, intermediate, layers, heads, kv heads
    "qwen2-0.5b": (151936, 896, 4864, 24, 14, 2),
    "tiny": (512, 64, 128, 2, 4, 2),
}
EXPERTS = ("math", "code", "chat")


def emit(step: str, **values) -> dict:
    print(json.dumps({"step": step, **values}), flush=True)
    return values


def peak_gb(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    gb = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return round(gb, 3)


def build_family(root: Path, size: str) -> dict[str, str]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mergeaudit.checkpoint import Checkpoint, CheckpointWriter

    vocab, hidden, inter, layers, heads, kv = SIZES[size]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    del model
    base = Checkpoint.open(str(root / "base"))
    g = torch.Generator().manual_seed(1)
    uris = {"base": str(root / "base")}
    for name in EXPERTS:
        with CheckpointWriter(str(root / name), source=base) as writer:
            for tensor, t in base.iter_tensors():
                mask = torch.rand(t.shape, generator=g) < 0.10
                delta = torch.randn(t.shape, generator=g) * 0.05 * t.float().abs()
                writer.add(tensor, (t.float() + mask * delta).to(torch.bfloat16))
        uris[name] = str(root / name)
    return uris


def h2d(device) -> dict:
    import torch

    if device.type != "cuda":
        return emit("h2d", pinned_gbps=None, pageable_gbps=None, note="no CUDA device")
    n = 1 << 30
    out = {}
    for label, host in (
        ("pinned", torch.empty(n, dtype=torch.uint8, pin_memory=True)),
        ("pageable", torch.empty(n, dtype=torch.uint8)),
    ):
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"{label}_gbps"] = round(n / best / 1e9, 2)
        del dev, host
    return emit("h2d", **out)


def read_all(uris: dict[str, str]) -> tuple[int, float]:
    total, t0 = 0, time.perf_counter()
    for uri in uris.values():
        for path in sorted(Path(uri).glob("*.safetensors")):
            with open(path, "rb") as f:
                while chunk := f.read(16 << 20):
                    total += len(chunk)
    return total, time.perf_counter() - t0


def merge(uris: dict[str, str], device, pinned_gbps: float | None) -> dict:
    import torch

    from mergeaudit.merging.executor import MergePlan, ModelRef, prepare

    plan = MergePlan(
        method="ties",
        base=ModelRef(id="base", uri=uris["base"]),
        models=[ModelRef(id=m, uri=uris[m]) for m in EXPERTS],
        parameters={"density": 0.3, "weight": 1.0},
        device=str(device),
    )
    prepared = prepare(plan)
    nbytes = sum(ck.nbytes for ck in [prepared.base, *prepared.models])
    t0 = time.perf_counter()
    for _ in prepared.stream():
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    gbps = nbytes / seconds / 1e9
    return emit(
        "merge",
        method="ties",
        experts=len(EXPERTS),
        input_gb=round(nbytes / 1e9, 3),
        seconds=round(seconds, 2),
        gbps=round(gbps, 2),
        ratio_to_pinned=round(gbps / pinned_gbps, 3) if pinned_gbps else None,
        goal=">= 0.7",
        peak_gpu_gb=peak_gb(device),
    )


def geometry(uris: dict[str, str], device) -> dict:
    from mergeaudit.checkpoint import Checkpoint
    from mergeaudit.geometry import GeometrySettings, compute_geometry

    nbytes, read_s = read_all(uris)
    base = Checkpoint.open(uris["base"])
    models = {m: Checkpoint.open(uris[m]) for m in EXPERTS}
    t0 = time.perf_counter()
    rows, pairs = compute_geometry(base, models, settings=GeometrySettings(device=str(device)))
    seconds = time.perf_counter() - t0
    return emit(
        "geometry",
        read_seconds=round(read_s, 2),
        read_gb=round(nbytes / 1e9, 3),
        seconds=round(seconds, 2),
        ratio_read_over_geometry=round(read_s / seconds, 3),
        tensor_rows=len(rows),
        pair_rows=len(pairs),
        peak_gpu_gb=peak_gb(device),
    )


def generate(uri: str, device, batch: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(uri, dtype=dtype).to(device).eval()
    prompt = torch.randint(10, model.config.vocab_size, (batch, 64), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    produced = (out.shape[1] - prompt.shape[1]) * batch
    result = emit(
        "generate",
        dtype=str(dtype).removeprefix("torch."),
        batch=batch,
        new_tokens=new_tokens,
        seconds=round(seconds, 2),
        tokens_per_s=round(produced / seconds, 1),
        peak_gpu_gb=peak_gb(device),
    )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default="qwen2-0.5b")
    ap.add_argument("--workdir", default=None, help="where the family is built (default: a temporary folder)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --size tiny for a smoke test")
    emit(
        "machine",
        torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
    )
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        uris = build_family(Path(tmp), args.size)
        emit("build", size=args.size, seconds=round(time.perf_counter() - t0, 1))
        bandwidth = h2d(device)
        read_all(uris)  # warm the page cache: every step reads from memory, as h2d does
        merged = merge(uris, device, bandwidth.get("pinned_gbps"))
        geo = geometry(uris, device)
        gen = generate(uris["base"], device, args.batch, args.new_tokens)
    emit(
        "summary",
        pinned_gbps=bandwidth.get("pinned_gbps"),
        merge_ratio_to_pinned=merged["ratio_to_pinned"],
        geometry_read_ratio=geo["ratio_read_over_geometry"],
        generate_tokens_per_s=gen["tokens_per_s"],
    )


if __name__ == "__main__":
    main()
