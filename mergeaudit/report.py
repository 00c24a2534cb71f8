"""Reports of an audit run, built from its committed tables: one self-contained HTML file with
embedded plots, and the same content as Markdown (the flow's Prefect artifact).

    data = load_run(RESULTS, run_id=None)          # the latest committed run by default
    html = render_html(data)                       # mergeaudit report RESULTS --out report.html
    md = render_markdown(data)

Every number comes from mergeaudit.results (leaderboard, MergeBench measures, fragility
summaries, the comparison with the previous run); this module only lays them out, and importing
it loads neither torch nor any merge method.

Plots (PNG, base64 in the page, each in a <figure id="plot-...">): per-layer update-sparsity
heatmap per model; pairwise overlap-lift and cosine matrices; per task, merge scores with the
constituent checkpoints as reference lines; interpolation, task-vector and perturbation curves
(first task). Tables: the regression check (test, prompts better and worse, p-value per
score), the merge leaderboard (with significance against the best constituent and the base),
MergeBench's measures, fragility summaries (with intervals and standard errors), per-model
geometry, and the provenance of every candidate row.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from mergeaudit.results import leaderboard as board
from mergeaudit.results.compare import RegressionReport
from mergeaudit.results.scores import RunResults, params
from mergeaudit.results.scores import load_run as load_results


@dataclass
class RunData(RunResults):
    """A run's results plus what the report shows around them."""

    regression: RegressionReport | None = None  # the check against the previous run, when made
    notes: str | None = None  # free text shown first (the demo's verdict)
    own_tasks: dict[str, str] | None = None  # expert -> own task, for MergeBench's measures


@dataclass
class Figure:
    id: str
    title: str
    png: bytes
    caption: str = ""

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


@dataclass
class Content:
    figures: list[Figure] = field(default_factory=list)
    sections: list[tuple[str, list[dict], list[str]]] = field(default_factory=list)  # title, rows, columns


def load_run(results_uri: str, run_id: str | None = None) -> RunData:
    run = load_results(results_uri, run_id)
    return RunData(run.results_uri, run.run_id, run.rows)


def leaderboard(data: RunData) -> list[dict]:
    return [r.model_dump() for r in board.rows(data)]


def provenance(data: RunData) -> list[dict]:
    versions = data.run.get("package_versions") or "{}"
    out = []
    for c in data.rows["candidates"]:
        inputs = zip(c["input_names"] or [], c["input_uris"] or [], c["input_fingerprints"] or [])
        out.append({"candidate": c["name"], "candidate_id": c["candidate_id"], "kind": c["kind"],
                    "method": c["method"], "params_hash": c["params_hash"], "params": c["params_json"],
                    "inputs": "; ".join(f"{n} = {u} @ {f}" for n, u, f in inputs),
                    "run_id": data.run_id, "mergeaudit": c["mergeaudit_version"], "packages": versions})
    return out


def model_geometry(data: RunData) -> list[dict]:
    return [{k: r[k] for k in ("model", "kind", "sparsity_bf16", "sparsity_rel", "sparsity_abs", "rel_update_norm")}
            for r in data.rows["geometry_tensors"] if r["scope"] == "model"]


def pair_geometry(data: RunData) -> list[dict]:
    return [{"pair": f"{r['model_a']} ~ {r['model_b']}", "kinds": f"{r['kind_a']} ~ {r['kind_b']}",
             "overlap_of_a": r["overlap_of_a"], "overlap_of_a_lift": r["overlap_of_a_lift"],
             "jaccard_lift": r["jaccard_lift"], "sign_conflict_rate": r["sign_conflict_rate"], "cosine": r["cosine"]}
            for r in data.rows["geometry_pairs"] if r["scope"] == "global" and r["mask"] in (None, "bf16")]


def probe_summaries(data: RunData) -> list[dict]:
    names = {c["candidate_id"]: c["name"] for c in data.candidates("probe_summary")}
    return [{"probe": names[s["candidate_id"]], "task": s["task"], "metric": s["metric"], "x": s.get("probe_x"),
             "value": s["value"], "stderr": s["stderr"], "ci_low": s.get("ci_low"), "ci_high": s.get("ci_high")}
            for s in data.table("scores") if s["candidate_id"] in names]


