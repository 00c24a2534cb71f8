"""The demo: toy SFT and RLVR experts from one base, audited side by side.

`mergeaudit demo` takes the toy experts shipped with the package for the current recipe
(mergeaudit.toy.experts: a tiny base pretrained on 2-digit addition and subtraction, two SFT
and two RLVR experts, one skill each), so every machine audits the same checkpoints; with
`--retrain` it trains them from scratch (deterministic on one machine) and says whether they
match the shipped ones. It runs the full audit on them (geometry, 10 merge strategies per pair
with small grids, the verifiers on both skills, interpolation and perturbation probes), writes
the Parquet tables and the HTML report, and prints a verdict: the experts' gains over the base
and their forgetting, how sparse and how overlapping the RLVR updates are next to the SFT ones,
and how the best merge of each pair does against its experts and the base (paired standard
errors, bootstrap intervals and MergeBench's measures, all from mergeaudit.results).

    family = prepare_demo(Path(".mergeaudit/demo"))
    config = demo_config(family, Path(".mergeaudit/demo"))
    ... run the audit ...
    print(verdict(results_uri, run_id))
"""

from __future__ import annotations

from pathlib import Path

from mergeaudit.evaluation.arithmetic import make_problems
from mergeaudit.fisher import calibration_from_problems
from mergeaudit.results import leaderboard, load_run
from mergeaudit.results.intervals import (
    Difference,
    gain_kept_interval,
    jaccard_lift_interval,
    paired_difference,
    principal_lift_interval,
)
from mergeaudit.toy.experts import ExpertFamily, ExpertRecipe, obtain_expert_family, retrain_expert_family

TASKS = {"add": "mergeaudit_add2", "sub": "mergeaudit_sub2"}
PAIRS = {"sft": ("sft_add", "sft_sub"), "rlvr": ("rl_add", "rl_sub")}
OWN_TASKS = {"sft_add": TASKS["add"], "sft_sub": TASKS["sub"], "rl_add": TASKS["add"], "rl_sub": TASKS["sub"]}


def prepare_demo(
    workdir: Path, recipe: ExpertRecipe | None = None, progress=print, retrain: bool = False
) -> ExpertFamily:
    """The experts to audit: the shipped ones for the recipe (copied to
    workdir/checkpoints/<recipe hash>, or reused from there), trained when none ship; with
    retrain, trained from scratch in workdir/retrained/<recipe hash> and compared with the
    shipped ones."""
    if retrain:
        return retrain_expert_family(str(workdir / "retrained"), recipe, progress=progress)
    return obtain_expert_family(str(workdir / "checkpoints"), recipe, progress=progress)


