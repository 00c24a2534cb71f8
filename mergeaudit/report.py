"""Human-readable summaries of an audit run (Markdown here; the HTML report builds on it).

    markdown_summary(config, run_id, summary_rows, geometry_tables)
"""

from __future__ import annotations

from typing import Any

from mergeaudit.config import AuditConfig


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_no rows_"
    cols = columns or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown_summary(config: AuditConfig, run_id: str, summary: list[dict[str, Any]],
                     geometry_tables: dict[str, list[dict]]) -> str:
    """The run at a glance: leaderboard, probes, per-model sparsity and pairwise overlap."""
    ranked = sorted((r for r in summary if r["method"] != "probe"), key=lambda r: -(r["score"] or 0.0))
    probe_rows = [r for r in summary if r["method"] == "probe"]
    models = [{"model": r["model"], "kind": r["kind"], "sparsity_bf16": r["sparsity_bf16"],
               "sparsity_rel": r["sparsity_rel"], "rel_update_norm": r["rel_update_norm"]}
              for r in geometry_tables.get("geometry_tensors", []) if r.get("scope") == "model"]
    pairs = [{"pair": f"{r['model_a']} ~ {r['model_b']}", "overlap_of_a_lift": r["overlap_of_a_lift"],
              "jaccard_lift": r["jaccard_lift"], "sign_conflict_rate": r["sign_conflict_rate"], "cosine": r["cosine"]}
             for r in geometry_tables.get("geometry_pairs", []) if r.get("scope") == "global"]
    parts = [
        f"# Merge audit `{config.name}`, run `{run_id}`",
        f"Results: `{config.results_uri}`; tasks: {', '.join(config.evaluation.tasks)}.",
        "## Leaderboard",
        markdown_table(ranked, ["candidate", "method", "metric", "score", "stderr", "update_sparsity_bf16"]),
    ]
    if probe_rows:
        parts += ["## Fragility probes", markdown_table(probe_rows, ["candidate", "metric", "score"])]
    parts += ["## Update sparsity per model", markdown_table(models)]
    if pairs:
        parts += ["## Pairwise overlap (bf16 update masks; lift over chance)", markdown_table(pairs)]
    return "\n\n".join(parts) + "\n"
