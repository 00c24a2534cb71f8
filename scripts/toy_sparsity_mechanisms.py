"""Which mechanism makes the toy's RLVR updates sparse in bf16: an ablation from the shipped base.

From the base the demo ships (mergeaudit.toy.experts, current recipe), on one skill, each variant
is trained with the recipe's seeds and step counts and measured as the demo's experts are (greedy
accuracy of the bf16 release, bf16 update sparsity over all entries and averaged over tensors,
share of fp32 master entries the optimiser moved at all, median |w| of changed and unchanged
matrix entries):

  rl              the recipe's GRPO expert (on-policy samples, group advantages, rl_lr)
  rft_at_rl_lr    rejection-sampling fine-tuning: likelihood of the policy's own correct samples
                  (on-policy data, no negative samples), rl_lr, rl_steps
  sft_at_rl_lr    supervised fine-tuning on the correct answers (off-policy data), rl_lr, rl_steps
  sft             the recipe's SFT expert (sft_lr, sft_steps)
  rl_at_sft_lr    GRPO at the SFT learning rate

rl vs rl_at_sft_lr and sft vs sft_at_rl_lr isolate the step size against bf16's resolution;
rft_at_rl_lr vs sft_at_rl_lr isolates on-policy against off-policy data at the same step size;
fp32 moved vs bf16 sparsity isolates the bf16 release. One thread; about 2 minutes per skill here.

    .venv/bin/python scripts/toy_sparsity_mechanisms.py [--skill add] [--skill sub]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaForCausalLM

from mergeaudit.toy.experts import ExpertRecipe, UpdateTracker, load_expert_family, shipped_root
from mergeaudit.toy.rl import greedy_accuracy, train_grpo
from mergeaudit.toy.train import Problems, train_supervised


def variant(base: LlamaForCausalLM, recipe: ExpertRecipe, skill: str, name: str) -> dict:
    k = list(recipe.skills).index(skill)
    sft_seed, rl_seed = recipe.seed + 100 + k, recipe.seed + 200 + k
    model = copy.deepcopy(base)
    tracker = UpdateTracker(base, recipe.log_every)
    t0 = time.perf_counter()
    if name in ("rl", "rl_at_sft_lr", "rft_at_rl_lr"):
        torch.manual_seed(rl_seed)
        lr = recipe.sft_lr if name == "rl_at_sft_lr" else recipe.rl_lr
        train_grpo(
            model,
            Problems([skill], rl_seed),
            recipe.rl_steps,
            lr,
            recipe.rl_prompts,
            recipe.rl_group,
            recipe.rl_temperature,
            recipe.max_new_tokens,
            seed=rl_seed,
            on_step=tracker,
            advantages="reward" if name == "rft_at_rl_lr" else "group",
        )
        steps = recipe.rl_steps
    else:
        torch.manual_seed(sft_seed)
        lr, steps = (recipe.sft_lr, recipe.sft_steps) if name == "sft" else (recipe.rl_lr, recipe.rl_steps)
        train_supervised(
            model, Problems([skill], sft_seed), steps, lr, recipe.batch_size, one_cycle=False, on_step=tracker
        )
    released = copy.deepcopy(model).to(torch.bfloat16).to(torch.float32).eval()
    return {
        "variant": name,
        "lr": lr,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "acc": greedy_accuracy(released, skill),
        **tracker.summary(model),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skill", action="append", choices=["add", "sub"], help="skills to run (default: add)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = ExpertRecipe()
    root = shipped_root(recipe)
    family = load_expert_family(str(root), recipe, verify=True) if root else None
    if family is None:
        raise SystemExit(f"no shipped toy experts for recipe {recipe.digest()}")
    base = LlamaForCausalLM.from_pretrained(family.base, dtype=torch.float32).eval()
    print(f"recipe {recipe.digest()}; base median |w| of matrices {family.log['base']['median_abs_w']}")
    print(
        f"{'skill':5s} {'variant':13s} {'lr':>7s} {'steps':>5s} {'gain':>6s} {'sparsity':>8s} {'(tensors)':>9s} "
        f"{'fp32 moved':>10s} {'|w| changed':>11s} {'unchanged':>9s} {'s':>4s}"
    )
    for skill in args.skill or ["add"]:
        base_acc = family.log["base"][f"acc_{skill}"]
        for name in ("rl", "rft_at_rl_lr", "sft_at_rl_lr", "sft", "rl_at_sft_lr"):
            r = variant(base, recipe, skill, name)
            print(
                f"{skill:5s} {name:13s} {r['lr']:7.0e} {r['steps']:5d} {r['acc'] - base_acc:+6.2f} "
                f"{r['sparsity_bf16']:8.3f} {r['sparsity_bf16_tensor_mean']:9.3f} {r['fp32_moved']:10.3f} "
                f"{r['median_abs_w_changed'] or 0:11.4f} {r['median_abs_w_unchanged'] or 0:9.4f} "
                f"{r['seconds']:4.0f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
