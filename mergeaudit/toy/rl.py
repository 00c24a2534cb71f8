"""On-policy RLVR for the toy models: GRPO-style policy gradient with the numeric verifier.

For each prompt a group of completions is sampled from the current policy, the numeric verifier
scores each (reward 1 or 0), and each completion's advantage is its reward minus the group's mean
over the group's standard deviation; a group that all agrees carries no signal and a step whose
groups all agree is skipped. The loss is the advantage-weighted log-probability of the sampled
tokens (up to and including the newline that ends an answer), averaged over those tokens.

    reward = train_grpo(model, Problems(["add"], 0), steps=300, lr=2e-6, n_prompts=16, group=8,
                        temperature=1.0, max_new_tokens=4, seed=0)
    greedy_accuracy(model, "add")   # greedy exact answers on the shipped test problems
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources

import torch
from transformers import LlamaForCausalLM

from mergeaudit.evaluation.verifiers import verify_numeric
from mergeaudit.toy.tokenizer import build_tokenizer
from mergeaudit.toy.train import Problems, adamw, encode

TEST_FILES = {"add": "add2.jsonl", "sub": "sub2.jsonl"}


@torch.no_grad()
def sample_completions(
    model: LlamaForCausalLM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Sampled continuations (batch x max_new_tokens) of equal-length prompts, with a KV cache."""
    out = model(input_ids=prompt_ids, use_cache=True)
    cache, logits = out.cache, out.logits[:, -1]
    tokens = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        tokens.append(nxt)
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(tokens, dim=1)


def answer_mask(completions: torch.Tensor, newline: int) -> torch.Tensor:
    """1 for the tokens up to and including the first newline (the answer), 0 after it."""
    is_nl = completions == newline
    after = (is_nl.cumsum(dim=1) - is_nl.long()) > 0
    return ~after


def rewards_of(texts: list[str], answers: list[str]) -> torch.Tensor:
    """The numeric verifier's reward of each completion's first line."""
    return torch.tensor([verify_numeric(t.split("\n")[0], a).reward for t, a in zip(texts, answers)])


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + 1e-4): zero where a group all agrees."""
    grouped = rewards.view(-1, group)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


def train_grpo(
    model: LlamaForCausalLM,
    problems: Problems,
    steps: int,
    lr: float,
    n_prompts: int,
    group: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    on_step: Callable[[int, LlamaForCausalLM, float, float], None] | None = None,
    advantages: str = "group",
) -> float:
    """On-policy policy gradient with group-normalised advantages and the numeric verifier as
    the reward; returns the mean reward over the last 20 steps. `on_step(step, model, mean
    reward, share of groups with signal)` after each step.

    advantages="reward" uses the reward itself (1 for a correct sample, 0 otherwise): the
    likelihood of the policy's own correct answers, i.e. rejection-sampling fine-tuning, an
    on-policy supervised baseline with no negative samples."""
    if advantages not in ("group", "reward"):
        raise ValueError(f"advantages must be 'group' or 'reward', not {advantages!r}")
    tok = build_tokenizer()
    newline = tok.convert_tokens_to_ids("\n")
    opt = adamw(model, lr)
    gen = torch.Generator().manual_seed(seed)
    rewards_seen = []
    for step in range(1, steps + 1):
        batch = [problems.sample() for _ in range(n_prompts)]
        prompts = torch.tensor([encode(q) for q, _ in batch]).repeat_interleave(group, dim=0)
        model.eval()
        completions = sample_completions(model, prompts, max_new_tokens, temperature, gen)
        keep = answer_mask(completions, newline)
        texts = tok.batch_decode(completions.masked_fill(~keep, tok.pad_token_id), skip_special_tokens=True)
        rewards = rewards_of(texts, [a for _, a in batch for _ in range(group)])
        adv = group_advantages(rewards, group) if advantages == "group" else rewards
        rewards_seen.append(float(rewards.mean()))
        signal = float((rewards.view(-1, group).std(1) > 0).float().mean())
        if adv.abs().sum():  # else every group agreed: no signal this step
            model.train()
            mask = keep.float()
            seq = torch.cat([prompts, completions], dim=1)
            logits = model(input_ids=seq).logits[:, prompts.shape[1] - 1 : -1].float()
            logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
            loss = -((logp * mask).sum(1) * adv).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_step is not None:
            on_step(step, model, rewards_seen[-1], signal)
    model.eval()
    tail = rewards_seen[-20:]
    return sum(tail) / max(len(tail), 1)


def heldout_rows(skill: str, limit: int | None = None) -> list[dict]:
    """The shipped held-out test problems of a skill (what the demo's tasks score)."""
    text = resources.files("mergeaudit.evaluation").joinpath("tasks", "arithmetic", TEST_FILES[skill]).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()][:limit]


@torch.no_grad()
def greedy_accuracy(model: LlamaForCausalLM, skill: str, limit: int = 100) -> float:
    """Greedy exact answers on the shipped test problems of a skill (a quick training check)."""
    tok = build_tokenizer()
    rows = heldout_rows(skill, limit)
    prompts = torch.tensor([encode(r["question"]) for r in rows])
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    texts = tok.batch_decode(out[:, prompts.shape[1] :], skip_special_tokens=True)
    return float(rewards_of(texts, [r["answer"] for r in rows]).mean())


@torch.no_grad()
def sampled_reward(
    model: LlamaForCausalLM,
    problems: list[tuple[str, str]],
    group: int,
    temperature: float,
    seed: int,
    max_new_tokens: int = 4,
) -> float:
    """Mean verifier reward of `group` sampled completions per problem (fixed generator)."""
    tok = build_tokenizer()
    newline = tok.convert_tokens_to_ids("\n")
    prompts = torch.tensor([encode(q) for q, _ in problems]).repeat_interleave(group, dim=0)
    completions = sample_completions(
        model.eval(), prompts, max_new_tokens, temperature, torch.Generator().manual_seed(seed)
    )
    keep = answer_mask(completions, newline)
    texts = tok.batch_decode(completions.masked_fill(~keep, tok.pad_token_id), skip_special_tokens=True)
    return float(rewards_of(texts, [a for _, a in problems for _ in range(group)]).mean())
