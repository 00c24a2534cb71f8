"""The demo: toy SFT and RLVR experts from one base, audited side by side.

`mergeaudit demo` trains (or reuses, by recipe hash) a tiny base on 2-digit addition and
subtraction, two SFT experts and two RLVR experts (one skill each; mergeaudit.toy.experts),
runs the full audit on them (geometry, 10 merge strategies per pair with small grids, the
verifiers on both skills, interpolation and perturbation probes), writes the Parquet tables and
the HTML report, and prints a verdict: how sparse and how overlapping the RLVR updates are next
to the SFT ones, and how the best merge of each pair does against its two experts and the base
(scores with standard errors, MergeBench's measures, all from mergeaudit.results).

    family = prepare_demo(Path(".mergeaudit/demo"))
    config = demo_config(family, Path(".mergeaudit/demo"))
    ... run the audit ...
    print(verdict(results_uri, run_id))
"""

from __future__ import annotations

from pathlib import Path

from mergeaudit.fisher import calibration_from_problems
from mergeaudit.results import leaderboard, load_run
from mergeaudit.toy.arithmetic import make_problems
from mergeaudit.toy.experts import ExpertFamily, ExpertRecipe, build_expert_family

TASKS = {"add": "mergeaudit_add2", "sub": "mergeaudit_sub2"}
PAIRS = {"sft": ("sft_add", "sft_sub"), "rlvr": ("rl_add", "rl_sub")}
OWN_TASKS = {"sft_add": TASKS["add"], "sft_sub": TASKS["sub"], "rl_add": TASKS["add"], "rl_sub": TASKS["sub"]}


def prepare_demo(workdir: Path, recipe: ExpertRecipe | None = None, progress=print) -> ExpertFamily:
    """Train (or reuse) base, SFT and RLVR experts under workdir/checkpoints."""
    return build_expert_family(str(workdir / "checkpoints"), recipe, progress=progress)


def demo_strategies(models: list[str]) -> list[dict]:
    """Ten strategies with small grids (13 merges), for one pair."""
    return [
        {"method": "linear", "models": models},
        {"method": "task_arithmetic", "models": models, "grid": {"lambda": [0.5, 1.0]}},
        {"method": "ties", "models": models, "params": {"lambda": 1.0}, "grid": {"density": [0.3, 0.7]}},
        {"method": "dare_ties", "models": models, "params": {"lambda": 1.0}, "grid": {"density": [0.3, 0.7]}, "seed": 1},
        {"method": "ram", "models": models},
        {"method": "disjoint_mean", "models": models},
        {"method": "sar", "models": models},
        # the methods that localise each expert's sparse support, the regime RLVR updates live
        # in: compared with SAR on the same leaderboard
        {"method": "localize_stitch", "models": models},
        {"method": "consensus_ties", "models": models},
    ]


