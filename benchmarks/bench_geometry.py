"""The geometry pass over a base and 3 fine-tunes vs a plain read of the same bytes.

Builds a synthetic set (default 1 GiB: base + 3 fine-tunes of 256 MiB each, 16 bf16 tensors of
2048 x 4096; each fine-tune changes a random 10% of the entries, RLVR-like), then measures, each
in a fresh subprocess so peak RSS belongs to one measurement:

  read       every safetensors file of the 4 checkpoints read start to end in 16 MiB chunks
  geometry   compute_geometry without the spectral figures (masks, norms, pairs)
  spectral   compute_geometry with them (reported separately, as time over `geometry`)

and prints the ratio read/geometry (goal >= 0.5) and peak RSS. With --s3 the set is also put on
a local S3 endpoint (moto's server in its own process) and measured there.

    .venv/bin/python benchmarks/bench_geometry.py [--gib 1] [--repeat 2] [--s3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_io import CHUNK, peak_rss_mb, start_moto  # noqa: E402

MODELS = ("ft_a", "ft_b", "ft_c")


def worker(mode: str, root: str) -> dict:
    import torch

    from mergeaudit import store
    from mergeaudit.checkpoint import Checkpoint
    from mergeaudit.geometry import GeometrySettings, compute_geometry

    torch.set_num_threads(os.cpu_count() or 1)
    warm = 0.0
    if mode != "read":  # load the compiled kernels once (numba's on-disk cache), reported apart
        from mergeaudit.geometry.stats import tensor_sums

        w0 = time.perf_counter()
        tensor_sums(torch.zeros(8, dtype=torch.bfloat16), [torch.ones(8, dtype=torch.bfloat16)] * 2)
        warm = time.perf_counter() - w0
    t0 = time.perf_counter()
    nbytes = 0
    if mode == "read":
        for name in ("base", *MODELS):
            for fi in store.list_files(store.join(root, name)).values():
                loc = store.locate(fi.uri)
                opener = open(loc.path, "rb") if loc.is_local else loc.fs.open(loc.path, "rb", block_size=CHUNK)
                with opener as fh:
                    while chunk := fh.read(CHUNK):
                        nbytes += len(chunk)
    else:
        base = Checkpoint.open(store.join(root, "base"))
        models = {m: Checkpoint.open(store.join(root, m)) for m in MODELS}
        settings = GeometrySettings() if mode == "spectral" else GeometrySettings(spectral=None)
        rows, pairs = compute_geometry(base, models, settings=settings)
        nbytes = base.nbytes + sum(m.nbytes for m in models.values())
    return {"mode": mode, "bytes": nbytes, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
            "kernel_load_s": warm}


def build(root: str, gib: float) -> int:
    import torch

    from mergeaudit.checkpoint import CheckpointWriter

    n = max(1, round(gib * 16))  # tensors per checkpoint (4 checkpoints x n x 16 MiB)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2048, 4096, generator=g).to(torch.bfloat16) for _ in range(n)]
    cfg = {"model_type": "llama"}
    with CheckpointWriter(os.path.join(root, "base"), config=cfg) as w:
        for i, t in enumerate(base):
            w.add(f"model.layers.{i}.mlp.up_proj.weight", t)
    for m in MODELS:
        with CheckpointWriter(os.path.join(root, m), config=cfg) as w:
            for i, t in enumerate(base):
                mask = torch.rand(t.shape, generator=g) < 0.1
                delta = torch.randn(t.shape, generator=g) * 0.05 * t.float().abs()
                w.add(f"model.layers.{i}.mlp.up_proj.weight", (t.float() + mask * delta).to(torch.bfloat16))
    return 2048 * 4096 * 2


def run_worker(mode: str, root: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, root], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(where: str, root: str, repeat: int, env: dict) -> None:
    best: dict[str, dict] = {}
    for _ in range(repeat):
        for mode in ("read", "geometry", "spectral"):
            r = run_worker(mode, root, env)
            if mode not in best or r["seconds"] < best[mode]["seconds"]:
                best[mode] = r
    rd, geo, spec = best["read"], best["geometry"], best["spectral"]
    print(f"[{where}] read {rd['seconds']:.2f} s ({rd['bytes'] / rd['seconds'] / 2**20:.0f} MiB/s)  "
          f"geometry {geo['seconds']:.2f} s ({geo['bytes'] / geo['seconds'] / 2**20:.0f} MiB/s)  "
          f"ratio {rd['seconds'] / geo['seconds']:.2f} (goal >= 0.5)  "
          f"peak RSS geometry {geo['peak_rss_mb']:.0f} MB (read {rd['peak_rss_mb']:.0f} MB); "
          f"once per process: {geo['kernel_load_s']:.2f} s to load the compiled kernels")
    print(f"[{where}] with spectral figures {spec['seconds']:.2f} s: +{spec['seconds'] - geo['seconds']:.2f} s "
          f"for {len(MODELS)} models x {geo['bytes'] // (4 * 2048 * 4096 * 2) // 4 or 1} 2-D tensors each "
          f"(randomized SVD), peak RSS {spec['peak_rss_mb']:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--s3", action="store_true")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "ROOT"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    workdir = tempfile.mkdtemp(prefix="bench-geometry-")
    env = dict(os.environ)
    try:
        largest = build(workdir, args.gib)
        total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(workdir) for f in fs)
        print(f"synthetic set: base + {len(MODELS)} fine-tunes, {total / 2**30:.2f} GiB, "
              f"largest tensor {largest / 2**20:.0f} MiB, {os.cpu_count()} cores; best of {args.repeat}")
        measure("local", workdir, args.repeat, env)
        if args.s3:
            import boto3

            proc, endpoint = start_moto()
            env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                       AWS_ENDPOINT_URL_S3=endpoint)
            os.environ.update(env)
            try:
                from mergeaudit import store

                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-geometry")
                fs = store.locate("s3://bench-geometry/x").fs
                for name in ("base", *MODELS):
                    for f in os.listdir(os.path.join(workdir, name)):
                        fs.put_file(os.path.join(workdir, name, f), f"bench-geometry/set/{name}/{f}")
                measure("s3", "s3://bench-geometry/set", args.repeat, env)
            finally:
                proc.terminate()
                proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
