"""Throughput of the HF evaluation path on the CPU, and the share of time spent outside generation.

Scores a small Llama (default hidden 256, 4 layers; random weights: speed does not depend on
what it learned) on the shipped arithmetic and word-problem tasks through `evaluate_model`
(lm-eval's simple_evaluate with HFLM, then our verifiers), timing the model's `generate` calls
inside it. Prints samples per second and the share of wall time outside generation (lm-eval's
request building, tokenisation, padding, metrics, and our verification; goal < 10%), for
greedy decoding and for sampling 4 completions per prompt.

    .venv/bin/python benchmarks/bench_eval.py [--hidden 256] [--layers 4] [--limit 100]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
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
    print(f"model: {params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads; tasks {', '.join(tasks)}; "
          f"limit {args.limit}, batch {args.batch_size}")
    for label, extra in [("greedy", {}), ("4 samples, T=0.8", {"num_samples": 4, "temperature": 0.8})]:
        settings = EvalSettings(limit=args.limit, batch_size=args.batch_size, max_length=256, **extra)
        evaluate_model(model, tok, tasks[:1], EvalSettings(limit=2, batch_size=2))  # warm caches and imports
        generate_seconds[0] = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            result = evaluate_model(model, tok, tasks, settings)
        wall = time.perf_counter() - t0
        n = len(result.samples)
        outside = 1 - generate_seconds[0] / wall
        print(f"[{label}] {n} samples in {wall:.2f} s: {n / wall:.1f} samples/s; generation {generate_seconds[0]:.2f} s, "
              f"outside generation {outside:.1%} (goal < 10%)")


if __name__ == "__main__":
    main()
