"""Deterministic CPU training of the toy models on verifiable arithmetic.

Problems are random 2-digit additions and subtractions (`a+b=` -> `c`), never one of the shipped
test problems (`mergeaudit_add2`, `mergeaudit_sub2`). Supervised training puts the loss on the
answer characters and the newline that ends them; prompts carry no BOS token, exactly as lm-eval
feeds them. Text is encoded by a direct character lookup (the toy tokenizer's own ids; calling
the tokenizer per problem cost a third of a step). On one idle core of this machine a step of 64
problems takes about 25 ms.

    model = train_base(config, steps=1200, seed=0)                      # addition only
    train_supervised(model, Problems(["add", "sub"], 0), 300, 3e-4, 64, one_cycle=False)
    # an intermediate checkpoint: 1250 steps of a one-cycle schedule planned for 3000
    train_supervised(model, problems, 1250, 3e-3, 64, one_cycle=True, schedule_steps=3000)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import lru_cache
from importlib import resources

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergeaudit.toy.tokenizer import build_tokenizer

OPS = {"add": "+", "sub": "-"}


def heldout(skill: str) -> set[str]:
    """The questions of the shipped test set of a skill, which training never sees."""
    name = {"add": "add2.jsonl", "sub": "sub2.jsonl"}[skill]
    text = resources.files("mergeaudit.evaluation").joinpath("tasks", "arithmetic", name).read_text()
    return {json.loads(line)["question"] for line in text.splitlines() if line.strip()}


class Problems:
    """Random 2-digit problems of some skills, never from the test sets."""

    def __init__(self, skills: tuple[str, ...] | list[str], seed: int):
        self.skills = list(skills)
        self.rng = random.Random(seed)
        self.excluded = set().union(*(heldout(s) for s in self.skills))

    def sample(self) -> tuple[str, str]:
        while True:
            skill = self.rng.choice(self.skills)
            a, b = self.rng.randint(10, 99), self.rng.randint(10, 99)
            if skill == "sub" and b > a:
                a, b = b, a
            question = f"{a}{OPS[skill]}{b}="
            if question not in self.excluded:
                return question, str(a + b if skill == "add" else a - b)


@lru_cache(maxsize=1)
def _char_ids() -> dict[str, int]:
    return dict(build_tokenizer().get_vocab())


def encode(text: str) -> list[int]:
    """The toy tokenizer's ids of text (one token per character), without calling it."""
    ids = _char_ids()
    unk = ids["<unk>"]
    return [ids.get(ch, unk) for ch in text]


def supervised_batch(problems: Problems, tok, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n problems as (input_ids, labels), the loss on the answer and its newline only."""
    encoded, starts = [], []
    for _ in range(n):
        q, a = problems.sample()
        encoded.append(encode(f"{q}{a}\n"))
        starts.append(len(q))
    width = max(map(len, encoded))
    ids = torch.full((n, width), tok.pad_token_id)
    labels = torch.full((n, width), -100)
    for i, (enc, start) in enumerate(zip(encoded, starts)):
        ids[i, : len(enc)] = torch.tensor(enc)
        labels[i, start : len(enc)] = torch.tensor(enc[start:])
    return ids, labels


def adamw(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def train_supervised(
    model: LlamaForCausalLM,
    problems: Problems,
    steps: int,
    lr: float,
    batch_size: int,
    one_cycle: bool,
    schedule_steps: int | None = None,
    on_step: Callable[[int, LlamaForCausalLM, float], None] | None = None,
) -> float:
    """AdamW on teacher-forced answers; returns the mean loss of the last 20 steps.

    one_cycle: a one-cycle schedule over `schedule_steps` (default `steps`); stopping before its
    end gives an intermediate checkpoint of that run. `on_step(step, model, loss)` after each step."""
    tok = build_tokenizer()
    opt = adamw(model, lr)
    horizon = max(schedule_steps or steps, steps)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=horizon, pct_start=0.1) if one_cycle else None
    )
    model.train()
    losses = []
    for step in range(1, steps + 1):
        ids, labels = supervised_batch(problems, tok, batch_size)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, model, losses[-1])
            model.train()
    model.eval()
    tail = losses[-20:]
    return sum(tail) / max(len(tail), 1)


def train_base(
    config: LlamaConfig,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    skills: tuple[str, ...] = ("add",),
) -> LlamaForCausalLM:
    """A freshly initialised model trained for `steps` AdamW steps with a one-cycle schedule."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if steps > 0:
        train_supervised(model, Problems(skills, seed), steps, lr, batch_size, one_cycle=True)
    return model.eval()
