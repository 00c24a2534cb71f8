"""Result tables: pyarrow schemas declared once, Hive-partitioned Parquet under a results URI,
committed run by run.

Layout: table `T` of run `R` on date `D` lives in files `RESULTS/T/date=D/run_id=R/part-W.parquet`
(`W` unique per write), and the run becomes visible when its manifest `RESULTS/_commits/R.json`
is written, last and atomically. The manifest lists every file of the run, so

- a writer killed mid-run leaves files no manifest names: readers never see them (`vacuum`
  deletes them later);
- writing a run id again writes new files and replaces the manifest in one step, then deletes
  the files of the manifest it replaced; readers see the old run or the new one, never a mix;
- two audits writing at once touch different manifests and lose nothing.

Every file carries the table name, its schema version and the writer's package versions in its
Parquet metadata. Readers upgrade older schema versions on the fly (new columns read as nulls,
renames in `RENAMES`), including the version-1 layout (`part-0.parquet`, no manifest; a run was
committed when its `runs` file existed). Readers:

    read_table(RESULTS, "scores", run_id=None, audit_name=None)   # pyarrow.Table (.to_pandas())
    query(RESULTS, "select ... from scores join candidates using (run_id, candidate_id)")
    committed_files(RESULTS, "scores")    # for pandas/DuckDB/Spark reading the files themselves

(A plain glob over `T/*/*/*.parquet` also sees uncommitted and superseded files; read through
these functions, or the files they list.)
"""

from __future__ import annotations

import datetime as dt
import io
import json
import posixpath
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mergeaudit import store
from mergeaudit.errors import ConfigError, StoreError

SCHEMA_VERSION = 2
COMMITS = "_commits"
MANIFEST_FORMAT = "mergeaudit.commit/1"
LEGACY_PART_FILE = "part-0.parquet"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

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
        ("n_candidates", pa.int32()),            # v2
        ("n_failed", pa.int32()),                # v2
        ("previous_run_id", pa.string()),        # v2: the run the regression check compared with
        ("regressions_json", pa.string()),       # v2: what the regression check flagged
    ]),
    "checkpoints": pa.schema([                   # v2
        ("name", pa.string()),
        ("role", pa.string()),                   # base | model
        ("kind", pa.string()),                   # base | rlvr | sft | unknown
        ("uri", pa.string()),
        ("fingerprint", pa.string()),
        ("n_tensors", pa.int64()),
        ("nbytes", pa.int64()),
        ("model_type", pa.string()),
        ("dtype", pa.string()),
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
        ("status", pa.string()),                 # v2: ok | failed
        ("error", pa.string()),                  # v2
    ]),
    "samples": pa.schema([
        ("candidate_id", pa.string()),
        ("candidate", pa.string()),              # v2
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
        ("candidate", pa.string()),              # v2: provenance, denormalised from candidates
        ("method", pa.string()),                 # v2
        ("params_hash", pa.string()),            # v2
        ("task", pa.string()),
        ("metric", pa.string()),
        ("filter", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("n", pa.int64()),
    ]),
}

PARTITION_FIELDS = [pa.field("date", pa.string()), pa.field("run_id", pa.string())]

# Column renames per table: {table: {old name: new name}}, applied to files older than the
# current version. Version 2 only added columns.
RENAMES: dict[str, dict[str, str]] = {}


def _check_table(name: str) -> pa.Schema:
    schema = SCHEMAS.get(name)
    if schema is None:
        raise ConfigError(f"unknown table {name!r}; tables: {', '.join(SCHEMAS)}")
    return schema


def to_arrow(name: str, rows: list[dict]) -> pa.Table:
    """Rows to a table of the declared schema; missing keys become nulls, extra keys fail."""
    schema = _check_table(name)
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    if extra:
        raise ConfigError(f"table {name}: columns not in the schema: {', '.join(extra)}")
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    try:
        table = pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConfigError(f"table {name}: {exc}") from exc
    return table.replace_schema_metadata({b"mergeaudit.schema_version": str(SCHEMA_VERSION).encode(),
                                          b"mergeaudit.table": name.encode()})


