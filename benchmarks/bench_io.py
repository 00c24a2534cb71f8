"""Streaming checkpoint reads vs a plain sequential read of the same bytes, local and S3.

Builds a synthetic bf16 checkpoint (default 1 GiB: 32 tensors of 4096x4096 in 4 shards), puts
a copy on a local S3 endpoint (moto's server in its own process, so its memory is not ours),
then times, each in a fresh subprocess so peak RSS belongs to one measurement:

  baseline  every file read start to end in 16 MiB chunks (local: open/read; S3: one
            streaming GET per file through s3fs)
  stream    Checkpoint.open + iter_tensors: header ranged reads, then one ranged read per
            tensor with the default prefetch window

and prints throughput, the ratio stream/baseline (goal >= 0.8) and peak RSS against the goal
3 x largest tensor + 300 MB.

    .venv/bin/python benchmarks/bench_io.py [--gib 1] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CHUNK = 16 * 1024 * 1024
BUCKET = "bench-io"


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, where: str, uri: str) -> dict:
    import warnings

    import torch

    from mergeaudit import store
    from mergeaudit.checkpoint import Checkpoint

    warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def touch(u8: torch.Tensor) -> torch.Tensor:
        # Both modes read every byte they deliver (a zero-copy mapping is not a free read).
        return u8[::64].sum() if u8.numel() else torch.tensor(0)

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    nbytes, checksum = 0, 0
    if mode == "baseline":
        for fi in store.list_files(uri).values():
            if not fi.uri.endswith(".safetensors"):
                continue
            loc = store.locate(fi.uri)
            opener = open(loc.path, "rb") if where == "local" else loc.fs.open(loc.path, "rb", block_size=CHUNK)
            with opener as fh:
                while chunk := fh.read(CHUNK):
                    nbytes += len(chunk)
                    checksum += int(touch(torch.frombuffer(bytearray(0) if not chunk else chunk, dtype=torch.uint8)))
    else:
        ck = Checkpoint.open(uri)
        for _name, tensor in ck.iter_tensors():
            nbytes += tensor.numel() * tensor.element_size()
            checksum += int(touch(tensor.reshape(-1).view(torch.uint8)))
    seconds = time.perf_counter() - t0
    return {
        "mode": mode,
        "where": where,
        "bytes": nbytes,
        "seconds": seconds,
        "checksum": checksum,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss0,
    }


def build(workdir: str, gib: float) -> tuple[str, int]:
    import torch

    from mergeaudit.checkpoint import CheckpointWriter

    n = max(1, round(gib * 32))
    shard = (n * 32 * 1024 * 1024) // 4 + 1
    uri = os.path.join(workdir, "synthetic")
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(uri, config={"model_type": "llama"}, max_shard_bytes=shard) as w:
        for i in range(n):
            w.add(f"model.layers.{i}.mlp.up_proj.weight", torch.randn(4096, 4096, generator=g).to(torch.bfloat16))
    return uri, 4096 * 4096 * 2


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return proc, endpoint


def run_worker(mode: str, where: str, uri: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", mode, where, uri], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "WHERE", "URI"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-io-")
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    proc, endpoint = start_moto()
    env["AWS_ENDPOINT_URL_S3"] = endpoint
    os.environ.update(
        {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}
    )
    try:
        import boto3

        from mergeaudit import store

        local, largest = build(workdir, args.gib)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        remote = f"s3://{BUCKET}/synthetic"
        for name, fi in store.list_files(local).items():
            store.locate(remote).fs.put_file(fi.uri, f"{BUCKET}/synthetic/{name}")
        total = sum(fi.size for fi in store.list_files(local).values() if fi.uri.endswith(".safetensors"))
        print(
            f"synthetic checkpoint: {total / 2**30:.2f} GiB in "
            f"{sum(1 for n in store.list_files(local) if n.endswith('.safetensors'))} shards, "
            f"largest tensor {largest / 2**20:.0f} MiB; best of {args.repeat} runs each"
        )
        goal_rss = 3 * largest / 2**20 + 300
        for where, uri in (("local", local), ("s3", remote)):
            best = {}
            for _ in range(args.repeat):
                for mode in ("baseline", "stream"):
                    r = run_worker(mode, where, uri, env)
                    assert r["bytes"] >= total * 0.99 if mode == "baseline" else r["bytes"] > 0
                    if mode not in best or r["seconds"] < best[mode]["seconds"]:
                        best[mode] = {**r, "peak_rss_mb": max(r["peak_rss_mb"], best.get(mode, r)["peak_rss_mb"])}
            b, s = best["baseline"], best["stream"]
            print(
                f"[{where}] baseline {b['bytes'] / b['seconds'] / 2**20:7.0f} MiB/s  "
                f"stream {s['bytes'] / s['seconds'] / 2**20:7.0f} MiB/s  "
                f"ratio {b['seconds'] / s['seconds']:.2f} (goal >= 0.8)  "
                f"peak RSS stream {s['peak_rss_mb']:.0f} MB, baseline {b['peak_rss_mb']:.0f} MB "
                f"(goal <= {goal_rss:.0f} MB)"
            )
    finally:
        proc.terminate()
        proc.wait()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
