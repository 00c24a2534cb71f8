"""Deterministic CPU training of the toy base on verifiable arithmetic.

The base learns `a+b=` -> `c` for two-digit operands (the shipped `mergeaudit_add2` task), with
the loss on the answer characters only. Prompts carry no BOS token, exactly as lm-eval feeds
them. On 2 cores, 2,000 steps take about 30 s and reach most of the test set.

    model = train_base(config, steps=2000, seed=0)
"""

from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergeaudit.toy.tokenizer import build_tokenizer


def addition_batch(rng: random.Random, n: int, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """n random two-digit sums as (input_ids, labels) with the loss on the answer only."""
    eq = tok.convert_tokens_to_ids("=")
    encoded = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        encoded.append(tok(f"{a}+{b}={a + b}\n")["input_ids"])
    width = max(map(len, encoded))
    ids = torch.full((n, width), tok.pad_token_id)
    labels = torch.full((n, width), -100)
    for i, enc in enumerate(encoded):
        ids[i, : len(enc)] = torch.tensor(enc)
        answer = enc.index(eq) + 1
        labels[i, answer : len(enc)] = torch.tensor(enc[answer:])
    return ids, labels


def train_base(config: LlamaConfig, steps: int, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> LlamaForCausalLM:
    """A freshly initialised model trained for `steps` AdamW steps with a one-cycle schedule."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if steps <= 0:
        return model
    tok = build_tokenizer()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        ids, labels = addition_batch(rng, batch_size, tok)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