def comparisons(data: RunData) -> list[dict]:
    if data.regression is None:
        return []
    return [r.model_dump(include={"candidate", "task", "metric", "previous", "current", "drop", "test", "n_shared",
                                  "n_better", "n_worse", "p_value", "flagged"}) for r in data.regression.comparisons]


# -- plots ---------------------------------------------------------------------------------------


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
        out.append(Figure(f"plot-sparsity-{_slug(model)}", f"Per-layer update sparsity: {model}", _png(fig),
                          "Share of entries unchanged after casting to bf16, per layer and module (1 = untouched)."))
    return out


def pair_matrices(data: RunData) -> list[Figure]:
    rows = [r for r in data.rows["geometry_pairs"] if r["scope"] == "global" and r["mask"] in (None, "bf16")]
    if not rows:
        return []
    plt = _pyplot()
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    idx = {m: i for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.6 * len(models), 1.5 + 0.7 * len(models)))
    for ax, key, title, cmap, (lo, hi) in ((axes[0], "jaccard_lift", "overlap lift (Jaccard / chance)", "magma", (None, None)),
                                          (axes[1], "cosine", "cosine of updates", "coolwarm", (-1.0, 1.0))):
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
    return [Figure("plot-pairs", "Pairwise overlap lift and cosine", _png(fig),
                   "Lift > 1: the two updates touch the same entries more often than independent masks of "
                   "the same densities would; cosine near 0: near-orthogonal updates.")]


def score_bars(data: RunData) -> list[Figure]:
    plt = _pyplot()
    cands = {c["candidate_id"]: c for c in data.rows["candidates"]}
    out = []
    for task in data.tasks():
        metric, rows = data.primary_metric(task), data.primary_scores(task, ("checkpoint", "merge"))
        merges = [(cands[cid]["name"], s) for cid, s in rows.items() if cands.get(cid, {}).get("kind") == "merge"]
        refs = [(cands[cid]["name"], s["value"]) for cid, s in rows.items()
                if cands.get(cid, {}).get("kind") == "checkpoint"]
        if not merges and not refs:
            continue
        merges.sort(key=lambda m: -m[1]["value"])
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(merges) + 2.5), 3.4))
        xs = range(len(merges))
        ax.bar(xs, [s["value"] for _, s in merges], yerr=[s["stderr"] or 0.0 for _, s in merges], color="#4c72b0",
               capsize=2)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, (name, value) in enumerate(sorted(refs)):
            ax.axhline(value, linestyle="--", linewidth=1, color=colors[(k + 1) % len(colors)], label=f"{name} {value:.3f}")
        ax.set_xticks(list(xs), [n for n, _ in merges], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: merges vs their constituents", fontsize=9)
        if refs:
            ax.legend(fontsize=6, loc="lower right")
        out.append(Figure(f"plot-scores-{_slug(task)}", f"Scores on {task}", _png(fig),
                          f"Bars: merge candidates ({metric}, +/- 1 standard error); dashed lines: the checkpoints."))
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
    labels = {"interpolation": ("alpha (0 = a, 1 = b)", "Interpolation paths"),
              "task_vector": ("lambda", "Task-vector scaling"),
              "gaussian": ("noise scale (x tensor RMS)", "Gaussian weight perturbation"),
              "drop": ("drop rate of the task vector", "Random drop of the task vector")}
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


def build_content(data: RunData) -> Content:
    figs = sparsity_heatmaps(data) + pair_matrices(data) + score_bars(data) + probe_curves(data)
    sections = [
        ("Comparison with the previous run", comparisons(data), []),
        ("Merge leaderboard", leaderboard(data),
         ["task", "candidate", "method", "score", "stderr", "n", "best_input_name", "best_input", "margin",
          "beats_best_input", "p_vs_best_input", "beats_base", "p_vs_base", "update_sparsity_bf16", "status"]),
        ("MergeBench measures", [r.model_dump() for r in board.mergebench(data, data.own_tasks)],
         ["candidate", "own_tasks", "normalized_performance", "gain_kept", "forgetting", "forgetting_tasks"]),
        ("Fragility probes", probe_summaries(data), []),
        ("Update geometry per model", model_geometry(data), []),
        ("Pairwise overlap (bf16 masks)", pair_geometry(data), []),
        ("Checkpoints", data.rows["checkpoints"], ["name", "role", "kind", "uri", "fingerprint", "n_tensors", "dtype"]),
        ("Provenance", provenance(data),
         ["candidate", "candidate_id", "kind", "method", "params_hash", "params", "inputs", "run_id", "mergeaudit"]),
    ]
    return Content(figs, sections)


# -- rendering -----------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_no rows_"
    cols = columns or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols) + " |"
              for r in rows]
    return "\n".join(lines)


