"""The statistics behind every conclusion a run draws, each with its formula stated once.

Scores averaged over samples use the *prompt* as the unit: several samples of one prompt are
not independent, so the standard error over all samples understates the error (2.2-2.8x with 8
samples per prompt on the demo's data). For prompts i = 1..P with per-prompt values x_i (the
mean reward over the prompt's samples, or its pass@k estimate):

    value  = (1/P) sum_i x_i
    stderr = sqrt( sum_i (x_i - value)^2 / (P - 1) ) / sqrt(P)          (None when P < 2)

Comparisons of two runs on the prompts they share (d_i = current_i - previous_i):
- `mcnemar`: one sample per prompt and 0/1 scores: McNemar's exact test, the binomial test on
  the discordant pairs (b prompts better, c worse): p = P[X >= c], X ~ Binomial(b + c, 1/2);
- `paired_t`: otherwise, the paired t-test on per-prompt means: t = mean(d) / (sd(d) / sqrt(n)),
  p = P[T_{n-1} <= t];
- `welch_z`: only when the prompts differ (or no per-prompt data exists): z = (previous - current)
  / sqrt(se_prev^2 + se_cur^2), p = P[Z >= z].
Every p-value is one-sided, H1: the current run is worse (the alarm looks for drops).

`bootstrap_ci` resamples prompts (the unit) with replacement: percentile interval of a statistic.
scipy (pinned in requirements/constraints.txt) is the reference implementation of the
distributions.

    value, se = prompt_mean_stderr([[1, 0, 1], [0, 0, 0]])
    test = paired_test(previous_by_prompt, current_by_prompt)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Literal

import pydantic

from mergeaudit.errors import MergeAuditError

TestName = Literal["mcnemar", "paired_t", "welch_z", "none"]


class SampleSizeError(MergeAuditError, ValueError):
    """A statistic asked of fewer samples than it needs (pass@k with n < k)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), for n samples
    of which c are correct. n < k cannot estimate pass@k: SampleSizeError."""
    if k < 1 or n < k or not 0 <= c <= n:
        raise SampleSizeError(f"pass@{k} needs 1 <= k <= n samples and 0 <= c <= n correct (n={n}, c={c})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of independent values: sd (n - 1 denominator) / sqrt(n)."""
    n = len(values)
    if n == 0:
        raise SampleSizeError("the mean of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def prompt_mean_stderr(per_prompt: Sequence[Sequence[float]]) -> tuple[float, float | None]:
    """Value and standard error with the prompt as the unit: each prompt's samples are averaged
    first, then mean and standard error are taken across prompts."""
    return mean_stderr([sum(xs) / len(xs) for xs in per_prompt if len(xs)])


class PairedTest(pydantic.BaseModel):
    """The outcome of comparing a current run's score with a previous run's."""

    model_config = pydantic.ConfigDict(frozen=True)
    test: TestName
    n_shared: int = 0  # prompts in both runs (0 for welch_z)
    n_better: int = 0  # shared prompts whose score went up
    n_worse: int = 0  # ... and down
    statistic: float | None = None
    p_value: float | None = None  # one-sided, H1: current is worse


def mcnemar(n_better: int, n_worse: int) -> float:
    """One-sided exact McNemar p-value: P[X >= n_worse], X ~ Binomial(n_better + n_worse, 1/2)."""
    from scipy.stats import binomtest

    n = n_better + n_worse
    return 1.0 if n == 0 else float(binomtest(n_worse, n, 0.5, alternative="greater").pvalue)


def paired_t(diffs: Sequence[float]) -> tuple[float | None, float | None]:
    """(t, one-sided p) of the paired t-test on current - previous per-prompt differences."""
    from scipy.stats import t as t_dist

    n = len(diffs)
    if n < 2:
        return None, None
    mean, se = mean_stderr(diffs)
    if not se:
        return (None, 0.0) if mean < 0 else (None, 1.0)
    stat = mean / se
    return stat, float(t_dist.cdf(stat, n - 1))


def welch_z(
    previous: float, se_previous: float | None, current: float, se_current: float | None
) -> tuple[float | None, float | None]:
    """(z, one-sided p) of the unpaired comparison from two values and their standard errors."""
    from scipy.stats import norm

    ses = [s for s in (se_previous, se_current) if s is not None and math.isfinite(s)]
    if len(ses) < 2:
        return None, None
    se = math.sqrt(sum(s * s for s in ses))
    drop = previous - current
    if se == 0:
        return None, 0.0 if drop > 0 else 1.0
    return drop / se, float(norm.sf(drop / se))


def paired_test(previous: dict[str, Sequence[float]], current: dict[str, Sequence[float]]) -> PairedTest:
    """Compare per-prompt samples of two runs on their shared prompts (keys): McNemar's exact
    test when every shared prompt has one 0/1 sample in both runs, else the paired t-test on
    per-prompt means. No shared prompt: test 'none' (the caller falls back to welch_z)."""
    shared = sorted(previous.keys() & current.keys())
    if not shared:
        return PairedTest(test="none")
    prev = [sum(previous[k]) / len(previous[k]) for k in shared]
    cur = [sum(current[k]) / len(current[k]) for k in shared]
    diffs = [c - p for p, c in zip(prev, cur)]
    better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    binary = all(len(previous[k]) == 1 and len(current[k]) == 1 for k in shared) and all(
        v in (0.0, 1.0) for v in prev + cur
    )
    if binary:
        return PairedTest(
            test="mcnemar",
            n_shared=len(shared),
            n_better=better,
            n_worse=worse,
            statistic=float(worse),
            p_value=mcnemar(better, worse),
        )
    stat, p = paired_t(diffs)
    return PairedTest(test="paired_t", n_shared=len(shared), n_better=better, n_worse=worse, statistic=stat, p_value=p)


def bootstrap_ci(
    units: Sequence, statistic: Callable[[Sequence], float], level: float = 0.95, iters: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over `units` (prompts) resampled with
    replacement; a local random.Random(seed), so no global generator is touched."""
    rng = random.Random(seed)
    n = len(units)
    if n == 0:
        raise SampleSizeError("a bootstrap over no units")
    stats = sorted(statistic([units[rng.randrange(n)] for _ in range(n)]) for _ in range(iters))
    lo = stats[int(math.floor((1 - level) / 2 * (iters - 1)))]
    hi = stats[int(math.ceil((1 + level) / 2 * (iters - 1)))]
    return lo, hi
