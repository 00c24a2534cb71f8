"""Throughput of the HF evaluation path on the CPU, and the share of time spent outside generation.

Scores a small Llama (default hidden 256, 4 layers; random weights: speed does not depend on
what it learned) on the shipped arithmetic and word-problem tasks through `evaluate_model`
(lm-eval's simple_evaluate with HFLM, then our verifiers), timing the model's `generate` calls
inside it. Prints samples per second and the share of wall time outside generation (lm-eval's
request building, tokenisation, padding, metrics, and our verification; goal < 10%), for
greedy decoding and for sampling 4 completions per prompt.

With --served the same model is also scored through the served backend (`transformers serve`
on this CPU, started once): samples per second against the in-process path, and the share of
wall time outside the requests' generation (the union of the requests' in-flight intervals;
goal < 10%). The server's start is reported apart (it is paid once per candidate).

Measured 2026-11-28 on the 2-core machine beside a training job (load ~2.4), --limit 50, 12.6M
parameters: in-process greedy 36.2 samples/s (outside generation 8.0%), 4 samples at T=0.8 11.5
samples/s (0.9%); served: transformers serve ready in 13.1 s, greedy 0.7 samples/s (0.02x
in-process), sampled 0.9 samples/s (0.08x; sampled requests go one at a time there), outside the
requests 0.1% in both. transformers serve answers one request at a time, 0.2-1.2 s each for 8
tokens of this model (a curl to it alone: 0.09 s on the 1.6M-parameter toy): on a CPU it is a
test double for the GPU path (vllm serve), not a way to score faster; `--continuous-batching`
made it 2x faster after a 23 s warm-up.

    .venv/bin/python benchmarks/bench_eval.py [--hidden 256] [--layers 4] [--limit 100] [--served]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


MODES = [("greedy", {}), ("4 samples, T=0.8", {"num_samples": 4, "temperature": 0.8})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--served", action="store_true", help="also score through transformers serve")
    ap.add_argument("--concurrent", type=int, default=4, help="requests in flight (served, greedy)")
    args = ap.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaForCausalLM

    from mergeaudit.evaluation import EvalSettings, evaluate_model
    from mergeaudit.toy.models import tiny_llama_config
    from mergeaudit.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden=args.hidden, layers=args.layers)).eval()
    params = sum(p.numel() for p in model.parameters())
    generate_seconds = [0.0]
    original = HFLM._model_generate

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            generate_seconds[0] += time.perf_counter() - t0

    HFLM._model_generate = timed
    tasks = ["mergeaudit_add2", "mergeaudit_word_problems"]
    print(
        f"model: {params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads; tasks {', '.join(tasks)}; "
        f"limit {args.limit}, batch {args.batch_size}"
    )
    rates = {}
    for label, extra in MODES:
        settings = EvalSettings(limit=args.limit, batch_size=args.batch_size, max_length=256, **extra)
        evaluate_model(model, tok, tasks[:1], EvalSettings(limit=2, batch_size=2))  # warm caches and imports
        generate_seconds[0] = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            result = evaluate_model(model, tok, tasks, settings)
        wall = time.perf_counter() - t0
        n = len(result.samples)
        outside = 1 - generate_seconds[0] / wall
        rates[label] = n / wall
        print(
            f"[{label}] {n} samples in {wall:.2f} s: {n / wall:.1f} samples/s; "
            f"generation {generate_seconds[0]:.2f} s, outside generation {outside:.1%} (goal < 10%)"
        )
    if args.served:
        served(model, tok, tasks, args, rates)


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (requests in flight at once count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def served(model, tok, tasks: list[str], args, rates: dict[str, float]) -> None:
    import tempfile

    from mergeaudit.evaluation.runner import EvalSettings, check_tasks, run_tasks
    from mergeaudit.evaluation.served import ServerSettings, serve, served_lm

    with tempfile.TemporaryDirectory(prefix="bench-served-") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        server = ServerSettings(engine="transformers", dtype="float32", device="cpu", num_concurrent=args.concurrent)
        t0 = time.perf_counter()
        with serve(tmp, server) as endpoint:
            print(f"[served] transformers serve ready in {time.perf_counter() - t0:.1f} s (once per candidate)")
            for label, extra in MODES:
                settings = EvalSettings(limit=args.limit, max_length=256, **extra)
                lm = served_lm(endpoint, tmp, settings, server)
                intervals: list[tuple[float, float]] = []
                for target in (lm, getattr(lm, "chat", None)):
                    if target is not None:
                        time_requests(target, intervals)
                t0 = time.perf_counter()
                result = run_tasks(lm, check_tasks(tasks), settings)
                wall = time.perf_counter() - t0
                n, busy = len(result.samples), busy_seconds(intervals)
                print(
                    f"[served {label}] {n} samples in {wall:.2f} s: {n / wall:.1f} samples/s "
                    f"({n / wall / rates[label]:.2f}x in-process); requests in flight {busy:.2f} s, "
                    f"outside generation {1 - busy / wall:.1%} (goal < 10%)"
                )


def time_requests(lm, intervals: list[tuple[float, float]]) -> None:
    """Record when each HTTP request of an lm-eval API model is in flight (sync and async paths)."""
    sync, asynchronous = lm.model_call, lm.amodel_call

    def model_call(*a, **kw):
        t0 = time.perf_counter()
        try:
            return sync(*a, **kw)
        finally:
            intervals.append((t0, time.perf_counter()))

    async def amodel_call(*a, **kw):
        t0 = time.perf_counter()
        try:
            return await asynchronous(*a, **kw)
        finally:
            intervals.append((t0, time.perf_counter()))

    lm.model_call, lm.amodel_call = model_call, amodel_call


if __name__ == "__main__":
    main()