def demo_strategies(models: list[str]) -> list[dict]:
    """Nine strategies with small grids (12 merges), for one pair."""
    return [
        {"method": "linear", "models": models},
        {"method": "task_arithmetic", "models": models, "grid": {"lambda": [0.5, 1.0]}},
        {"method": "ties", "models": models, "params": {"lambda": 1.0}, "grid": {"density": [0.3, 0.7]}},
        {
            "method": "dare_ties",
            "models": models,
            "params": {"lambda": 1.0},
            "grid": {"density": [0.3, 0.7]},
            "seed": 1,
        },
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
    calib = calibration_from_problems(
        make_problems("add", 2, 16, seed=7) + make_problems("sub", 2, 16, seed=7), workdir / "calibration.jsonl"
    )
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
            "perturbation": {
                "models": ["sft_add", "rl_add"],
                "gaussian_scales": [0.03, 0.1],
                "drop_rates": [0.5, 0.9],
                "seeds": 1,
            },
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


def _ci(interval: tuple[float, float] | None, fmt: str = "{:.3f}") -> str:
    return "-" if interval is None else "[" + fmt.format(interval[0]) + ", " + fmt.format(interval[1]) + "]"


def _diff(found: Difference | None, sign: str = "+") -> str:
    """A difference as `+0.120 +/- 0.033`, the error only when paired per prompt (`-` when unscored)."""
    if found is None:
        return "-"
    error = f" +/- {found.stderr:.3f}" if found.paired and found.stderr is not None else ""
    return f"{found.value:{sign}.3f}" + error


def verdict(results_uri: str, run_id: str) -> str:
    """What the run shows about SFT versus RLVR experts, in a few lines (numbers with standard
    errors), read from mergeaudit.results: the leaderboard, its paired tests, MergeBench's
    measures (gain kept subtracts the base; a score of 0.0 is a score, not a missing one), paired
    differences per prompt and bootstrap intervals (mergeaudit.results.intervals)."""
    run = load_run(results_uri, run_id)
    geo, pairs = run.table("geometry_tensors"), run.table("geometry_pairs")
    model_rows = {r["model"]: r for r in geo if r["scope"] == "model"}
    lift = {frozenset((r["model_a"], r["model_b"])): r for r in pairs if r["scope"] == "global"}
    level = leaderboard.run_significance(run)
    board = {(r.candidate, r.task): r for r in leaderboard.rows(run, level)}
    bench = {r.candidate: r for r in leaderboard.mergebench(run, OWN_TASKS)}
    base = leaderboard.base_name(run)

    def score(name: str, skill: str) -> leaderboard.LeaderRow | None:
        row = board.get((name, TASKS[skill]))
        return row if row is not None and row.score is not None else None

    def pm(name: str, skill: str) -> str:
        row = score(name, skill)
        return _pm(row.score, row.stderr) if row else "-"

    def pair_mean(kind: str, key: str) -> float | None:
        values = [model_rows.get(m, {}).get(key) for m in PAIRS[kind]]
        return None if None in values else sum(values) / len(values)

    n_prompts = {r.n for r in board.values() if r.n}
    lines = [
        "Verdict (toy SFT vs RLVR experts; numeric_match on the held-out 2-digit + and - test sets"
        + (f", {max(n_prompts)} prompts each" if n_prompts else "")
        + "; +/- one standard error over "
        "prompts, paired on the same prompts for gains and changes; [95% bootstrap intervals])",
        "",
    ]

    # -- the experts against the base: gains on their own skill, forgetting on the other -------
    lines.append(f"experts against the base (add {pm(base, 'add')}, sub {pm(base, 'sub')}), on their own skill:")
    improved: dict[str, bool] = {}
    other = {"add": "sub", "sub": "add"}
    for kind, (a, b) in PAIRS.items():
        parts = []
        for expert, skill in ((a, "add"), (b, "sub")):
            mine = score(expert, skill)
            gain = paired_difference(run, expert, base, TASKS[skill]) if mine and score(base, skill) else None
            improved[expert] = bool(mine and mine.beats_base)  # paired, one-sided p <= level
            parts.append(
                f"{expert} {skill} {pm(expert, skill)} (gain {_diff(gain, '')}, "
                f"{'significant' if improved[expert] else 'not significant'})"
            )
        lines.append(f"  {kind}: " + ", ".join(parts))
    forgetting = [
        f"{e} {other[s]} {_diff(paired_difference(run, e, base, TASKS[other[s]]))}"
        for kind, pair in PAIRS.items()
        for e, s in zip(pair, ("add", "sub"))
    ]
    lines.append("  forgetting (the other skill's score minus the base's): " + ", ".join(forgetting))
    lines.append(f"  (significant: one-sided paired test against the base, p <= {level:g})")
    lines.append("")

    # -- update geometry -----------------------------------------------------------------------
    pair_rows = {k: lift.get(frozenset(pair), {}) for k, pair in PAIRS.items()}
    mean_sp = {k: pair_mean(k, "sparsity_bf16") for k in PAIRS}
    lines.append("update geometry             SFT pair     RLVR pair")
    lines.append(f"  {'bf16 sparsity (mean)':26s}{_fmt(mean_sp['sft']):13s}{_fmt(mean_sp['rlvr'])}")
    lines.append(
        f"  {'  share of all entries':26s}{_fmt(pair_mean('sft', 'sparsity_bf16_numel_weighted')):13s}"
        f"{_fmt(pair_mean('rlvr', 'sparsity_bf16_numel_weighted'))}"
    )
    for key, label in (
        ("jaccard_lift", "overlap lift (Jaccard)"),
        ("overlap_of_a_lift", "overlap lift (|A&B|/|A|)"),
        ("cosine", "cosine of updates"),
        ("sign_conflict_rate", "sign conflicts"),
    ):
        lines.append(f"  {label:26s}{_fmt(pair_rows['sft'].get(key)):13s}{_fmt(pair_rows['rlvr'].get(key))}")
        if key == "jaccard_lift":
            ci = {k: jaccard_lift_interval(run, *PAIRS[k]) for k in PAIRS}
            lines.append(f"  {'  interval over tensors':26s}{_ci(ci['sft'], '{:.2f}'):13s}{_ci(ci['rlvr'], '{:.2f}')}")
    lines.append(
        f"  {'principal-weight lift':26s}{_fmt(pair_mean('sft', 'principal_lift')):13s}"
        f"{_fmt(pair_mean('rlvr', 'principal_lift'))}"
    )
    pci = {k: principal_lift_interval(run, list(PAIRS[k])) for k in PAIRS}
    lines.append(f"  {'  interval over tensors':26s}{_ci(pci['sft'], '{:.2f}'):13s}{_ci(pci['rlvr'], '{:.2f}')}")
    lines.append(
        f"  {'update rank / full':26s}{_fmt(pair_mean('sft', 'update_rank_ratio')):13s}"
        f"{_fmt(pair_mean('rlvr', 'update_rank_ratio'))}"
    )
    if mean_sp["sft"] is not None and mean_sp["rlvr"] is not None:
        sparser = mean_sp["rlvr"] > mean_sp["sft"]
        entries = pair_mean("rlvr", "sparsity_bf16_numel_weighted")
        lift_sft, lift_rl = pair_rows["sft"].get("jaccard_lift"), pair_rows["rlvr"].get("jaccard_lift")
        closer = lift_sft is not None and lift_rl is not None and abs(lift_rl - 1) < abs(lift_sft - 1)
        lines.append(
            f"  -> RLVR updates are {'sparser' if sparser else 'NOT sparser'} than SFT updates "
            f"({mean_sp['rlvr']:.0%} of a tensor's entries bit-identical to the base in bf16 on average"
            + (f", {entries:.0%} of all entries" if entries is not None else "")
            + f"; real RLVR: 70-95%), and their overlap is {'closer to' if closer else 'NOT closer to'} "
            "chance (paper: sparser, near chance)."
        )
    pl_sft, pl_rl = pair_mean("sft", "principal_lift"), pair_mean("rlvr", "principal_lift")
    if pl_sft is not None and pl_rl is not None:
        apart = pci["sft"] is not None and pci["rlvr"] is not None and pci["rlvr"][1] < pci["sft"][0]
        lines.append(
            f"  -> RLVR updates touch the base's principal weights {'less' if pl_rl < pl_sft else 'NOT less'} "
            "than SFT updates, relative to chance (Zhu et al.: RLVR learns off the principal weights)"
            + (
                "; the intervals do not overlap."
                if apart
                else "; the intervals overlap."
                if pci["sft"] is not None and pci["rlvr"] is not None
                else "."
            )
        )
    lines.append("")

    # -- the best merge of each pair -----------------------------------------------------------
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
        lines.append(
            f"        experts on their own skill: {a} add {pm(a, 'add')}, {b} sub {pm(b, 'sub')}; "
            f"off-skill: {a} sub {pm(a, 'sub')}, {b} add {pm(b, 'add')}"
        )
        changes = ", ".join(f"{s} {_diff(paired_difference(run, best, base, TASKS[s]))}" for s in TASKS)
        lines.append(f"        against the base: {changes}")
        sig = [
            f"{k} {'beats' if score(best, k).beats_base else 'does not significantly beat'} the base"
            for k in TASKS
            if score(best, k)
        ]
        kept[kind] = mb.gain_kept if all(improved.get(e) for e in (a, b)) else None
        interval = (
            gain_kept_interval(run, best, {e: OWN_TASKS[e] for e in (a, b)}, base) if kept[kind] is not None else None
        )
        lines.append(
            f"        normalized performance {_share(mb.normalized_performance)}; gain over the base kept "
            f"{_share(mb.gain_kept)}"
            + (f" {_ci(interval, '{:.0%}')}" if interval else "")
            + "; "
            + ", ".join(sig)
            + f" (paired, one-sided p <= {level:g})"
        )
        if mb.gain_kept is None or kept[kind] is None:
            lines.append(
                f"        {kind} experts did not improve on the base significantly: the merge kept the base's score."
                if mb.gain_kept is None
                else f"        not every {kind} expert improved on the base significantly: the kept share is "
                "not compared."
            )
    if "sft" in kept and "rlvr" in kept:
        lines.append("")
        if kept["rlvr"] is None or kept["sft"] is None:
            which = "RLVR" if kept["rlvr"] is None else "SFT"
            lines.append(
                f"  -> the {which} experts did not improve on the base significantly, so their merge kept "
                "the base's score; the toy cannot say whether RLVR experts merge worse than SFT ones."
            )
        else:
            lines.append(
                f"  -> the best RLVR merge keeps {kept['rlvr']:.0%} of its experts' gains over the base, "
                f"the best SFT merge {kept['sft']:.0%}. "
                + (
                    "RLVR experts merge worse here, the paper's sparsity curse."
                    if kept["rlvr"] < kept["sft"]
                    else "The toy does NOT show RLVR experts merging worse than SFT ones."
                )
            )
    return "\n".join(lines)


# -- the README's copy of the verdict ----------------------------------------------------------

README_BEGIN = "<!-- demo verdict: begin (written by scripts/update_readme_demo.py from a `mergeaudit demo` run) -->"
README_END = "<!-- demo verdict: end -->"


def write_demo_report(result: dict, text: str, path: Path) -> Path:
    """The run's HTML report with the verdict as its notes and the experts' own tasks marked."""
    from mergeaudit import report
    from mergeaudit.results.compare import RegressionReport

    data = report.load_run(result["results_uri"], result["run_id"])
    if result.get("regressions"):
        data.regression = RegressionReport.model_validate(result["regressions"])
    data.notes = text
    data.own_tasks = OWN_TASKS
    path.write_text(report.render_html(data))
    return path


def verdict_block(stdout: str) -> str:
    """The verdict as `mergeaudit demo` printed it: from its `Verdict` line up to the `run <id>:`
    line, trailing blank lines dropped (nothing in it depends on the machine, paths or time)."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Verdict (")), None)
    if start is None:
        raise ValueError("no verdict in the demo's output")
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("run ")), len(lines))
    return "\n".join(lines[start:end]).rstrip() + "\n"


def readme_block(readme: str) -> str | None:
    """The verdict the README shows (the fenced text between its markers), or None."""
    if README_BEGIN not in readme or README_END not in readme:
        return None
    inner = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n")
    body = inner.splitlines()
    if len(body) < 2 or not body[0].startswith("```") or body[-1] != "```":
        return None
    return "\n".join(body[1:-1]).rstrip() + "\n"


def with_readme_block(readme: str, block: str) -> str:
    """The README with its verdict block replaced by `block` (the markers must be there)."""
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError(f"the README lacks the markers {README_BEGIN!r} ... {README_END!r}")
    head, rest = readme.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    return f"{head}{README_BEGIN}\n```text\n{block.rstrip()}\n```\n{README_END}{tail}"


def quick_run_config() -> dict:
    """The demo's shape at a small size, as plain data: the base and the two shipped RLVR experts,
    four merges, both skills on 50 problems each. Its paths are relative to the project folder
    (the deployments run there: prefect.yaml's pull step), so the `merge-audit` deployments'
    form starts with it and the UI's Quick Run audits the toy experts shipped in the checkout;
    results go to .mergeaudit/quick-run/results."""
    from mergeaudit.toy.experts import ExpertRecipe, shipped_root

    recipe = ExpertRecipe()
    shipped = shipped_root(recipe)
    if shipped is None:
        raise RuntimeError(f"no toy experts ship for recipe {recipe.digest()} (mergeaudit demo --retrain)")
    root = "mergeaudit/" + shipped.relative_to(Path(__file__).parent).as_posix()
    models = list(PAIRS["rlvr"])
    return {
        "name": "quick-run",
        "base": {"name": "base", "uri": f"{root}/base", "kind": "base"},
        "models": [{"name": n, "uri": f"{root}/{n}", "kind": "rlvr"} for n in models],
        "strategies": [
            {"method": "task_arithmetic", "models": models, "grid": {"lambda": [0.5, 1.0]}},
            {"method": "ties", "models": models, "params": {"lambda": 1.0, "density": 0.3}},
            {"method": "localize_stitch", "models": models},
        ],
        "evaluation": {"tasks": list(TASKS.values()), "limit": 50, "batch_size": 100},
        "results_uri": ".mergeaudit/quick-run/results",
    }
