"""The uncertainties the demo verdict prints (mergeaudit.results.intervals), on constructed rows
whose answers are known."""

from __future__ import annotations

import pytest

from mergeaudit.results.intervals import (
    gain_kept_interval,
    jaccard_lift_interval,
    paired_difference,
    principal_lift_interval,
)
from mergeaudit.results.scores import RunResults
from mergeaudit.results.stats import mean_stderr

TASK = "mergeaudit_add2"


def run_with(per_prompt: dict[str, list[float]], **tables) -> RunResults:
    cands = [{"candidate_id": f"c-{name}", "name": name, "kind": "checkpoint"} for name in per_prompt]
    samples = [
        {"candidate_id": f"c-{name}", "task": TASK, "doc_id": i, "prompt_hash": f"p{i}", "reward": v}
        for name, values in per_prompt.items()
        for i, v in enumerate(values)
    ]
    scores = [
        {
            "candidate_id": f"c-{name}",
            "task": TASK,
            "metric": "numeric_match",
            "value": sum(v) / len(v),
            "stderr": mean_stderr(v)[1],
            "n": len(v),
        }
        for name, v in per_prompt.items()
    ]
    return RunResults("mem://r", "r1", {"candidates": cands, "samples": samples, "scores": scores, **tables})


def test_paired_difference_uses_the_prompt_as_the_unit():
    base = [0, 1, 0, 1, 0, 1, 0, 0, 1, 0]
    expert = [1, 1, 0, 1, 1, 1, 0, 1, 1, 0]  # fixes 3 prompts, breaks none
    run = run_with({"base": base, "expert": expert})
    diff = paired_difference(run, "expert", "base", TASK)
    expected = mean_stderr([e - b for e, b in zip(expert, base)])
    assert diff.paired and diff.n == 10 and diff.value == pytest.approx(0.3)
    assert diff.stderr == pytest.approx(expected[1])
    # unpaired, the same gain looks far noisier: that is what pairing buys
    assert diff.stderr < (mean_stderr(base)[1] ** 2 + mean_stderr(expert)[1] ** 2) ** 0.5
    assert paired_difference(run, "expert", "nobody", TASK) is None
    no_samples = RunResults("mem://r", "r1", {**run.rows, "samples": []})
    fallback = paired_difference(no_samples, "expert", "base", TASK)
    assert not fallback.paired and fallback.value == pytest.approx(0.3)


def test_gain_kept_interval_brackets_the_share_kept():
    base = [0.0] * 20 + [1.0] * 20
    expert = [1.0] * 20 + [1.0] * 20  # gains 20 prompts
    merge = [1.0] * 10 + [0.0] * 10 + [1.0] * 20  # keeps half of them
    run = run_with({"base": base, "expert": expert, "m": merge})
    lo, hi = gain_kept_interval(run, "m", {"expert": TASK}, "base")
    assert lo < 0.5 < hi and 0.2 < lo and hi < 0.8
    kept_all = run_with({"base": base, "expert": expert, "m": expert})
    assert gain_kept_interval(kept_all, "m", {"expert": TASK}, "base") == (1.0, 1.0)


def tensor_pair(name: str, numel: int, a: int, b: int, overlap: int) -> dict:
    return {
        "scope": "tensor",
        "model_a": "x",
        "model_b": "y",
        "tensor": name,
        "numel": numel,
        "changed_a": a,
        "changed_b": b,
        "overlap": overlap,
        "overlap_chance": a * b / numel,
    }


def test_jaccard_lift_interval_over_tensors():
    # every tensor overlaps twice as often as chance: the lift and its whole interval are above 1
    rows = [tensor_pair(f"t{i}", 1000, 100 + 10 * i, 100, 2 * (100 + 10 * i) * 100 // 1000) for i in range(12)]
    run = RunResults("mem://r", "r1", {"geometry_pairs": rows})
    lo, hi = jaccard_lift_interval(run, "x", "y")
    assert 1.5 < lo <= hi < 2.5
    chance = [tensor_pair(f"t{i}", 1000, 200, 200, 40) for i in range(12)]  # exactly chance everywhere
    lo, hi = jaccard_lift_interval(RunResults("mem://r", "r1", {"geometry_pairs": chance}), "x", "y")
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    assert jaccard_lift_interval(run, "x", "z") is None


def test_principal_lift_interval_pairs_tensors_across_models():
    rows = []
    for i in range(10):
        for model, inside in (("a", 5), ("b", 15)):  # a avoids the principal mask, b seeks it
            rows.append(
                {
                    "scope": "tensor",
                    "model": model,
                    "tensor": f"t{i}",
                    "principal_changed": 100,
                    "principal_overlap": inside,
                    "principal_overlap_chance": 0.1,
                }
            )
    run = RunResults("mem://r", "r1", {"geometry_tensors": rows})
    assert principal_lift_interval(run, ["a"]) == pytest.approx((0.5, 0.5))
    assert principal_lift_interval(run, ["a", "b"]) == pytest.approx((1.0, 1.0))
    rows[0]["principal_overlap"] = 50  # one tensor of a far inside: a wider interval, above 0.5
    lo, hi = principal_lift_interval(RunResults("mem://r", "r1", {"geometry_tensors": rows}), ["a"])
    assert lo >= 0.5 and hi > 0.9
