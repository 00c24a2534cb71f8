"""The leaderboard of a run, MergeBench's measures, and the run summary the CLI and flow show
(leaderboard rows with the merge's MergeBench measures, then the probe summaries).

`rows(run)`: per task, every checkpoint and merge on the task's primary metric, best first,
with its standard error; for merges the best constituent (score and name), the margin over
it, and whether the merge beats its best constituent and the base *significantly*: a one-sided
paired test on the prompts both share (McNemar's exact test for one 0/1 sample per prompt, the
paired t-test otherwise, Welch's z without per-prompt rows), at the run's own
`alarm.significance` (from its config in the runs table; 0.05 when it has none); for
fine-tuned checkpoints, whether they beat the base.

`mergebench(run, own_tasks)` (MergeBench, He et al. 2025), per merge of experts e with own task t_e:
- normalized performance: mean over e of merge(t_e) / e(t_e);
- gain kept: mean over e of (merge(t_e) - base(t_e)) / (e(t_e) - base(t_e)), over the experts
  that beat the base significantly on t_e (a gain inside the noise makes the ratio meaningless:
  +0.05 over a +0.01 gain reads "500% kept"); None when none did: the merge can only "keep the
  base's score";
- forgetting: mean over tasks no expert targets of merge(t) - base(t) (negative: forgotten).
An expert's own task is given (`own_tasks`), or else the task it improved most over the base.

    board = rows(run); measures = mergebench(run); table = summary(run)
"""

from __future__ import annotations

import json

import pydantic

from mergeaudit.results.alarm import AlarmSettings
from mergeaudit.results.compare import compare_score
from mergeaudit.results.scores import RunResults
from mergeaudit.results.stats import PairedTest

SIGNIFICANCE = 0.05


class LeaderRow(pydantic.BaseModel):
    task: str
    metric: str | None
    candidate: str
    kind: str
    method: str
    score: float | None
    stderr: float | None = None
    n: int | None = None
    best_input: float | None = None
    best_input_name: str | None = None
    margin: float | None = None
    beats_best_input: bool | None = None  # significantly, one-sided paired test
    p_vs_best_input: float | None = None
    beats_base: bool | None = None
    p_vs_base: float | None = None
    update_sparsity_bf16: float | None = None
    status: str = "ok"


def better_than(run: RunResults, row: dict, ref: dict) -> PairedTest:
    """One-sided test that `row` scores higher than `ref` on the same task and metric (as "ref
    is worse than row"): the alarm's test, paired on the prompts both were scored on."""
    return compare_score(run, row, run, ref)


def base_name(run: RunResults) -> str:
    return next((c["name"] for c in run.table("checkpoints") if c.get("role") == "base"), "base")


