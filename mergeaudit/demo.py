"""The demo: toy SFT and RLVR experts from one base, audited side by side.

`mergeaudit demo` trains (or reuses, by recipe hash) a tiny base on 2-digit addition and
subtraction, two SFT experts and two RLVR experts (one skill each; mergeaudit.toy.experts),
runs the full audit on them (geometry, 10 merge strategies per pair with small grids, the
verifiers on both skills, interpolation and perturbation probes), writes the Parquet tables and
the HTML report, and prints a verdict: how sparse and how overlapping the RLVR updates are next
to the SFT ones, and how the best merge of each pair does against its two experts.

    family = prepare_demo(Path(".mergeaudit/demo"))
    config = demo_config(family, Path(".mergeaudit/demo"))
    ... run the audit ...
    print(verdict(results_uri, run_id))
"""

from __future__ import annotations

from pathlib import Path

from mergeaudit import tables
from mergeaudit.fisher import calibration_from_problems
from mergeaudit.toy.arithmetic import make_problems
from mergeaudit.toy.experts import ExpertFamily, ExpertRecipe, build_expert_family

TASKS = {"add": "mergeaudit_add2", "sub": "mergeaudit_sub2"}
PAIRS = {"sft": ("sft_add", "sft_sub"), "rlvr": ("rl_add", "rl_sub")}


def prepare_demo(workdir: Path, recipe: ExpertRecipe | None = None, progress=print) -> ExpertFamily:
    """Train (or reuse) base, SFT and RLVR experts under workdir/checkpoints."""
    return build_expert_family(str(workdir / "checkpoints"), recipe, progress=progress)


