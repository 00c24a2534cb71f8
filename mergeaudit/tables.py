"""Result tables: pyarrow schemas declared once, Hive-partitioned Parquet under a results URI.

Table `T` of run `R` on date `D` is the file `RESULTS/T/date=D/run_id=R/part-0.parquet`; the
partition columns live in the path, not the file, so pyarrow and DuckDB read them as columns:

    pyarrow.dataset.dataset(RESULTS + "/scores", partitioning="hive")
    duckdb.sql(f"select * from read_parquet('{RESULTS}/scores/*/*/*.parquet', hive_partitioning=true)")

Every file carries the schema version and table name in its metadata. A file is written
atomically (hidden temporary name, then rename; an object-store PUT is atomic by itself), and
writing a run id again replaces that run's file, so reruns never duplicate rows.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mergeaudit import store
from mergeaudit.errors import ConfigError

SCHEMA_VERSION = 1
PART_FILE = "part-0.parquet"
PARTITIONING = ds.partitioning(pa.schema([("date", pa.string()), ("run_id", pa.string())]), flavor="hive")

_TS = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = {
    "runs": pa.schema([
        ("audit_name", pa.string()),
        ("started_at", _TS),
        ("finished_at", _TS),
        ("status", pa.string()),
        ("config_json", pa.string()),
        ("mergeaudit_version", pa.string()),
        ("package_versions", pa.string()),
    ]),
    "geometry_tensors": pa.schema([
        ("scope", pa.string()),          # tensor | layer | model
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
    ]),
    "geometry_pairs": pa.schema([
        ("scope", pa.string()),          # tensor | layer | global
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
    ]),
    "candidates": pa.schema([
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
    ]),
    "samples": pa.schema([
        ("candidate_id", pa.string()),
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
    ]),
    "scores": pa.schema([
        ("candidate_id", pa.string()),
        ("task", pa.string()),
        ("metric", pa.string()),
        ("filter", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("n", pa.int64()),
    ]),
}


def to_arrow(name: str, rows: list[dict]) -> pa.Table:
    """Rows to a table of the declared schema; missing keys become nulls, extra keys fail."""
    schema = SCHEMAS.get(name)
    if schema is None:
        raise ConfigError(f"unknown table {name!r}; tables: {', '.join(SCHEMAS)}")
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    if extra:
        raise ConfigError(f"table {name}: columns not in the schema: {', '.join(extra)}")
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    meta = {b"mergeaudit.schema_version": str(SCHEMA_VERSION).encode(), b"mergeaudit.table": name.encode()}
    return pa.Table.from_pydict(columns, schema=schema).replace_schema_metadata(meta)


def partition_uri(results_uri: str, table: str, run_date: str, run_id: str) -> str:
    return store.join(results_uri, table, f"date={run_date}", f"run_id={run_id}")


def write_table(results_uri: str, table: str, run_id: str, run_date: str, rows: list[dict]) -> str:
    """Write one table of one run; rewriting a run id replaces its rows. Returns the file URI."""
    data = to_arrow(table, rows)
    buf = io.BytesIO()
    pq.write_table(data, buf, compression="zstd")
    uri = store.join(partition_uri(results_uri, table, run_date, run_id), PART_FILE)
    store.write_bytes(uri, buf.getvalue())
    # The same run id written on another date would otherwise count twice.
    for date_dir in store.list_dirs(store.join(results_uri, table)):
        if store.basename(date_dir) != f"date={run_date}":
            store.remove(store.join(date_dir, f"run_id={run_id}"), recursive=True)
    return uri


def write_run(results_uri: str, run_id: str, run_date: str, tables: dict[str, list[dict]]) -> dict[str, str]:
    """Write several tables of one run (the `runs` row last); returns table -> file URI."""
    order = sorted(tables, key=lambda t: t == "runs")
    return {t: write_table(results_uri, t, run_id, run_date, tables[t]) for t in order}


def read_table(results_uri: str, table: str, run_id: str | None = None) -> pa.Table:
    """All rows of a table (or one run's), with `date` and `run_id` columns from the paths."""
    if table not in SCHEMAS:
        raise ConfigError(f"unknown table {table!r}; tables: {', '.join(SCHEMAS)}")
    root = store.join(results_uri, table)
    if not store.exists(root):
        return SCHEMAS[table].empty_table().append_column("date", pa.array([], pa.string())).append_column(
            "run_id", pa.array([], pa.string()))
    loc = store.locate(root)
    dataset = ds.dataset(loc.path, filesystem=loc.fs, format="parquet", partitioning=PARTITIONING,
                         schema=SCHEMAS[table].append(pa.field("date", pa.string())).append(pa.field("run_id", pa.string())))
    flt = ds.field("run_id") == run_id if run_id else None
    return dataset.to_table(filter=flt)