def run_significance(run: RunResults) -> float:
    """The level the run's own alarm used (`alarm.significance` in its config), else 0.05."""
    try:
        alarm = json.loads(run.run.get("config_json") or "{}").get("alarm") or {}
        return AlarmSettings.model_validate(alarm).significance
    except (AttributeError, TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        return SIGNIFICANCE


def rows(run: RunResults, significance: float | None = None) -> list[LeaderRow]:
    if significance is None:
        significance = run_significance(run)
    cands = run.candidates("checkpoint", "merge")
    ckpt = {c["name"]: c["candidate_id"] for c in cands if c["kind"] == "checkpoint"}
    base = base_name(run)
    out = []
    for task in run.tasks():
        metric = run.primary_metric(task)
        scores = run.primary_scores(task)
        for c in cands:
            s = scores.get(c["candidate_id"])
            row = LeaderRow(
                task=task,
                metric=metric,
                candidate=c["name"],
                kind=c["kind"],
                method=c["method"] or "-",
                score=s["value"] if s else None,
                stderr=s["stderr"] if s else None,
                n=s["n"] if s else None,
                update_sparsity_bf16=c["update_sparsity_bf16"],
                status=c.get("status") or "ok",
            )
            if c["kind"] == "merge" and s is not None:
                refs = [
                    (scores[ckpt[n]]["value"], n) for n in c["input_names"] or [] if n in ckpt and ckpt[n] in scores
                ]
                if refs:
                    best, name = max(refs)
                    test = better_than(run, s, scores[ckpt[name]])
                    row.best_input, row.best_input_name, row.margin = best, name, s["value"] - best
                    row.p_vs_best_input = test.p_value
                    row.beats_best_input = test.p_value is not None and test.p_value <= significance
            if s is not None and c["name"] != base and base in ckpt and ckpt[base] in scores:
                test = better_than(run, s, scores[ckpt[base]])
                row.p_vs_base = test.p_value
                row.beats_base = test.p_value is not None and test.p_value <= significance
            out.append(row)
    return sorted(out, key=lambda r: (r.task, r.score is None, -(r.score or 0.0), r.candidate))


class MergeBenchRow(pydantic.BaseModel):
    candidate: str
    experts: list[str]
    own_tasks: dict[str, str]
    normalized_performance: float | None = None
    gain_kept: float | None = None
    forgetting: float | None = None
    forgetting_tasks: list[str] = []


def own_tasks_of(run: RunResults, experts: list[str], base: str) -> dict[str, str]:
    """Each expert's own task: the task it improved most over the base."""
    table = {(r.candidate, r.task): r.score for r in rows(run) if r.kind == "checkpoint" and r.score is not None}
    out = {}
    for e in experts:
        gains = {t: table[(e, t)] - table.get((base, t), 0.0) for t in run.tasks() if (e, t) in table}
        if gains:
            out[e] = max(sorted(gains), key=gains.get)
    return out


def mergebench(run: RunResults, own_tasks: dict[str, str] | None = None) -> list[MergeBenchRow]:
    base = base_name(run)
    board = rows(run)
    score = {(r.candidate, r.task): r.score for r in board if r.score is not None}
    improved = {(r.candidate, r.task) for r in board if r.kind == "checkpoint" and r.beats_base}
    out = []
    for c in run.candidates("merge"):
        experts = [n for n in c["input_names"] or [] if n != base]
        own = {e: t for e, t in (own_tasks or own_tasks_of(run, experts, base)).items() if e in experts}
        norm, kept = [], []
        for e, t in own.items():
            m, x, b = score.get((c["name"], t)), score.get((e, t)), score.get((base, t))
            if m is not None and x:
                norm.append(m / x)
            if m is not None and x is not None and b is not None and (e, t) in improved:
                kept.append((m - b) / (x - b))
        others = [t for t in run.tasks() if t not in own.values()]
        forget = [
            score[(c["name"], t)] - score[(base, t)] for t in others if (c["name"], t) in score and (base, t) in score
        ]
        out.append(
            MergeBenchRow(
                candidate=c["name"],
                experts=experts,
                own_tasks=own,
                normalized_performance=sum(norm) / len(norm) if norm else None,
                gain_kept=sum(kept) / len(kept) if kept else None,
                forgetting=sum(forget) / len(forget) if forget else None,
                forgetting_tasks=others,
            )
        )
    return out


def best_merge(run: RunResults, inputs: set[str], tasks: list[str]) -> tuple[str, float, float | None] | None:
    """The merge of exactly `inputs` with the highest mean primary score over `tasks` (scored
    on all of them): (name, mean, its standard error sqrt(sum se^2) / len(tasks)), or None."""
    board = {(r.candidate, r.task): r for r in rows(run) if r.score is not None}
    best = None
    for c in sorted(run.candidates("merge"), key=lambda c: c["name"]):
        got = [board.get((c["name"], t)) for t in tasks]
        if set(c["input_names"] or []) != inputs or any(r is None for r in got):
            continue
        mean = sum(r.score for r in got) / len(got)
        ses = [r.stderr for r in got]
        se = sum(x * x for x in ses) ** 0.5 / len(ses) if all(x is not None for x in ses) else None
        if best is None or mean > best[1]:
            best = (c["name"], mean, se)
    return best


class SummaryRow(pydantic.BaseModel):
    """One line of the run summary (CLI table, the flow's leaderboard artifact)."""

    candidate: str
    method: str
    metric: str
    score: float | None
    stderr: float | None = None
    margin: float | None = None
    beats_best_input: bool | None = None
    beats_base: bool | None = None
    normalized_performance: float | None = None
    gain_kept: float | None = None
    update_sparsity_bf16: float | None = None


def summary(run: RunResults) -> list[SummaryRow]:
    """One line per scored checkpoint and merge per task (the leaderboard), then one per probe
    summary figure: what the CLI prints and the flow's table artifact shows."""
    bench = {m.candidate: m for m in mergebench(run)}
    out = [
        SummaryRow(
            candidate=r.candidate,
            method=r.method if r.kind == "merge" else r.kind,
            metric=f"{r.task}/{r.metric}",
            score=r.score,
            stderr=r.stderr,
            margin=r.margin,
            beats_best_input=r.beats_best_input,
            beats_base=r.beats_base,
            normalized_performance=(bench[r.candidate].normalized_performance if r.candidate in bench else None),
            gain_kept=bench[r.candidate].gain_kept if r.candidate in bench else None,
            update_sparsity_bf16=r.update_sparsity_bf16,
        )
        for r in rows(run)
    ]
    names = {c["candidate_id"]: c["name"] for c in run.candidates("probe_summary")}
    for s in run.table("scores"):
        if s["candidate_id"] in names:
            label = s["metric"] if s.get("probe_x") is None else f"{s['metric']} x={s['probe_x']:g}"
            out.append(
                SummaryRow(
                    candidate=names[s["candidate_id"]],
                    method="probe",
                    metric=f"{s['task']}/{label}",
                    score=s["value"],
                    stderr=s["stderr"],
                )
            )
    return out
