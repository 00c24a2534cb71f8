"""The report's plots, each a PNG Figure built from a run's committed rows (matplotlib, Agg).

Per model: the per-layer update-sparsity heatmap; per module type: sparsity, update rank,
spectral drift and principal-weight lift; pairwise overlap-lift and cosine matrices; per series: geometry against
the training step; per task: merge scores with the constituents as reference lines; the probe
curves (interpolation, task-vector scaling, perturbation) on the first task.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict

from mergeaudit.report.model import Figure, RunData
from mergeaudit.results.scores import params


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def sparsity_heatmaps(data: RunData) -> list[Figure]:
    plt = _pyplot()
    by_model: dict[str, dict[tuple[int, str], float]] = defaultdict(dict)
    for r in data.rows["geometry_tensors"]:
        if r["scope"] == "tensor" and r["layer"] is not None and r["sparsity_bf16"] is not None:
            by_model[r["model"]][(r["layer"], r["module"] or r["tensor"])] = r["sparsity_bf16"]
    out = []
    for model, cells in sorted(by_model.items()):
        layers = sorted({k[0] for k in cells})
        modules = sorted({k[1] for k in cells})
        grid = [[cells.get((layer, m), math.nan) for m in modules] for layer in layers]
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(modules), 1.2 + 0.35 * len(layers)))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"{model}: update sparsity (bf16)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        out.append(
            Figure(
                f"plot-sparsity-{slug(model)}",
                f"Per-layer update sparsity: {model}",
                _png(fig),
                "Share of entries unchanged after casting to bf16, per layer and module (1 = untouched).",
            )
        )
    return out


MODULE_PANELS = (
    ("sparsity_bf16", "update sparsity (bf16)"),
    ("update_rank_ratio", "update rank / full rank"),
    ("spectral_drift", "spectral drift (top-k)"),
    ("principal_lift", "principal-weight lift"),
)


def module_bars(data: RunData) -> list[Figure]:
    """Per module type, one bar per model: sparsity, update rank ratio, spectral drift,
    principal-weight lift."""
    rows = [r for r in data.rows["geometry_tensors"] if r["scope"] == "module"]
    if not rows:
        return []
    plt = _pyplot()
    models = sorted({r["model"] for r in rows})
    modules = sorted({r["module"] for r in rows})
    cells = {(r["model"], r["module"]): r for r in rows}
    fig, axes = plt.subplots(1, len(MODULE_PANELS), figsize=(3.2 * len(MODULE_PANELS), 3.0))
    width = 0.8 / len(models)
    for ax, (key, title) in zip(axes, MODULE_PANELS):
        for i, model in enumerate(models):
            values = [(cells.get((model, m)) or {}).get(key) for m in modules]
            ax.bar(
                [j + i * width for j in range(len(modules))],
                [math.nan if v is None else v for v in values],
                width,
                label=model,
            )
        if key == "principal_lift":
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modules))], modules, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=6)
    return [
        Figure(
            "plot-modules",
            "Update geometry per module type",
            _png(fig),
            "Unweighted means over the tensors of each module type. Lift below 1 (dotted line): the "
            "update avoids the base's principal weights (Zhu et al.); rank ratio near 1: a full-rank update "
            "(Mukherjee et al.).",
        )
    ]


def series_curves(data: RunData) -> list[Figure]:
    """Per series, against the training step: sparsity (against the base and since the previous
    step), overlap with the final update, update rank, principal-weight lift, and the overlap lift
    with each other run."""
    rows = [r for r in data.rows.get("geometry_series", []) if r["scope"] == "model"]
    out = []
    plt = _pyplot() if rows else None
    for name in sorted({r["series"] for r in rows}):
        mine = sorted((r for r in rows if r["series"] == name), key=lambda r: r["step"])

        def curve(
            against: str, key: str, other: str | None = None, mine: list[dict] = mine
        ) -> tuple[list[int], list[float]]:
            pts = [
                (r["step"], r[key])
                for r in mine
                if r["against"] == against and r[key] is not None and (other is None or r.get("against_model") == other)
            ]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.0))
        for label, against, key in (
            ("update vs base", "base", "sparsity_bf16"),
            ("since the previous step", "previous", "sparsity_bf16"),
        ):
            axes[0].plot(*curve(against, key), marker="o", label=label)
        axes[0].set_title("sparsity (bf16)", fontsize=9)
        axes[1].plot(*curve("final", "overlap_of_step"), marker="o", label="share also in the final update")
        axes[1].plot(*curve("base", "update_rank_ratio"), marker="s", label="update rank / full rank")
        axes[1].set_ylim(-0.05, 1.05)
        axes[1].set_title("overlap with the final update; rank", fontsize=9)
        axes[2].plot(*curve("base", "principal_lift"), marker="o", label="principal-weight lift")
        for other in sorted({r["against_model"] for r in mine if r["against"] == "model"}):
            axes[2].plot(*curve("model", "overlap_of_step_lift", other), marker="^", label=f"overlap lift vs {other}")
        axes[2].axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axes[2].set_title("lift over chance", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        out.append(
            Figure(
                f"plot-series-{slug(name)}",
                f"Training-step series: {name}",
                _png(fig),
                "Each saved step against the base, the previous step, the final step and the other runs "
                "(geometry_series). Lift above 1: the updates share entries more than chance would.",
            )
        )
    return out


def pair_matrices(data: RunData) -> list[Figure]:
    rows = [r for r in data.rows["geometry_pairs"] if r["scope"] == "global" and r["mask"] in (None, "bf16")]
    if not rows:
        return []
    plt = _pyplot()
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    idx = {m: i for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.6 * len(models), 1.5 + 0.7 * len(models)))
    panels = (
        (axes[0], "jaccard_lift", "overlap lift (Jaccard / chance)", "magma", (None, None)),
        (axes[1], "cosine", "cosine of updates", "coolwarm", (-1.0, 1.0)),
    )
    for ax, key, title, cmap, (lo, hi) in panels:
        mat = [[math.nan] * len(models) for _ in models]
        for i in range(len(models)):
            mat[i][i] = 1.0 if key == "cosine" else math.nan
        for r in rows:
            v = r[key] if r[key] is not None else math.nan
            mat[idx[r["model_a"]]][idx[r["model_b"]]] = mat[idx[r["model_b"]]][idx[r["model_a"]]] = v
        im = ax.imshow(mat, cmap=cmap, vmin=lo, vmax=hi)
        for i in range(len(models)):
            for j in range(len(models)):
                if not math.isnan(mat[i][j]):
                    ax.text(j, i, f"{mat[i][j]:.2f}", ha="center", va="center", fontsize=7, color="grey")
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(models)), models, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    return [
        Figure(
            "plot-pairs",
            "Pairwise overlap lift and cosine",
            _png(fig),
            "Lift > 1: the two updates touch the same entries more often than independent masks of "
            "the same densities would; cosine near 0: near-orthogonal updates.",
        )
    ]


def score_bars(data: RunData) -> list[Figure]:
    plt = _pyplot()
    cands = {c["candidate_id"]: c for c in data.rows["candidates"]}
    out = []
    for task in data.tasks():
        metric, rows = data.primary_metric(task), data.primary_scores(task, ("checkpoint", "merge"))
        merges = [(cands[cid]["name"], s) for cid, s in rows.items() if cands.get(cid, {}).get("kind") == "merge"]
        refs = [
            (cands[cid]["name"], s["value"])
            for cid, s in rows.items()
            if cands.get(cid, {}).get("kind") == "checkpoint"
        ]
        if not merges and not refs:
            continue
        merges.sort(key=lambda m: -m[1]["value"])
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(merges) + 2.5), 3.4))
        xs = range(len(merges))
        ax.bar(
            xs,
            [s["value"] for _, s in merges],
            yerr=[s["stderr"] or 0.0 for _, s in merges],
            color="#4c72b0",
            capsize=2,
        )
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, (name, value) in enumerate(sorted(refs)):
            ax.axhline(
                value, linestyle="--", linewidth=1, color=colors[(k + 1) % len(colors)], label=f"{name} {value:.3f}"
            )
        ax.set_xticks(list(xs), [n for n, _ in merges], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: merges vs their constituents", fontsize=9)
        if refs:
            ax.legend(fontsize=6, loc="lower right")
        out.append(
            Figure(
                f"plot-scores-{slug(task)}",
                f"Scores on {task}",
                _png(fig),
                f"Bars: merge candidates ({metric}, +/- 1 standard error); dashed lines: the checkpoints.",
            )
        )
    return out


def probe_curves(data: RunData) -> list[Figure]:
    plt = _pyplot()
    tasks = data.tasks()
    if not tasks:
        return []
    task = tasks[0]
    metric, rows = data.primary_metric(task), data.primary_scores(task, ("probe",))
    series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for c in data.candidates("probe"):
        probe = {"family": c.get("probe_family"), "path": c.get("probe_path"), "x": c.get("probe_x")}
        if probe["family"] is None:  # written before probe settings became columns
            probe = params(c).get("probe") or probe
        if probe["family"] and c["candidate_id"] in rows:
            series[probe["family"]][probe["path"]].append((float(probe["x"]), rows[c["candidate_id"]]["value"]))
    out = []
    labels = {
        "interpolation": ("alpha (0 = a, 1 = b)", "Interpolation paths"),
        "task_vector": ("lambda", "Task-vector scaling"),
        "gaussian": ("noise scale (x tensor RMS)", "Gaussian weight perturbation"),
        "drop": ("drop rate of the task vector", "Random drop of the task vector"),
    }
    for family, (xlabel, title) in labels.items():
        if family not in series:
            continue
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        for path, pts in sorted(series[family].items()):
            by_x: dict[float, list[float]] = defaultdict(list)
            for x, v in pts:
                by_x[x].append(v)
            xs = sorted(by_x)
            ax.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], marker="o", label=path)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{task} {metric}")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        out.append(Figure(f"plot-probe-{family}", title, _png(fig), "Mean over seeds where a probe has several."))
    return out