def demo_strategies(models: list[str]) -> list[dict]:
    """At least 8 strategies with small grids, for one pair."""
    return [
        {"method": "linear", "models": models},
        {"method": "task_arithmetic", "models": models, "grid": {"lambda": [0.5, 1.0]}},
        {"method": "ties", "models": models, "params": {"lambda": 1.0}, "grid": {"density": [0.3, 0.7]}},
        {"method": "dare_ties", "models": models, "params": {"lambda": 1.0}, "grid": {"density": [0.3, 0.7]}, "seed": 1},
        {"method": "ram", "models": models},
        {"method": "disjoint_mean", "models": models},
        {"method": "sar", "models": models},
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


def _gain(value: float | None, base: float | None) -> str:
    return "-" if value is None or base is None else f"{value:.3f} ({value - base:+.3f})"


def verdict(results_uri: str, run_id: str) -> str:
    """What the run shows about SFT versus RLVR experts, in a few lines (numbers included)."""
    geo = tables.read_table(results_uri, "geometry_tensors", run_id=run_id).to_pylist()
    pairs = tables.read_table(results_uri, "geometry_pairs", run_id=run_id).to_pylist()
    cands = tables.read_table(results_uri, "candidates", run_id=run_id).to_pylist()
    scores = tables.read_table(results_uri, "scores", run_id=run_id).to_pylist()
    sparsity = {r["model"]: r["sparsity_bf16"] for r in geo if r["scope"] == "model"}
    lift = {frozenset((r["model_a"], r["model_b"])): r for r in pairs if r["scope"] == "global"}
    value = {(s["candidate_id"], s["task"]): s["value"] for s in scores
             if s["metric"] == "numeric_match" and s["filter"] == "verifier"}
    by_name = {c["name"]: c["candidate_id"] for c in cands}

    def skill_scores(name: str) -> dict[str, float | None]:
        return {skill: value.get((by_name.get(name), task)) for skill, task in TASKS.items()}

    lines = ["Verdict (toy SFT vs RLVR experts; numeric_match on the held-out 2-digit + and - test sets)", ""]
    mean_sp = {k: sum(sparsity[m] for m in pair) / 2 for k, pair in PAIRS.items()}
    pair_rows = {k: lift.get(frozenset(pair), {}) for k, pair in PAIRS.items()}
    lines.append("update geometry             SFT pair     RLVR pair")
    lines.append(f"  {'bf16 sparsity (mean)':26s}{_fmt(mean_sp['sft']):13s}{_fmt(mean_sp['rlvr'])}")
    for key, label in (("jaccard_lift", "overlap lift (Jaccard)"), ("overlap_of_a_lift", "overlap lift (|A&B|/|A|)"),
                       ("cosine", "cosine of updates"), ("sign_conflict_rate", "sign conflicts")):
        lines.append(f"  {label:26s}{_fmt(pair_rows['sft'].get(key)):13s}{_fmt(pair_rows['rlvr'].get(key))}")
    sparser = mean_sp["rlvr"] > mean_sp["sft"]
    lift_sft, lift_rl = pair_rows["sft"].get("jaccard_lift"), pair_rows["rlvr"].get("jaccard_lift")
    closer = lift_sft is not None and lift_rl is not None and abs(lift_rl - 1) < abs(lift_sft - 1)
    lines.append(f"  -> RLVR updates are {'sparser' if sparser else 'NOT sparser'} than SFT updates, and their overlap "
                 f"is {'closer to' if closer else 'NOT closer to'} chance (paper: sparser, near chance).")
    lines.append("")
    base = skill_scores("base")
    lines.append(f"experts against the base (add {_fmt(base['add'])}, sub {_fmt(base['sub'])}), on their own skill:")
    for kind, (a, b) in PAIRS.items():
        ga = _gain(skill_scores(a)["add"], base["add"])
        gb = _gain(skill_scores(b)["sub"], base["sub"])
        lines.append(f"  {kind}: {a} add {ga}, {b} sub {gb}")
    lines.append("")
    lines.append("best merge of each pair (mean over both skills) against its experts")
    outcome = {}
    for kind, (a, b) in PAIRS.items():
        merges = [c["name"] for c in cands if c["kind"] == "merge" and set(c["input_names"] or []) == {a, b}]
        means = {}
        for name in merges:
            s = skill_scores(name)
            if all(v is not None for v in s.values()):
                means[name] = sum(s.values()) / len(s)
        if not means:
            lines.append(f"  {kind}: no scored merges")
            continue
        best = max(means, key=means.get)
        ea, eb, bs = skill_scores(a), skill_scores(b), skill_scores(best)
        own = {"add": ea["add"], "sub": eb["sub"]}  # each expert on its own skill
        lines.append(f"  {kind}: {best}: add {_fmt(bs['add'])}, sub {_fmt(bs['sub'])} (mean {_fmt(means[best])})")
        lines.append(f"        experts on their own skill: {a} add {_fmt(own['add'])}, {b} sub {_fmt(own['sub'])}; "
                     f"off-skill: {a} sub {_fmt(ea['sub'])}, {b} add {_fmt(eb['add'])}")
        linear = means.get(f"linear({a}+{b})")
        sar = means.get(f"sar({a}+{b})")
        lines.append(f"        linear mean {_fmt(linear)}, sar mean {_fmt(sar)}; "
                     f"retained share of the experts' own-skill scores: "
                     f"{_fmt(means[best] / ((own['add'] + own['sub']) / 2) if own['add'] and own['sub'] else None)}")
        outcome[kind] = (means[best], (own["add"] + own["sub"]) / 2 if own["add"] and own["sub"] else None, linear, sar)
    if "sft" in outcome and "rlvr" in outcome and outcome["sft"][1] and outcome["rlvr"][1]:
        keep_sft = outcome["sft"][0] / outcome["sft"][1]
        keep_rl = outcome["rlvr"][0] / outcome["rlvr"][1]
        lines.append("")
        lines.append(f"  -> the best RLVR merge keeps {keep_rl:.0%} of its experts' own-skill scores, the best SFT "
                     f"merge {keep_sft:.0%}. " + ("RLVR experts merge worse here, the paper's sparsity curse."
                                                  if keep_rl < keep_sft else
                                                  "The toy does NOT show RLVR experts merging worse than SFT ones."))
    return "\n".join(lines)
