"""Reports of an audit run, built from its committed tables: one self-contained HTML file with
embedded plots, and the same content as Markdown (the flow's Prefect artifact).

    data = load_run(RESULTS, run_id=None)          # the latest committed run by default
    html = render_html(data)                       # mergeaudit report RESULTS --out report.html
    md = render_markdown(data)

Every number comes from mergeaudit.results (leaderboard, MergeBench measures, fragility
summaries, the comparison with the previous run); this module only lays them out, and importing
it loads neither torch nor any merge method.

Plots (`report.plots`; PNG, base64 in the page, each in a <figure id="plot-...">): per-layer
update-sparsity heatmap per model; sparsity, update rank, drift and principal-weight lift per module
type; pairwise overlap-lift and cosine matrices; geometry against the training step per series;
per task, merge scores with the constituent checkpoints as reference lines; interpolation,
task-vector and perturbation curves (first task). Tables: the regression check (test, prompts
better and worse, p-value per score), the merge leaderboard (with significance against the best
constituent and the base), MergeBench's measures, fragility summaries (with intervals and
standard errors), geometry per model and per module type, the tensors geometry did not compare,
pairwise overlap (with Fisher mass shares where Fisher was estimated), the training-step series,
and the provenance of every candidate row.
"""

from __future__ import annotations

import html
import math
from typing import Any

from mergeaudit.report import plots
from mergeaudit.report.model import Content, Figure, RunData, load_run
from mergeaudit.results import geometry_views
from mergeaudit.results import leaderboard as board
from mergeaudit.results.compare import RegressionReport

__all__ = [
    "Content",
    "Figure",
    "RunData",
    "build_content",
    "load_run",
    "markdown_table",
    "render_html",
    "render_markdown",
    "write_report",
]


def leaderboard(data: RunData) -> list[dict]:
    return [r.model_dump() for r in board.rows(data)]


def provenance(data: RunData) -> list[dict]:
    versions = data.run.get("package_versions") or "{}"
    out = []
    for c in data.rows["candidates"]:
        inputs = zip(c["input_names"] or [], c["input_uris"] or [], c["input_fingerprints"] or [])
        out.append(
            {
                "candidate": c["name"],
                "candidate_id": c["candidate_id"],
                "kind": c["kind"],
                "method": c["method"],
                "params_hash": c["params_hash"],
                "params": c["params_json"],
                "inputs": "; ".join(f"{n} = {u} @ {f}" for n, u, f in inputs),
                "run_id": data.run_id,
                "mergeaudit": c["mergeaudit_version"],
                "packages": versions,
            }
        )
    return out


MODEL_GEOMETRY = (
    "model",
    "kind",
    "sparsity_bf16",
    "sparsity_rel",
    "sparsity_abs",
    "rel_update_norm",
    "update_rank_ratio",
    "spectral_drift",
    "principal_lift",
    "elected_sign_disagreement",
)
FISHER_SHARES = (
    "fisher_a_overlap_share",
    "fisher_a_exclusive_share",
    "fisher_b_overlap_share",
    "fisher_b_exclusive_share",
)


def model_geometry(data: RunData) -> list[dict]:
    return [{k: r.get(k) for k in MODEL_GEOMETRY} for r in data.rows["geometry_tensors"] if r["scope"] == "model"]


def pair_geometry(data: RunData) -> list[dict]:
    rows = [r for r in data.rows["geometry_pairs"] if r["scope"] == "global" and r["mask"] in (None, "bf16")]
    fisher = any(r.get(FISHER_SHARES[0]) is not None for r in rows)
    return [
        {
            "pair": f"{r['model_a']} ~ {r['model_b']}",
            "kinds": f"{r['kind_a']} ~ {r['kind_b']}",
            "overlap_of_a": r["overlap_of_a"],
            "overlap_of_a_lift": r["overlap_of_a_lift"],
            "jaccard_lift": r["jaccard_lift"],
            "sign_conflict_rate": r["sign_conflict_rate"],
            "cosine": r["cosine"],
            **({k: r.get(k) for k in FISHER_SHARES} if fisher else {}),
        }
        for r in rows
    ]


def not_compared(data: RunData) -> list[dict]:
    return [{"note": line} for line in geometry_views.not_compared(data.rows["geometry_tensors"])]