def upgrade(name: str, table: pa.Table, version: int) -> pa.Table:
    """A table read from a file of an older (or the current) schema version, in the current
    schema: renamed columns under their new names, added columns as nulls, types cast."""
    schema = _check_table(name)
    if version > SCHEMA_VERSION:
        raise StoreError(f"table {name} has schema version {version}, newer than this mergeaudit "
                         f"({SCHEMA_VERSION}); upgrade mergeaudit to read it")
    if version < SCHEMA_VERSION:
        renames = RENAMES.get(name, {})
        table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        else:
            cols.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=schema)


# -- writing -----------------------------------------------------------------------------------


def partition_uri(results_uri: str, table: str, run_date: str, run_id: str) -> str:
    return store.join(results_uri, table, f"date={run_date}", f"run_id={run_id}")


def manifest_uri(results_uri: str, run_id: str) -> str:
    return store.join(results_uri, COMMITS, f"{run_id}.json")


def _check_ids(run_id: str, run_date: str) -> None:
    if not _SAFE_ID.match(run_id):
        raise ConfigError(f"run id {run_id!r} must be 1-128 letters, digits, '.', '_' or '-'")
    if not _DATE.match(run_date):
        raise ConfigError(f"run date {run_date!r} must be YYYY-MM-DD")


def _parquet_bytes(table: pa.Table, extra_meta: dict[bytes, bytes]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **extra_meta}), buf,
                   compression="zstd")
    return buf.getvalue()


def write_run(results_uri: str, run_id: str, run_date: str, tables: dict[str, list[dict]],
              audit_name: str | None = None, package_versions: dict[str, str] | None = None) -> dict[str, str]:
    """Write and commit the tables of one run; returns table -> file URI.

    All rows are validated against the schemas before anything is written. The data files go
    under unique names, then the manifest; a run id written before is replaced as a whole.
    """
    _check_ids(run_id, run_date)
    arrow = {name: to_arrow(name, rows) for name, rows in tables.items()}
    if audit_name is None and tables.get("runs"):
        audit_name = tables["runs"][0].get("audit_name")
    writer = uuid.uuid4().hex[:12]
    meta = {b"mergeaudit.run_id": run_id.encode(), b"mergeaudit.writer": writer.encode(),
            b"mergeaudit.package_versions": json.dumps(package_versions or {}, sort_keys=True).encode()}
    files: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, table in arrow.items():
        rel = posixpath.join(name, f"date={run_date}", f"run_id={run_id}", f"part-{writer}.parquet")
        uri = store.join(results_uri, rel)
        store.write_bytes(uri, _parquet_bytes(table, meta))
        files[name] = uri
        entries[name] = {"files": [rel], "rows": table.num_rows}
    previous = _read_manifest(manifest_uri(results_uri, run_id))
    manifest = {
        "format": MANIFEST_FORMAT, "run_id": run_id, "date": run_date, "audit_name": audit_name,
        "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(), "writer": writer,
        "schema_version": SCHEMA_VERSION, "package_versions": package_versions or {}, "tables": entries,
    }
    store.write_bytes(manifest_uri(results_uri, run_id), json.dumps(manifest, indent=1, sort_keys=True).encode())
    if previous:  # the replaced version's files (a legacy run: its part-0 files)
        keep = {f for e in entries.values() for f in e["files"]}
        for old in {f for e in previous["tables"].values() for f in e["files"]} - keep:
            try:
                store.remove(store.join(results_uri, old))
            except StoreError:
                pass  # vacuum gets it later
    _remove_legacy(results_uri, run_id)
    return files


def write_table(results_uri: str, table: str, run_id: str, run_date: str, rows: list[dict]) -> str:
    """Write and commit a run consisting of one table; returns the file URI."""
    return write_run(results_uri, run_id, run_date, {table: rows})[table]


def _remove_legacy(results_uri: str, run_id: str) -> None:
    for uri in _legacy_files(results_uri, run_id):
        store.remove(uri)


