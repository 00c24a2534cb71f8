"""The result tables' pyarrow schemas, declared once, and how rows and older files meet them.

`SCHEMAS` names every table and its columns at `SCHEMA_VERSION`; `to_arrow` turns rows into a
table of the declared schema (missing keys are nulls, unknown keys fail); `upgrade` brings a
table read from a file of an older version to the current schema (renames in `RENAMES`, added
columns as nulls). `mergeaudit.tables` writes and reads them and re-exports these names.
"""

from __future__ import annotations

import pyarrow as pa

from mergeaudit.errors import ConfigError, SchemaError, StoreError

SCHEMA_VERSION = 4
_TS = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = {
    "runs": pa.schema(
        [
            ("audit_name", pa.string()),
            ("started_at", _TS),
            ("finished_at", _TS),
            ("status", pa.string()),
            ("config_json", pa.string()),
            ("mergeaudit_version", pa.string()),
            ("package_versions", pa.string()),
            ("n_candidates", pa.int32()),  # v2
            ("n_failed", pa.int32()),  # v2
            ("previous_run_id", pa.string()),  # v2: the run the regression check compared with
            ("regressions_json", pa.string()),  # v2: what the regression check flagged
        ]
    ),
    "checkpoints": pa.schema(
        [  # v2
            ("name", pa.string()),
            ("role", pa.string()),  # base | model | series_step (issue 15)
            ("kind", pa.string()),  # base | rlvr | sft | unknown
            ("uri", pa.string()),
            ("fingerprint", pa.string()),
            ("n_tensors", pa.int64()),
            ("nbytes", pa.int64()),
            ("model_type", pa.string()),
            ("dtype", pa.string()),
        ]
    ),
    "geometry_tensors": pa.schema(
        [
            ("scope", pa.string()),  # tensor | layer | module | model
            ("model", pa.string()),
            ("kind", pa.string()),
            ("model_uri", pa.string()),
            ("model_fingerprint", pa.string()),
            ("base_uri", pa.string()),
            ("base_fingerprint", pa.string()),
            ("tensor", pa.string()),
            ("layer", pa.int32()),
            ("module", pa.string()),
            ("numel", pa.int64()),
            ("changed_bf16", pa.int64()),
            ("changed_rel", pa.int64()),
            ("changed_abs", pa.int64()),
            ("sparsity_bf16", pa.float64()),
            ("sparsity_rel", pa.float64()),
            ("sparsity_abs", pa.float64()),
            ("update_norm", pa.float64()),
            ("base_norm", pa.float64()),
            ("rel_update_norm", pa.float64()),
            ("topk", pa.int32()),
            ("spectral_method", pa.string()),
            ("stable_rank", pa.float64()),
            ("energy_topk_left", pa.float64()),
            ("energy_topk_right", pa.float64()),
            ("angle_left_max_deg", pa.float64()),
            ("angle_left_mean_deg", pa.float64()),
            ("angle_right_max_deg", pa.float64()),
            ("angle_right_mean_deg", pa.float64()),
            ("reason", pa.string()),
            # added with issue 15 (nullable; files without them read as nulls): see mergeaudit.geometry
            ("n_tensors", pa.int64()),  # tensors in a layer/module/model row
            ("sparsity_bf16_numel_weighted", pa.float64()),  # 1 - changed/numel (scope rows)
            ("update_rank", pa.int64()),
            ("update_rank_ratio", pa.float64()),
            ("energy_topk", pa.float64()),  # two-sided block ||U_k^T D V_k||^2 / ||D||^2
            ("spectral_drift", pa.float64()),
            ("principal_alpha", pa.float64()),
            ("principal_changed", pa.int64()),  # changed entries of tensors with a principal mask
            ("principal_overlap", pa.int64()),  # ... inside the principal mask
            ("principal_overlap_share", pa.float64()),
            ("principal_overlap_chance", pa.float64()),
            ("principal_lift", pa.float64()),
            ("elected_sign_shared", pa.int64()),  # changed entries also changed by another model
            ("elected_sign_disagreement", pa.float64()),
        ]
    ),
    "geometry_pairs": pa.schema(
        [
            ("scope", pa.string()),  # tensor | layer | module | global
            ("model_a", pa.string()),
            ("model_b", pa.string()),
            ("kind_a", pa.string()),
            ("kind_b", pa.string()),
            ("model_a_fingerprint", pa.string()),
            ("model_b_fingerprint", pa.string()),
            ("base_uri", pa.string()),
            ("base_fingerprint", pa.string()),
            ("mask", pa.string()),
            ("tensor", pa.string()),
            ("layer", pa.int32()),
            ("module", pa.string()),
            ("numel", pa.int64()),
            ("changed_a", pa.int64()),
            ("changed_b", pa.int64()),
            ("overlap", pa.int64()),
            ("overlap_chance", pa.float64()),
            ("overlap_of_a", pa.float64()),
            ("overlap_of_a_chance", pa.float64()),
            ("overlap_of_a_lift", pa.float64()),
            ("overlap_of_b", pa.float64()),
            ("overlap_of_b_chance", pa.float64()),
            ("overlap_of_b_lift", pa.float64()),
            ("jaccard", pa.float64()),
            ("jaccard_chance", pa.float64()),
            ("jaccard_lift", pa.float64()),
            ("sign_conflict_rate", pa.float64()),
            ("cosine", pa.float64()),
            ("cosine_overlap", pa.float64()),
            ("norm_ratio", pa.float64()),
            # added with issue 15 (nullable): shares of each model's Fisher mass, where Fisher is given
            ("fisher_a_overlap_share", pa.float64()),
            ("fisher_a_exclusive_share", pa.float64()),
            ("fisher_b_overlap_share", pa.float64()),
            ("fisher_b_exclusive_share", pa.float64()),
        ]
    ),
    "geometry_series": pa.schema(
        [  # added with issue 15: see mergeaudit.geometry.series
            ("series", pa.string()),
            ("kind", pa.string()),
            ("step", pa.int64()),
            ("model_uri", pa.string()),
            ("model_fingerprint", pa.string()),
            ("base_uri", pa.string()),
            ("base_fingerprint", pa.string()),
            ("scope", pa.string()),  # model | module
            ("module", pa.string()),
            ("against", pa.string()),  # base | previous | final | model
            ("against_model", pa.string()),
            ("against_fingerprint", pa.string()),
            ("numel", pa.int64()),
            ("n_tensors", pa.int64()),
            ("skipped_tensors", pa.int64()),
            ("changed_bf16", pa.int64()),
            ("sparsity_bf16", pa.float64()),
            ("sparsity_rel", pa.float64()),
            ("sparsity_abs", pa.float64()),
            ("rel_update_norm", pa.float64()),
            ("update_rank_ratio", pa.float64()),
            ("spectral_drift", pa.float64()),
            ("principal_lift", pa.float64()),
            ("overlap", pa.int64()),
            ("overlap_of_step", pa.float64()),
            ("overlap_of_step_lift", pa.float64()),
            ("overlap_of_other", pa.float64()),
            ("jaccard", pa.float64()),
            ("jaccard_lift", pa.float64()),
            ("sign_conflict_rate", pa.float64()),
            ("cosine", pa.float64()),
        ]
    ),
    "candidates": pa.schema(
        [
            ("candidate_id", pa.string()),
            ("name", pa.string()),
            ("kind", pa.string()),
            ("method", pa.string()),
            ("params_json", pa.string()),
            ("params_hash", pa.string()),
            ("input_names", pa.list_(pa.string())),
            ("input_uris", pa.list_(pa.string())),
            ("input_fingerprints", pa.list_(pa.string())),
            ("update_sparsity_bf16", pa.float64()),
            ("mergeaudit_version", pa.string()),
            ("status", pa.string()),  # v2: ok | failed
            ("error", pa.string()),  # v2
            ("probe_family", pa.string()),  # v3: interpolation | task_vector | gaussian | drop (probes)
            ("probe_path", pa.string()),  # v3: "a~b" for interpolations, the model otherwise
            ("probe_x", pa.float64()),  # v3: alpha, lambda, noise scale or drop rate
            ("probe_seed", pa.int64()),  # v3
        ]
    ),
    "samples": pa.schema(
        [
            ("candidate_id", pa.string()),
            ("candidate", pa.string()),  # v2
            ("task", pa.string()),
            ("doc_id", pa.int64()),
            ("sample", pa.int32()),
            ("prompt_hash", pa.string()),
            ("completion", pa.string()),
            ("extracted", pa.string()),
            ("verdict", pa.bool_()),
            ("reward", pa.float64()),
            ("format_ok", pa.bool_()),
            ("verifier", pa.string()),
            ("error", pa.string()),
            # v3: correct, wrong, no_answer, truncated (v4), timeout, violation, error
            ("status", pa.string()),
            ("truncated", pa.bool_()),  # v4: the generation used its whole max_gen_toks (scored wrong)
            ("completion_tokens", pa.int64()),  # v4: generated tokens (the model's tokenizer)
            ("trace_tokens", pa.int64()),  # v4: tokens of the reasoning trace (inside the think tags)
        ]
    ),
    "scores": pa.schema(
        [
            ("candidate_id", pa.string()),
            ("candidate", pa.string()),  # v2: provenance, denormalised from candidates
            ("method", pa.string()),  # v2
            ("params_hash", pa.string()),  # v2
            ("task", pa.string()),
            ("metric", pa.string()),
            ("filter", pa.string()),
            ("value", pa.float64()),  # sample-averaged: mean over prompts of per-prompt means
            ("stderr", pa.float64()),  # sd of the per-prompt values / sqrt(n) (mergeaudit.results.stats)
            ("n", pa.int64()),  # prompts (the unit of stderr) for verifier scores
            ("probe_family", pa.string()),  # v3: probe summaries: the family they summarise
            ("probe_x", pa.float64()),  # v3: ... and the setting (noise scale, drop rate)
            ("ci_low", pa.float64()),  # v3: 95% bootstrap interval over prompts (barrier heights)
            ("ci_high", pa.float64()),  # v3
        ]
    ),
}