def demo_config(family: ExpertFamily, workdir: Path) -> dict:
    """The demo's AuditConfig as plain data (it is also written to workdir/audit.yaml)."""
    calib = calibration_from_problems(make_problems("add", 2, 16, seed=7) + make_problems("sub", 2, 16, seed=7),
                                      workdir / "calibration.jsonl")
    experts = family.experts
    return {
        "name": "demo-sft-vs-rlvr",
        "base": {"name": "base", "uri": family.base, "kind": "base"},
        "models": [{"name": n, "uri": e.uri, "kind": e.kind} for n, e in experts.items()],
        "strategies": [s for pair in PAIRS.values() for s in demo_strategies(list(pair))],
        "fisher": {"calibration": str(calib), "max_examples": 32},
        "evaluation": {"tasks": list(TASKS.values()), "batch_size": 100},
        "probes": {
            "interpolations": [{"a": a, "b": b, "alphas": [0.0, 0.25, 0.5, 0.75, 1.0]} for a, b in PAIRS.values()],
            "perturbation": {"models": ["sft_add", "rl_add"], "gaussian_scales": [0.03, 0.1],
                             "drop_rates": [0.5, 0.9], "seeds": 1},
        },
        "geometry": {"spectral": True},
        "results_uri": str(workdir / "results"),
    }


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pm(v: float | None, se: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" + (f" +/- {se:.3f}" if se is not None else "")


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def verdict(results_uri: str, run_id: str) -> str:
    """What the run shows about SFT versus RLVR experts, in a few lines (numbers with standard
    errors), read from mergeaudit.results: the leaderboard, its paired tests and MergeBench's
    measures (gain kept subtracts the base; a score of 0.0 is a score, not a missing one)."""
    run = load_run(results_uri, run_id)
    geo, pairs = run.table("geometry_tensors"), run.table("geometry_pairs")
    sparsity = {r["model"]: r["sparsity_bf16"] for r in geo if r["scope"] == "model"}
    lift = {frozenset((r["model_a"], r["model_b"])): r for r in pairs if r["scope"] == "global"}
    level = leaderboard.run_significance(run)
    board = {(r.candidate, r.task): r for r in leaderboard.rows(run, level)}
    bench = {r.candidate: r for r in leaderboard.mergebench(run, OWN_TASKS)}

    def score(name: str, skill: str) -> leaderboard.LeaderRow | None:
        row = board.get((name, TASKS[skill]))
        return row if row is not None and row.score is not None else None

    def pm(name: str, skill: str) -> str:
        row = score(name, skill)
        return _pm(row.score, row.stderr) if row else "-"

    lines = ["Verdict (toy SFT vs RLVR experts; numeric_match on the held-out 2-digit + and - test sets, "
             "+/- one standard error over prompts)", ""]
    mean_sp = {k: sum(sparsity[m] for m in pair) / 2 for k, pair in PAIRS.items()}
    model_rows = {r["model"]: r for r in geo if r["scope"] == "model"}

    def pair_mean(kind: str, key: str) -> float | None:
        values = [model_rows.get(m, {}).get(key) for m in PAIRS[kind]]
        return None if None in values else sum(values) / len(values)
    pair_rows = {k: lift.get(frozenset(pair), {}) for k, pair in PAIRS.items()}
    lines.append("update geometry             SFT pair     RLVR pair")
    lines.append(f"  {'bf16 sparsity (mean)':26s}{_fmt(mean_sp['sft']):13s}{_fmt(mean_sp['rlvr'])}")
    for key, label in (("jaccard_lift", "overlap lift (Jaccard)"), ("overlap_of_a_lift", "overlap lift (|A&B|/|A|)"),
                       ("cosine", "cosine of updates"), ("sign_conflict_rate", "sign conflicts")):
        lines.append(f"  {label:26s}{_fmt(pair_rows['sft'].get(key)):13s}{_fmt(pair_rows['rlvr'].get(key))}")
    for key, label in (("principal_lift", "principal-weight lift"), ("update_rank_ratio", "update rank / full")):
        lines.append(f"  {label:26s}{_fmt(pair_mean('sft', key)):13s}{_fmt(pair_mean('rlvr', key))}")
    sparser = mean_sp["rlvr"] > mean_sp["sft"]
    lift_sft, lift_rl = pair_rows["sft"].get("jaccard_lift"), pair_rows["rlvr"].get("jaccard_lift")
    closer = lift_sft is not None and lift_rl is not None and abs(lift_rl - 1) < abs(lift_sft - 1)
    lines.append(f"  -> RLVR updates are {'sparser' if sparser else 'NOT sparser'} than SFT updates, and their overlap "
                 f"is {'closer to' if closer else 'NOT closer to'} chance (paper: sparser, near chance).")
    pl_sft, pl_rl = pair_mean("sft", "principal_lift"), pair_mean("rlvr", "principal_lift")
    if pl_sft is not None and pl_rl is not None:
        lines.append(f"  -> RLVR updates touch the base's principal weights {'less' if pl_rl < pl_sft else 'NOT less'} "
                     "than SFT updates, relative to chance (Zhu et al.: RLVR learns off the principal weights).")
    lines.append("")
    lines.append(f"experts against the base (add {pm('base', 'add')}, sub {pm('base', 'sub')}), on their own skill:")
    improved: dict[str, bool] = {}
    for kind, (a, b) in PAIRS.items():
        parts = []
        for expert, skill in ((a, "add"), (b, "sub")):
            mine, base = score(expert, skill), score("base", skill)
            gain = mine.score - base.score if mine and base else None
            improved[expert] = bool(mine and mine.beats_base)  # paired, one-sided p <= level
            parts.append(f"{expert} {skill} {pm(expert, skill)} (gain {_fmt(gain)}, "
                         f"{'significant' if improved[expert] else 'not significant'})")
        lines.append(f"  {kind}: " + ", ".join(parts))
    lines.append("")
    lines.append("best merge of each pair (mean over both skills) against its experts")
    kept: dict[str, float | None] = {}
    for kind, (a, b) in PAIRS.items():
        found = leaderboard.best_merge(run, {a, b}, list(TASKS.values()))
        if found is None:
            lines.append(f"  {kind}: no scored merges")
            continue
        best, mean, se = found
        mb = bench[best]
        lines.append(f"  {kind}: {best}: add {pm(best, 'add')}, sub {pm(best, 'sub')} (mean {_pm(mean, se)})")
        lines.append(f"        experts on their own skill: {a} add {pm(a, 'add')}, {b} sub {pm(b, 'sub')}; "
                     f"off-skill: {a} sub {pm(a, 'sub')}, {b} add {pm(b, 'add')}")
        sig = [f"{k} {'beats' if score(best, k).beats_base else 'does not significantly beat'} the base"
               for k in TASKS]
        lines.append(f"        normalized performance {_share(mb.normalized_performance)}; gain over the base kept "
                     f"{_share(mb.gain_kept)}; " + ", ".join(sig) + f" (paired, one-sided p <= {level:g})")
        kept[kind] = mb.gain_kept if any(improved.get(e) for e in (a, b)) else None
        if kept[kind] is None:
            lines.append(f"        {kind} experts did not improve on the base significantly: the merge kept the "
                         "base's score.")
    if "sft" in kept and "rlvr" in kept:
        lines.append("")
        if kept["rlvr"] is None or kept["sft"] is None:
            which = "RLVR" if kept["rlvr"] is None else "SFT"
            lines.append(f"  -> the {which} experts did not improve on the base significantly, so their merge kept "
                         "the base's score; the toy cannot say whether RLVR experts merge worse than SFT ones.")
        else:
            lines.append(f"  -> the best RLVR merge keeps {kept['rlvr']:.0%} of its experts' gains over the base, "
                         f"the best SFT merge {kept['sft']:.0%}. "
                         + ("RLVR experts merge worse here, the paper's sparsity curse." if kept["rlvr"] < kept["sft"]
                            else "The toy does NOT show RLVR experts merging worse than SFT ones."))
    return "\n".join(lines)