def vacuum(results_uri: str, older_than_s: float = 6 * 3600) -> list[str]:
    """Delete data files no manifest names (left by killed writers or replaced runs) that are
    older than `older_than_s` (so files of a write in progress survive); returns their URIs."""
    committed = {store.join(results_uri, f) for m in committed_runs(results_uri)
                 for e in m["tables"].values() for f in e["files"]}
    loc = store.locate(results_uri)
    removed = []
    with store.translate_errors(results_uri, "list"):
        store.refresh_tree(loc)
        if not loc.fs.exists(loc.path):
            return []
        found = loc.fs.find(loc.path, detail=True)
    now = time.time()
    for path, raw in found.items():
        rel = posixpath.relpath(str(path), loc.path.rstrip("/"))
        if rel.split("/")[0] not in SCHEMAS or not rel.endswith(".parquet"):
            continue
        uri = store.join(loc.uri, rel)
        stamp = raw.get("mtime") or raw.get("LastModified") or raw.get("created")
        age = now - (stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or now))
        if uri not in committed and age >= older_than_s:
            store.remove(uri)
            removed.append(uri)
    return removed


# -- reading -----------------------------------------------------------------------------------


def _read_manifest(uri: str) -> dict | None:
    try:
        doc = json.loads(store.read_bytes(uri))
    except StoreError as exc:
        if "not found" in str(exc):
            return None
        raise
    except json.JSONDecodeError as exc:
        raise StoreError(f"commit manifest {uri} is not valid JSON: {exc}") from exc
    if doc.get("format") != MANIFEST_FORMAT:
        raise StoreError(f"commit manifest {uri} has an unknown format {doc.get('format')!r}")
    return doc


def _legacy_files(results_uri: str, run_id: str | None = None, table: str = "*") -> list[str]:
    """Version-1 files (`part-0.parquet`) under the results, of one run id or all."""
    loc = store.locate(results_uri)
    with store.translate_errors(results_uri, "list"):
        store.refresh_tree(loc)
        if not loc.fs.exists(loc.path):
            return []
        pattern = f"{loc.path.rstrip('/')}/{table}/date=*/run_id={run_id or '*'}/{LEGACY_PART_FILE}"
        return [store.join(loc.uri, posixpath.relpath(str(p), loc.path.rstrip("/"))) for p in loc.fs.glob(pattern)]


def _legacy_manifests(results_uri: str) -> list[dict]:
    """Version 1 had no manifests: it wrote the runs table last, so a run with a `runs` file was
    committed. Costs one listing of the runs table when there are no legacy runs."""
    if not _legacy_files(results_uri, table="runs"):
        return []
    root = store.join(results_uri, "")
    runs: dict[str, dict] = {}
    committed = set()
    for uri in _legacy_files(results_uri):
        table, date_part, run_part, _ = uri[len(root):].lstrip("/").split("/")[-4:]
        run_id, date = run_part.removeprefix("run_id="), date_part.removeprefix("date=")
        run = runs.setdefault(run_id, {"format": MANIFEST_FORMAT, "run_id": run_id, "date": date, "audit_name": None,
                                       "committed_at": None, "schema_version": 1, "legacy": True, "tables": {}})
        if table in SCHEMAS:
            run["tables"][table] = {"files": ["/".join([table, date_part, run_part, LEGACY_PART_FILE])], "rows": None}
        if table == "runs":
            committed.add(run_id)
    return [m for rid, m in runs.items() if rid in committed]


def committed_runs(results_uri: str, audit_name: str | None = None) -> list[dict]:
    """The manifests of every committed run, oldest first (version-1 runs included)."""
    root = store.join(results_uri, COMMITS)
    loc = store.locate(root)
    with store.translate_errors(root, "list"):
        store.refresh_tree(loc)
        names = [str(p) for p in loc.fs.glob(loc.path.rstrip("/") + "/*.json")] if loc.fs.exists(loc.path) else []
    uris = [store.join(loc.uri, posixpath.basename(n)) for n in names]
    with ThreadPoolExecutor(8) as pool:
        manifests = [m for m in pool.map(_read_manifest, uris) if m]
    seen = {m["run_id"] for m in manifests}
    manifests += [m for m in _legacy_manifests(results_uri) if m["run_id"] not in seen]
    if audit_name is not None:
        manifests = [m for m in manifests if manifest_audit_name(results_uri, m) == audit_name]
    return sorted(manifests, key=lambda m: (m.get("committed_at") or "", m["run_id"]))