PARTITION_FIELDS = [pa.field("date", pa.string()), pa.field("run_id", pa.string())]

# Column renames per table: {table: {old name: new name}}, applied to files older than the
# current version. Versions 2 and 3 only added columns (v3: probe settings as columns, bootstrap
# intervals); v2 probe summaries keep their setting in `filter` ("gaussian@0.1").
RENAMES: dict[str, dict[str, str]] = {}


def check_table(name: str) -> pa.Schema:
    """The schema of a table a caller names (to read it); an unknown name is a ConfigError."""
    schema = SCHEMAS.get(name)
    if schema is None:
        raise ConfigError(f"unknown table {name!r}; tables: {', '.join(SCHEMAS)}")
    return schema


def to_arrow(name: str, rows: list[dict]) -> pa.Table:
    """Rows to a table of the declared schema; missing keys become nulls, extra keys fail.

    Our own code builds the rows, so a row that does not fit is a SchemaError (a bug), not a
    ConfigError."""
    schema = SCHEMAS.get(name)
    if schema is None:
        raise SchemaError(f"rows for unknown table {name!r}; tables: {', '.join(SCHEMAS)}")
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    if extra:
        raise SchemaError(f"table {name}: columns not in the schema: {', '.join(extra)}")
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    try:
        table = pa.Table.from_pydict(columns, schema=schema)
    except pa.ArrowException as exc:
        raise SchemaError(f"table {name}: {exc}") from exc
    return table.replace_schema_metadata(
        {b"mergeaudit.schema_version": str(SCHEMA_VERSION).encode(), b"mergeaudit.table": name.encode()}
    )


