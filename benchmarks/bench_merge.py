"""TIES over three fine-tunes: mergeaudit's streaming executor vs mergekit, same config, same run.

Builds a synthetic Llama-shaped bf16 base (sizes: small 0.31 GB, hidden 1024, 8 layers; default
0.98 GB, hidden 2048, 8 layers; large 2.43 GB, 24 layers; vocab 32000) and three fine-tunes that
each change a random 10% of the entries, then runs the same mergekit YAML (ties, density 0.3,
dtype float32, out_dtype bfloat16) through `mergekit`'s run_merge and through
`mergeaudit merge`, each in a fresh subprocess so peak RSS (VmHWM) belongs to one merge, and prints the
wall-time ratio (goal <= 0.5), the peak-RSS ratio (goal <= 1.0) and GB/s against the bytes read
and written. Both outputs are compared tensor by tensor. With --device cuda the mergeaudit run
uses the GPU. Measured numbers are in README.md (Benchmarks).

    .venv/bin/python benchmarks/bench_merge.py [--size small,default,large|all] [--layers N]
        [--device cpu|cuda] [--skip-mergekit] [--tie-cost]
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

import yaml

sys.path.insert(0, os.path.dirname(__file__))
from bench_io import peak_rss_mb


def worker(tool: str, config: str, out: str, device: str) -> dict:
    t0 = time.perf_counter()
    if tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        with open(config) as fh:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(fh))
        run_merge(cfg, out, MergeOptions(copy_tokenizer=False, lazy_unpickle=True, device=device))
    else:
        from mergeaudit.merging.executor import run_merge
        from mergeaudit.merging.mergekit_yaml import load_mergekit_config

        run_merge(load_mergekit_config(config, device=device), out)
    return {"tool": tool, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


SIZES = {  # name: (hidden, intermediate, layers); vocab 32000, untied head
    "small": (1024, 2816, 8),  # 0.16 GB per checkpoint (80M parameters)
    "default": (2048, 5632, 8),  # 0.98 GB
    "large": (2048, 5632, 24),  # 2.6 GB
}


def build(root: str, size: str, layers: int | None = None) -> tuple[list[str], int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergeaudit.checkpoint import CheckpointWriter

    hidden, inter, n_layers = SIZES[size]
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers or n_layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    config = {**cfg.to_dict(), "dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]}
    g = torch.Generator().manual_seed(0)
    names = ["base", "ft_a", "ft_b", "ft_c"]
    nbytes = 0
    writers = {n: CheckpointWriter(os.path.join(root, n), config=config) for n in names}
    for tensor, shape in shapes.items():
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        writers["base"].add(tensor, w)
        nbytes += w.numel() * 2
        for n in names[1:]:
            mask = torch.rand(shape, generator=g) < 0.1
            delta = torch.randn(shape, generator=g) * 0.002
            writers[n].add(tensor, (w.float() + mask * delta).to(torch.bfloat16))
    for w in writers.values():
        w.close()
    return [os.path.join(root, n) for n in names], nbytes


def tie_cost(fts: list[str], base: str, density: float) -> None:
    """The cost of picking mergekit's entries among equal magnitudes at the top-k threshold:
    magnitude selection of every fine-tune delta (fp32 compute of bf16 inputs, as the bench's
    config) with and without it, and how many deltas had ties straddling the threshold."""
    import torch

    from mergeaudit.checkpoint import Checkpoint
    from mergeaudit.merging import steps

    b = Checkpoint.open(base)
    times = {False: 0.0, True: 0.0}
    straddled = total = 0
    for ft in fts:
        ck = Checkpoint.open(ft)
        for name in b.keys():
            delta = ck.get(name).float() - b.get(name).float()
            for exact in (False, True):
                t0 = time.perf_counter()
                kept = steps.sparsify_magnitude(delta, density, sort_ties=exact)
                times[exact] += time.perf_counter() - t0
            fast = steps.sparsify_magnitude(delta, density)
            straddled += int(not torch.equal(kept, fast) or _ties_at_threshold(delta, density))
            total += 1
    print(
        f"tie-exact selection: {times[True]:.2f} s vs {times[False]:.2f} s by index ({total} deltas, "
        f"{straddled} with equal magnitudes straddling the threshold)"
    )


def _ties_at_threshold(delta, density: float) -> bool:
    a = delta.abs().reshape(-1)
    nz = a[a != 0]
    k = max(1, int(density * a.numel()))
    if k >= nz.numel():
        return False
    thr = nz.kthvalue(nz.numel() - k + 1).values
    return int((nz > thr).sum()) + int((nz == thr).sum()) != k


def run_worker(tool: str, config: str, out: str, device: str) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--worker", tool, config, out, device], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(a: str, b: str) -> float:

    from mergeaudit.checkpoint import Checkpoint

    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    worst = 0.0
    for name, t in ca.iter_tensors():
        worst = max(worst, float((t.float() - cb.get(name).float()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="default", help=f"comma-separated: {', '.join(SIZES)} (or all)")
    ap.add_argument("--layers", type=int, default=None, help="override the size's layer count")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--tie-cost", action="store_true", help="also time tie-exact magnitude selection")
    ap.add_argument("--worker", nargs=4, metavar=("TOOL", "CONFIG", "OUT", "DEVICE"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    for size in list(SIZES) if args.size == "all" else args.size.split(","):
        bench(size, args)


def bench(size: str, args: argparse.Namespace) -> None:
    root = tempfile.mkdtemp(prefix="bench-merge-")
    try:
        (base, *fts), nbytes = build(root, size, args.layers)
        config = os.path.join(root, "ties.yaml")
        with open(config, "w") as fh:
            yaml.safe_dump(
                {
                    "merge_method": "ties",
                    "base_model": base,
                    "dtype": "float32",
                    "out_dtype": "bfloat16",
                    "parameters": {"density": 0.3, "weight": 1.0},
                    "models": [{"model": m} for m in fts],
                },
                fh,
            )
        moved = 5 * nbytes  # four inputs read, one output written
        print(
            f"[{size}] synthetic bf16 Llama: {nbytes / 1e9:.2f} GB per checkpoint, base + 3 fine-tunes; "
            f"TIES density 0.3, fp32 compute, bf16 out; {os.cpu_count()} cores, device {args.device}"
        )
        ours = run_worker("mergeaudit", config, os.path.join(root, "out_ours"), args.device)
        print(
            f"mergeaudit {ours['seconds']:6.1f} s  peak RSS {ours['peak_rss_mb']:6.0f} MB  "
            f"{moved / ours['seconds'] / 1e9:.2f} GB/s of bytes read + written"
        )
        if args.tie_cost:
            tie_cost(fts, base, density=0.05)  # below the 10% of changed entries: a real threshold
        if not args.skip_mergekit:
            theirs = run_worker("mergekit", config, os.path.join(root, "out_mergekit"), args.device)
            print(
                f"mergekit   {theirs['seconds']:6.1f} s  peak RSS {theirs['peak_rss_mb']:6.0f} MB  "
                f"{moved / theirs['seconds'] / 1e9:.2f} GB/s"
            )
            print(
                f"ratio mergeaudit/mergekit: wall {ours['seconds'] / theirs['seconds']:.2f} (goal <= 0.5), "
                f"peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} (goal <= 1.0); "
                f"max |difference| of the outputs "
                f"{compare(os.path.join(root, 'out_ours'), os.path.join(root, 'out_mergekit')):.2e}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