def manifest_audit_name(results_uri: str, manifest: dict) -> str | None:
    """The audit a committed run belongs to (version-1 runs keep it only in their runs row)."""
    if manifest.get("audit_name") is not None or not manifest.get("legacy"):
        return manifest.get("audit_name")
    runs = _read_files(results_uri, "runs", [manifest])
    names = runs.column("audit_name").to_pylist()
    return names[0] if names else None


def committed_files(results_uri: str, table: str, run_id: str | None = None,
                    audit_name: str | None = None) -> list[str]:
    """URIs of the committed files of a table (one run's, one audit's, or all)."""
    _check_table(table)
    return [store.join(results_uri, f) for m in _select(results_uri, run_id, audit_name)
            for f in m["tables"].get(table, {}).get("files", [])]


def _select(results_uri: str, run_id: str | None, audit_name: str | None) -> list[dict]:
    manifests = committed_runs(results_uri, audit_name)
    return [m for m in manifests if run_id is None or m["run_id"] == run_id]


def _read_file(uri: str) -> tuple[pa.Table, int]:
    table = pq.read_table(io.BytesIO(store.read_bytes(uri)))
    meta = table.schema.metadata or {}
    return table, int(meta.get(b"mergeaudit.schema_version", b"1"))


def _read_files(results_uri: str, table: str, manifests: list[dict]) -> pa.Table:
    jobs = [(m, store.join(results_uri, f)) for m in manifests for f in m["tables"].get(table, {}).get("files", [])]
    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(lambda job: _read_file(job[1]), jobs))
    schema = SCHEMAS[table].append(PARTITION_FIELDS[0]).append(PARTITION_FIELDS[1])
    out = []
    for (manifest, _), (data, version) in zip(jobs, parts):
        data = upgrade(table, data, version)
        n = data.num_rows
        data = data.append_column(PARTITION_FIELDS[0], pa.array([manifest["date"]] * n, pa.string()))
        out.append(data.append_column(PARTITION_FIELDS[1], pa.array([manifest["run_id"]] * n, pa.string())))
    return pa.concat_tables(out) if out else schema.empty_table()


def read_table(results_uri: str, table: str, run_id: str | None = None, audit_name: str | None = None,
               manifests: list[dict] | None = None) -> pa.Table:
    """The committed rows of a table (one run's, one audit's, or all), in the current schema,
    with `date` and `run_id` columns. `manifests` (from `committed_runs`) saves listing the
    commits again when reading several tables. A run replaced while being read is read again."""
    _check_table(table)
    for attempt in range(3):
        if manifests is None or attempt:
            manifests = _select(results_uri, run_id, audit_name)
        else:
            manifests = [m for m in manifests if run_id is None or m["run_id"] == run_id]
        try:
            return _read_files(results_uri, table, manifests)
        except StoreError as exc:
            if "not found" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def connect(results_uri: str, tables: list[str] | None = None, run_id: str | None = None):
    """An in-memory DuckDB connection with one view per committed table (all, or `tables`)."""
    import duckdb

    con = duckdb.connect()
    for name in tables or list(SCHEMAS):
        con.register(name, read_table(results_uri, name, run_id=run_id))
    return con


def query(results_uri: str, sql: str, run_id: str | None = None) -> pa.Table:
    """Run SQL over the committed tables (each table name is a view); returns an Arrow table."""
    import duckdb

    used = [name for name in SCHEMAS if re.search(rf"\b{name}\b", sql)]
    if not used:
        raise ConfigError(f"the query names none of the tables: {', '.join(SCHEMAS)}")
    con = connect(results_uri, used, run_id=run_id)
    try:
        return con.sql(sql).fetch_arrow_table()
    except duckdb.Error as exc:
        raise ConfigError(f"query failed: {' '.join(str(exc).split())}") from exc
    finally:
        con.close()