def _html_table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    cols = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:left;vertical-align:top;max-width:420px;overflow-wrap:anywhere}th{background:#f2f2f2}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}figcaption{font-size:12px;color:#555;max-width:520px}
.alarm{background:#fde2e2;border:1px solid #e99;padding:0.6em}.ok{background:#e6f4e6;border:1px solid #9c9;padding:0.6em}
pre{white-space:pre-wrap;overflow-wrap:anywhere}"""


# Marks a plot the browser could not decode (and counts the good ones in data-plots-ok), so a
# broken figure is visible instead of an empty frame. Inline: the page loads nothing.
CHECK_IMAGES = """<script>window.addEventListener('load', function () {
  var ok = 0;
  document.querySelectorAll('figure img').forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok++; } else {
      img.parentNode.classList.add('broken');
      img.insertAdjacentHTML('afterend', '<p class="alarm">this plot could not be displayed</p>');
    }
  });
  document.body.setAttribute('data-plots-ok', String(ok));
});</script>"""


def _header(data: RunData) -> tuple[str, str]:
    run = data.run
    title = f"Merge audit {data.audit_name}, run {data.run_id}"
    sub = (f"results {data.results_uri}; started {run.get('started_at')}, finished {run.get('finished_at')}; "
           f"status {run.get('status')}; mergeaudit {run.get('mergeaudit_version')}")
    return title, sub


def render_html(data: RunData, content: Content | None = None) -> str:
    content = content or build_content(data)
    title, sub = _header(data)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1><p>{html.escape(sub)}</p>"]
    if data.notes:
        parts.append(f"<h2>Verdict</h2><pre id='notes'>{html.escape(data.notes)}</pre>")
    if data.regression is not None:
        cls = "alarm" if data.regression.regressions else "ok"
        parts.append(f"<pre class='{cls}' id='regressions'>{html.escape(data.regression.summary())}</pre>")
    parts.append("<h2>Plots</h2>")
    for fig in content.figures:
        parts.append(f"<figure id='{fig.id}'><img alt='{html.escape(fig.title)}' src='{fig.data_uri()}'>"
                     f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)}</figcaption></figure>")
    for heading, rows, cols in content.sections:
        parts.append(f"<h2 id='{_slug(heading)}'>{html.escape(heading)}</h2>" + _html_table(rows, cols))
    parts.append(CHECK_IMAGES)
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(data: RunData, content: Content | None = None, images: bool = True) -> str:
    """The report as Markdown; plots as embedded images (what Prefect's artifact view shows)."""
    content = content or build_content(data)
    title, sub = _header(data)
    parts = [f"# {title}", sub]
    if data.notes:
        parts += ["## Verdict", "```\n" + data.notes + "\n```"]
    if data.regression is not None:
        parts += ["## Regression check", "```\n" + data.regression.summary() + "\n```"]
    for heading, rows, cols in content.sections[:-2]:
        parts += [f"## {heading}", markdown_table(rows, cols or None)]
    if images:
        parts.append("## Plots")
        parts += [f"![{fig.title}]({fig.data_uri()})\n\n_{fig.title}: {fig.caption}_" for fig in content.figures]
    prov = content.sections[-1]
    parts += [f"## {prov[0]}", markdown_table(prov[1], ["candidate", "candidate_id", "method", "params_hash", "inputs"])]
    return "\n\n".join(parts) + "\n"


def write_report(results_uri: str, out: str, run_id: str | None = None,
                 regression: RegressionReport | None = None) -> str:
    """Render the HTML report of a committed run to `out` (a path or store URI)."""
    from mergeaudit import store

    data = load_run(results_uri, run_id)
    data.regression = regression
    store.write_bytes(out, render_html(data).encode())
    return out
