"""What the geometry tables say, in the shapes the summary and the report show (no torch here).

not_compared(rows["geometry_tensors"])   # one line per model and reason a tensor was skipped
module_rows(rows["geometry_tensors"])    # per model and module type: sparsity, rank, lift
series_rows(rows["geometry_series"])     # per series and step, the figures against base,
                                         # previous step, final step and other runs
"""

from __future__ import annotations

from collections import defaultdict

MODULE_COLUMNS = ("sparsity_bf16", "update_rank_ratio", "spectral_drift", "principal_lift", "elected_sign_disagreement")


def not_compared(tensor_rows: list[dict]) -> list[str]:
    """One line per model and reason for the tensors geometry did not compare (missing, another
    shape, another dtype than the base's): what the run summary states."""
    names: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in tensor_rows:
        if r["scope"] == "tensor" and r.get("reason"):
            names[(r["model"], r["reason"])].append(r["tensor"])
    return [
        f"geometry: {len(t)} tensor(s) of {model} not compared ({reason}): {', '.join(t[:3])}"
        f"{', ...' if len(t) > 3 else ''}"
        for (model, reason), t in names.items()
    ]


def module_rows(tensor_rows: list[dict]) -> list[dict]:
    """Per model and module type (attention, mlp, norm, embedding, other)."""
    return [
        {
            "model": r["model"],
            "module": r["module"],
            "n_tensors": r.get("n_tensors"),
            **{c: r.get(c) for c in MODULE_COLUMNS},
        }
        for r in tensor_rows
        if r["scope"] == "module"
    ]


def series_rows(rows: list[dict]) -> list[dict]:
    """Per series and step (model scope): sparsity, rank and principal-mask lift against the
    base, sparsity of the update since the previous step, overlap with the final update, and
    the largest overlap lift with another run."""
    out: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r["scope"] != "model":
            continue
        row = out.setdefault((r["series"], r["step"]), {"series": r["series"], "step": r["step"]})
        if r["against"] == "base":
            row.update(
                sparsity_bf16=r["sparsity_bf16"],
                update_rank_ratio=r["update_rank_ratio"],
                principal_lift=r["principal_lift"],
            )
        elif r["against"] == "previous":
            row["step_sparsity_bf16"] = r["sparsity_bf16"]
        elif r["against"] == "final":
            row["overlap_with_final"] = r["overlap_of_step"]
        elif r.get("overlap_of_step_lift") is not None:
            best = row.get("max_lift_other_run")
            if best is None or r["overlap_of_step_lift"] > best:
                row.update(max_lift_other_run=r["overlap_of_step_lift"], other_run=r["against_model"])
    return [out[k] for k in sorted(out)]
