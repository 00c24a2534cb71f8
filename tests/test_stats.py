"""Known answers for the statistics in mergeaudit.results.stats: hand-computed small cases,
closed forms, and simulations; and the scores the runner writes recomputed from its samples."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mergeaudit.errors import MergeAuditError
from mergeaudit.evaluation import EvalSettings
from mergeaudit.evaluation.arithmetic import make_problems
from mergeaudit.evaluation.runner import evaluate_lm
from mergeaudit.results import stats
from tests.oracle import TableLM


def test_pass_at_k_known_values_and_too_few_samples():
    assert stats.pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert stats.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2) = 1/6
    assert stats.pass_at_k(5, 1, 3) == pytest.approx(1 - 4 / 10)  # C(4,3)/C(5,3)
    assert stats.pass_at_k(4, 0, 4) == 0.0 and stats.pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(stats.SampleSizeError, match="pass@4"):
        stats.pass_at_k(2, 2, 4)  # used to return 1.0
    assert issubclass(stats.SampleSizeError, MergeAuditError)


def test_prompt_is_the_unit_hand_computed():
    # per-prompt means 1, 0, 0.5: mean 0.5, sd 0.5, se 0.5 / sqrt(3)
    value, se = stats.prompt_mean_stderr([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert value == pytest.approx(0.5) and se == pytest.approx(0.5 / math.sqrt(3))
    # over all 12 samples as if independent: sd of six ones and six zeros / sqrt(12)
    naive = stats.mean_stderr([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0])[1]
    assert naive == pytest.approx(math.sqrt(12 / 11 * 0.25 / 12))
    assert se / naive == pytest.approx(0.5 / math.sqrt(3) / math.sqrt(1 / 44), abs=1e-9)  # 1.915
    assert stats.prompt_mean_stderr([[1, 0]])[1] is None


def test_clustered_stderr_matches_the_spread_of_the_mean_in_simulation():
    """200 prompts x 8 samples with per-prompt difficulty: the clustered standard error matches
    the standard deviation of the score over 400 simulated evaluations; the per-sample one is
    ~2.5x too small (the understatement the issue measured)."""
    rng = np.random.default_rng(7)
    means, clustered, naive = [], [], []
    for _ in range(400):
        p = rng.beta(0.5, 0.5, size=200)
        samples = (rng.random((200, 8)) < p[:, None]).astype(float)
        value, se = stats.prompt_mean_stderr(samples.tolist())
        means.append(value)
        clustered.append(se)
        naive.append(stats.mean_stderr(samples.ravel().tolist())[1])
    truth = float(np.std(means, ddof=1))
    assert np.mean(clustered) == pytest.approx(truth, rel=0.1)
    assert 2.0 < np.mean(clustered) / np.mean(naive) < 3.0


def test_mcnemar_exact_known_values():
    assert stats.mcnemar(0, 17) == pytest.approx(0.5**17)
    assert stats.mcnemar(2, 8) == pytest.approx((45 + 10 + 1) / 1024)  # P[X >= 8], X ~ Bin(10, 1/2)
    assert stats.mcnemar(8, 2) == pytest.approx(1 - (1 + 10) / 1024)  # better: P[X >= 2]
    assert stats.mcnemar(0, 0) == 1.0


def test_paired_t_and_welch_against_closed_forms():
    # df = 2: the t cdf is 1/2 + t / (2 sqrt(2 + t^2)); diffs -1, -2, -3: t = -2 / (1 / sqrt 3)
    t, p = stats.paired_t([-1.0, -2.0, -3.0])
    assert t == pytest.approx(-2 * math.sqrt(3))
    assert p == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))
    assert stats.paired_t([-0.5, -0.5]) == (None, 0.0) and stats.paired_t([0.1]) == (None, None)
    z, p = stats.welch_z(0.6, 0.03, 0.5, 0.04)
    assert z == pytest.approx(2.0) and p == pytest.approx(0.5 * math.erfc(2 / math.sqrt(2)))
    assert stats.welch_z(0.6, None, 0.5, 0.04) == (None, None)


def test_paired_test_picks_its_test():
    before = {f"p{i}": [1.0] for i in range(40)}
    after = {**before, **{f"p{i}": [0.0] for i in range(17)}}
    mc = stats.paired_test(before, after)
    assert (mc.test, mc.n_shared, mc.n_better, mc.n_worse) == ("mcnemar", 40, 0, 17)
    assert mc.p_value == pytest.approx(0.5**17)
    multi = stats.paired_test({"a": [1, 0], "b": [1, 1], "c": [0, 1]}, {"a": [0, 0], "b": [1, 0], "c": [0, 0]})
    assert (multi.test, multi.n_worse, multi.n_better) == ("paired_t", 3, 0)
    assert multi.p_value == pytest.approx(stats.paired_t([-0.5, -0.5, -0.5])[1])
    assert stats.paired_test({"a": [1.0]}, {"b": [1.0]}).test == "none"


@pytest.mark.slow
def test_bootstrap_interval_of_a_mean_covers_the_truth():
    rng = random.Random(3)
    hits = 0
    for run in range(200):
        xs = [rng.gauss(1.0, 2.0) for _ in range(50)]
        lo, hi = stats.bootstrap_ci(xs, lambda u: sum(u) / len(u), iters=400, seed=run)
        hits += lo <= 1.0 <= hi
    assert hits >= 180  # 95% nominal; percentile intervals run a little narrow at n = 50


def test_runner_scores_recomputed_from_its_samples():
    """Every stderr the runner writes equals the documented formula applied to its sample rows:
    per-prompt mean (or per-prompt pass@k), then sd across prompts / sqrt(prompts)."""
    problems = make_problems("add", 2, 100, seed=2026)[:12]
    table = {}
    for i, p in enumerate(problems):  # prompt i: i % 5 of 4 samples right
        right = i % 5
        table[p["question"]] = [p["answer"]] * right + ["-1"] * (4 - right)
    result = evaluate_lm(
        TableLM(table), ["mergeaudit_add2"], EvalSettings(limit=12, num_samples=4, temperature=0.8, pass_k=(1, 2))
    )
    by_doc: dict[int, list[float]] = {}
    for s in result.samples:
        by_doc.setdefault(s["doc_id"], []).append(s["reward"])
    per_prompt = np.array([np.mean(v) for _, v in sorted(by_doc.items())])
    rows = {r["metric"]: r for r in result.scores}
    assert rows["numeric_match"]["n"] == 12
    assert rows["numeric_match"]["value"] == pytest.approx(per_prompt.mean())
    assert rows["numeric_match"]["stderr"] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(12))
    p2 = np.array([1 - math.comb(4 - int(4 * m), 2) / math.comb(4, 2) for m in per_prompt])
    assert rows["pass@2"]["value"] == pytest.approx(p2.mean())
    assert rows["pass@2"]["stderr"] == pytest.approx(p2.std(ddof=1) / math.sqrt(12))


@pytest.mark.slow
def test_barrier_bootstrap_intervals_cover_the_true_barrier():
    """200 simulated interpolation paths (150 prompts, 4 samples each, prompt difficulty shared
    along the path): the 95% bootstrap interval covers the true barrier (0.35) in >= 90% of runs."""
    from mergeaudit.results.fragility import barrier_ci, barrier_height

    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    truth = np.array([0.8, 0.6, 0.4, 0.55, 0.7])  # barrier at 0.5: 0.75 - 0.4
    true_height = barrier_height(list(zip(alphas, truth.tolist())))
    assert true_height == pytest.approx(0.35)
    rng = np.random.default_rng(11)
    hits, widths = 0, []
    for run in range(200):
        p = truth[None, :] + rng.uniform(-0.15, 0.15, size=(150, 1))
        per_prompt = rng.binomial(4, p) / 4.0
        lo, hi = barrier_ci(alphas, per_prompt, seed=run)
        hits += lo <= true_height <= hi
        widths.append(hi - lo)
    assert hits >= 180, hits
    assert 0.05 < np.mean(widths) < 0.25


def test_perturbation_drop_standard_error_is_paired_over_prompts():
    from mergeaudit.results.fragility import summarize
    from mergeaudit.results.scores import RunResults

    own = [[1.0], [1.0], [0.0], [1.0]]
    noisy = {0: [[1.0], [0.0], [0.0], [1.0]], 1: [[0.0], [1.0], [0.0], [1.0]]}
    cands = [{"candidate_id": "own", "name": "m", "kind": "checkpoint"}]
    cands += [
        {
            "candidate_id": f"g{s}",
            "name": f"noise{s}",
            "kind": "probe",
            "probe_family": "gaussian",
            "probe_path": "m",
            "probe_x": 0.1,
            "probe_seed": s,
        }
        for s in noisy
    ]
    samples, scores = [], []
    for cid, prompts in [("own", own)] + [(f"g{s}", v) for s, v in noisy.items()]:
        samples += [
            {"candidate_id": cid, "task": "t", "doc_id": i, "prompt_hash": None, "reward": r[0]}
            for i, r in enumerate(prompts)
        ]
        value, se = stats.prompt_mean_stderr(prompts)
        scores.append(
            {
                "candidate_id": cid,
                "task": "t",
                "metric": "numeric_match",
                "filter": "verifier",
                "value": value,
                "stderr": se,
                "n": 4,
            }
        )
    _, rows = summarize(RunResults("mem://", "r", {"candidates": cands, "scores": scores, "samples": samples}))
    drop = next(r for r in rows if r["metric"] == "score_drop")
    # per prompt: own - mean over seeds = 0.5, 0.5, 0, 0: mean 0.25, sd 0.2887, se 0.1443
    assert drop["value"] == pytest.approx(0.25) and drop["probe_x"] == 0.1
    assert drop["stderr"] == pytest.approx(np.std([0.5, 0.5, 0, 0], ddof=1) / 2)