def upgrade(name: str, table: pa.Table, version: int) -> pa.Table:
    """A table read from a file of an older (or the current) schema version, in the current
    schema: renamed columns under their new names, added columns as nulls, types cast."""
    schema = check_table(name)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"table {name} has schema version {version}, newer than this mergeaudit "
            f"({SCHEMA_VERSION}); upgrade mergeaudit to read it"
        )
    if version < SCHEMA_VERSION:
        renames = RENAMES.get(name, {})
        table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        else:
            cols.append(pa.nulls(table.num_rows, field.type))
    out = pa.Table.from_arrays(cols, schema=schema)
    if name == "scores" and version < 3:
        out = _probe_settings_from_filter(out)
    return out


def _probe_settings_from_filter(table: pa.Table) -> pa.Table:
    """v2 wrote a probe summary's setting into `filter` ("gaussian@0.1"): v3 has columns."""
    filters = table.column("filter").to_pylist()
    family, x, filt = [], [], []
    for f in filters:
        head, sep, tail = (f or "").partition("@")
        try:
            value = float(tail) if sep else None
        except ValueError:
            value = None
        family.append(head if value is not None else None)
        x.append(value)
        filt.append("probe" if value is not None else f)
    for col, values in (("probe_family", family), ("probe_x", x), ("filter", filt)):
        i = table.schema.get_field_index(col)
        table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
    return table