def probe_summaries(data: RunData) -> list[dict]:
    names = {c["candidate_id"]: c["name"] for c in data.candidates("probe_summary")}
    return [
        {
            "probe": names[s["candidate_id"]],
            "task": s["task"],
            "metric": s["metric"],
            "x": s.get("probe_x"),
            "value": s["value"],
            "stderr": s["stderr"],
            "ci_low": s.get("ci_low"),
            "ci_high": s.get("ci_high"),
        }
        for s in data.table("scores")
        if s["candidate_id"] in names
    ]


def comparisons(data: RunData) -> list[dict]:
    if data.regression is None:
        return []
    return [
        r.model_dump(
            include={
                "candidate",
                "task",
                "metric",
                "previous",
                "current",
                "drop",
                "test",
                "n_shared",
                "n_better",
                "n_worse",
                "p_value",
                "flagged",
            }
        )
        for r in data.regression.comparisons
    ]


def build_content(data: RunData) -> Content:
    figs = (
        plots.sparsity_heatmaps(data)
        + plots.module_bars(data)
        + plots.pair_matrices(data)
        + plots.series_curves(data)
        + plots.score_bars(data)
        + plots.probe_curves(data)
    )
    sections = [
        ("Comparison with the previous run", comparisons(data), []),
        (
            "Merge leaderboard",
            leaderboard(data),
            [
                "task",
                "candidate",
                "method",
                "score",
                "stderr",
                "n",
                "best_input_name",
                "best_input",
                "margin",
                "beats_best_input",
                "p_vs_best_input",
                "beats_base",
                "p_vs_base",
                "update_sparsity_bf16",
                "status",
            ],
        ),
        (
            "MergeBench measures",
            [r.model_dump() for r in board.mergebench(data, data.own_tasks)],
            ["candidate", "own_tasks", "normalized_performance", "gain_kept", "forgetting", "forgetting_tasks"],
        ),
        ("Fragility probes", probe_summaries(data), []),
        ("Update geometry per model", model_geometry(data), []),
        ("Update geometry per module type", geometry_views.module_rows(data.rows["geometry_tensors"]), []),
        ("Tensors not compared", not_compared(data), []),
        ("Pairwise overlap (bf16 masks)", pair_geometry(data), []),
        ("Training-step series", geometry_views.series_rows(data.rows.get("geometry_series", [])), []),
        ("Checkpoints", data.rows["checkpoints"], ["name", "role", "kind", "uri", "fingerprint", "n_tensors", "dtype"]),
        (
            "Provenance",
            provenance(data),
            ["candidate", "candidate_id", "kind", "method", "params_hash", "params", "inputs", "run_id", "mergeaudit"],
        ),
    ]
    return Content(figs, sections)


# -- rendering -----------------------------------------------------------------------------------


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
    lines += [
        "| " + " | ".join(_cell(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols) + " |" for r in rows
    ]
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
.alarm{background:#fde2e2;border:1px solid #e99;padding:0.6em}
.ok{background:#e6f4e6;border:1px solid #9c9;padding:0.6em}
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
    sub = (
        f"results {data.results_uri}; started {run.get('started_at')}, finished {run.get('finished_at')}; "
        f"status {run.get('status')}; mergeaudit {run.get('mergeaudit_version')}"
    )
    return title, sub


def render_html(data: RunData, content: Content | None = None) -> str:
    content = content or build_content(data)
    title, sub = _header(data)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(sub)}</p>",
    ]
    if data.notes:
        parts.append(f"<h2>Verdict</h2><pre id='notes'>{html.escape(data.notes)}</pre>")
    if data.regression is not None:
        cls = "alarm" if data.regression.regressions else "ok"
        parts.append(f"<pre class='{cls}' id='regressions'>{html.escape(data.regression.summary())}</pre>")
    parts.append("<h2>Plots</h2>")
    for fig in content.figures:
        parts.append(
            f"<figure id='{fig.id}'><img alt='{html.escape(fig.title)}' src='{fig.data_uri()}'>"
            f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)}</figcaption></figure>"
        )
    for heading, rows, cols in content.sections:
        parts.append(f"<h2 id='{plots.slug(heading)}'>{html.escape(heading)}</h2>" + _html_table(rows, cols))
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
    parts += [
        f"## {prov[0]}",
        markdown_table(prov[1], ["candidate", "candidate_id", "method", "params_hash", "inputs"]),
    ]
    return "\n\n".join(parts) + "\n"


def write_report(
    results_uri: str, out: str, run_id: str | None = None, regression: RegressionReport | None = None
) -> str:
    """Render the HTML report of a committed run to `out` (a path or store URI)."""
    from mergeaudit import store

    data = load_run(results_uri, run_id)
    data.regression = regression
    store.write_bytes(out, render_html(data).encode())
    return out
