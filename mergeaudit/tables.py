"""Result tables: Hive-partitioned Parquet under a results URI, committed run by run (the
schemas are declared once in `mergeaudit.schemas` and re-exported here).

Layout: table `T` of run `R` on date `D` lives in files `RESULTS/T/date=D/run_id=R/part-W.parquet`
(`W` unique per write), and the run becomes visible when its manifest `RESULTS/_commits/R.json`
is written, last and atomically. The manifest lists every file of the run, so

- a writer killed mid-run leaves files no manifest names: readers never see them (`vacuum`
  deletes them later, with the hidden `.NAME.tmp-*` files of killed local writes);
- writing a run id again writes new files and replaces the manifest in one step, then deletes
  the files of the manifest it replaced; readers see the old run or the new one, never a mix;
- two audits writing at once touch different manifests and lose nothing.

A manifest is trusted only when it names files inside its own run's partition folders
(`T/date=D/run_id=R/NAME.parquet`: no `..`, absolute paths or other schemes), so no read,
rewrite or vacuum follows it elsewhere. A damaged store still answers: a manifest that is
truncated, not JSON or invalid, or a data file that is missing or unreadable, leaves that run
out with a warning naming it (`logging`), and every other run reads as usual; `vacuum` keeps
the files of runs whose manifest is damaged.

Every file carries the table name, its schema version and the writer's package versions in its
Parquet metadata. Readers upgrade older schema versions on the fly (new columns read as nulls,
renames in `RENAMES`), including the version-1 layout (`part-0.parquet`, no manifest; a run was
committed when its `runs` file existed). Readers:

    read_table(RESULTS, "scores", run_id=None, audit_name=None)   # pyarrow.Table (.to_pandas())
    query(RESULTS, "select ... from scores join candidates using (run_id, candidate_id)")
    committed_files(RESULTS, "scores")    # for pandas/DuckDB/Spark reading the files themselves

`query` runs DuckDB with only the committed tables registered: external access (files, URLs,
extensions) is off and the configuration locked. (A plain glob over `T/*/*/*.parquet` also sees
uncommitted and superseded files; read through these functions, or the files they list.)
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import posixpath
import re
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mergeaudit import store
from mergeaudit.errors import ConfigError, StoreError, TransientStoreError
from mergeaudit.schemas import (  # noqa: F401 - re-exported: tables.SCHEMAS, tables.to_arrow, ...
    PARTITION_FIELDS,
    RENAMES,
    SCHEMA_VERSION,
    SCHEMAS,
    check_table,
    to_arrow,
    upgrade,
)

COMMITS = "_commits"
MANIFEST_FORMAT = "mergeaudit.commit/1"
LEGACY_PART_FILE = "part-0.parquet"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")  # store.write_bytes's temporary files
log = logging.getLogger(__name__)

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
    pq.write_table(
        table.replace_schema_metadata({**(table.schema.metadata or {}), **extra_meta}), buf, compression="zstd"
    )
    return buf.getvalue()


def write_run(
    results_uri: str,
    run_id: str,
    run_date: str,
    tables: dict[str, list[dict]],
    audit_name: str | None = None,
    package_versions: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write and commit the tables of one run; returns table -> file URI.

    All rows are validated against the schemas before anything is written. The data files go
    under unique names, then the manifest; a run id written before is replaced as a whole.
    """
    _check_ids(run_id, run_date)
    arrow = {name: to_arrow(name, rows) for name, rows in tables.items()}
    if audit_name is None and tables.get("runs"):
        audit_name = tables["runs"][0].get("audit_name")
    writer = uuid.uuid4().hex[:12]
    meta = {
        b"mergeaudit.run_id": run_id.encode(),
        b"mergeaudit.writer": writer.encode(),
        b"mergeaudit.package_versions": json.dumps(package_versions or {}, sort_keys=True).encode(),
    }
    files: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, table in arrow.items():
        rel = posixpath.join(name, f"date={run_date}", f"run_id={run_id}", f"part-{writer}.parquet")
        uri = store.join(results_uri, rel)
        store.write_bytes(uri, _parquet_bytes(table, meta))
        files[name] = uri
        entries[name] = {"files": [rel], "rows": table.num_rows}
    try:
        previous = _read_manifest(manifest_uri(results_uri, run_id))
    except DamagedManifestError as exc:  # its files are left alone (it may name anything)
        log.warning("replacing run %s: %s; the files it names are left in place", run_id, exc)
        previous = None
    manifest = {
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "date": run_date,
        "audit_name": audit_name,
        "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "writer": writer,
        "schema_version": SCHEMA_VERSION,
        "package_versions": package_versions or {},
        "tables": entries,
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
    """Delete what killed or replaced writers left, older than `older_than_s` (so a write in
    progress survives): data files no manifest names, and the hidden temporary files of local
    writes (`.NAME.tmp-*`, in the table folders and `_commits/`). Files of a run whose manifest
    is damaged are kept (its data may be recoverable). Returns the URIs removed."""
    if not older_than_s >= 0:
        raise ConfigError(f"vacuum: older_than_s must be a non-negative number of seconds, not {older_than_s}")
    good, damaged = _scan_commits(results_uri)
    committed = {
        store.join(results_uri, f)
        for m in good + _legacy_manifests(results_uri)
        for e in m["tables"].values()
        for f in e["files"]
    }
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
        parts = rel.split("/")
        if parts[0] not in SCHEMAS and parts[0] != COMMITS:
            continue
        temporary = _TMP_NAME.match(parts[-1]) is not None
        data = parts[0] in SCHEMAS and len(parts) == 4 and rel.endswith(".parquet") and not parts[-1].startswith(".")
        if not temporary and not data:
            continue
        if data and (store.join(loc.uri, rel) in committed or parts[2].removeprefix("run_id=") in damaged):
            continue
        stamp = raw.get("mtime") or raw.get("LastModified") or raw.get("created")
        age = now - (stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or now))
        if age >= older_than_s:
            uri = store.join(loc.uri, rel)
            store.remove(uri)
            removed.append(uri)
    return removed


# -- reading -----------------------------------------------------------------------------------


class DamagedManifestError(StoreError):
    """A commit manifest that cannot be read or names files outside its run's folders."""


def _read_manifest(uri: str) -> dict | None:
    """The manifest at uri, validated; None when there is none."""
    try:
        doc = json.loads(store.read_bytes(uri))
    except StoreError as exc:
        if "not found" in str(exc):
            return None
        if isinstance(exc, TransientStoreError):
            raise
        raise DamagedManifestError(f"commit manifest {uri} cannot be read: {exc}") from exc
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise DamagedManifestError(f"commit manifest {uri} is not valid JSON: {exc}") from exc
    problem = _manifest_problem(doc, posixpath.basename(uri).removesuffix(".json"))
    if problem:
        raise DamagedManifestError(f"commit manifest {uri} {problem}")
    return doc


def _manifest_problem(doc: Any, run_id: str) -> str | None:
    """Why a manifest cannot be trusted, or None. Every file it names must be a data file in
    its run's partition folders, `TABLE/date=DATE/run_id=RUN/NAME.parquet`: no `..`, no absolute
    path, no other scheme, no other run."""
    if not isinstance(doc, dict):
        return "is not a JSON object"
    if doc.get("format") != MANIFEST_FORMAT:
        return f"has an unknown format {doc.get('format')!r}"
    if doc.get("run_id") != run_id or not _SAFE_ID.match(run_id):
        return f"names run {doc.get('run_id')!r}, not the run of its file name"
    date = doc.get("date")
    if not isinstance(date, str) or not _DATE.match(date):
        return f"has an invalid date {date!r}"
    entries = doc.get("tables")
    if not isinstance(entries, dict):
        return "has no tables"
    for table, entry in entries.items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(table, str) or not _SAFE_ID.match(table) or not isinstance(files, list):
            return f"has an invalid entry for table {table!r}"
        for f in files:
            parts = f.split("/") if isinstance(f, str) else []
            if (
                len(parts) != 4
                or parts[:3] != [table, f"date={date}", f"run_id={run_id}"]
                or not parts[3].endswith(".parquet")
                or parts[3].startswith(".")
                or "\\" in f
                or ":" in f
            ):
                return f"names a file outside its run's folders: {f!r}"
    return None


def _scan_commits(results_uri: str) -> tuple[list[dict], set[str]]:
    """(valid manifests, run ids of damaged ones); each damaged one is logged as a warning."""
    root = store.join(results_uri, COMMITS)
    loc = store.locate(root)
    with store.translate_errors(root, "list"):
        store.refresh_tree(loc)
        names = [str(p) for p in loc.fs.glob(loc.path.rstrip("/") + "/*.json")] if loc.fs.exists(loc.path) else []
    uris = [store.join(loc.uri, posixpath.basename(n)) for n in names if not posixpath.basename(n).startswith(".")]

    def load(uri: str) -> dict | DamagedManifestError | None:
        try:
            return _read_manifest(uri)
        except DamagedManifestError as exc:
            return exc

    good, damaged = [], set()
    with store.ContextThreadPool(8) as pool:  # the caller's s3_credentials
        for uri, m in zip(uris, pool.map(load, uris)):
            if isinstance(m, DamagedManifestError):
                log.warning("skipping run %s: %s", store.basename(uri).removesuffix(".json"), m)
                damaged.add(store.basename(uri).removesuffix(".json"))
            elif m:
                good.append(m)
    return good, damaged


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
        table, date_part, run_part, _ = uri[len(root) :].lstrip("/").split("/")[-4:]
        run_id, date = run_part.removeprefix("run_id="), date_part.removeprefix("date=")
        run = runs.setdefault(
            run_id,
            {
                "format": MANIFEST_FORMAT,
                "run_id": run_id,
                "date": date,
                "audit_name": None,
                "committed_at": None,
                "schema_version": 1,
                "legacy": True,
                "tables": {},
            },
        )
        if table in SCHEMAS:
            run["tables"][table] = {"files": ["/".join([table, date_part, run_part, LEGACY_PART_FILE])], "rows": None}
        if table == "runs":
            committed.add(run_id)
    return [m for rid, m in runs.items() if rid in committed]


def committed_runs(results_uri: str, audit_name: str | None = None) -> list[dict]:
    """The manifests of every committed run, oldest first (version-1 runs included); a damaged
    manifest is skipped with a warning naming it."""
    manifests, _ = _scan_commits(results_uri)
    seen = {m["run_id"] for m in manifests}
    manifests += [m for m in _legacy_manifests(results_uri) if m["run_id"] not in seen]
    if audit_name is not None:
        manifests = [m for m in manifests if manifest_audit_name(results_uri, m) == audit_name]
    return sorted(manifests, key=lambda m: (m.get("committed_at") or "", m["run_id"]))


def manifest_audit_name(results_uri: str, manifest: dict) -> str | None:
    """The audit a committed run belongs to (version-1 runs keep it only in their runs row)."""
    if manifest.get("audit_name") is not None or not manifest.get("legacy"):
        return manifest.get("audit_name")
    runs, _ = _read_files(results_uri, "runs", [manifest])
    names = runs.column("audit_name").to_pylist()
    return names[0] if names else None


def committed_files(
    results_uri: str, table: str, run_id: str | None = None, audit_name: str | None = None
) -> list[str]:
    """URIs of the committed files of a table (one run's, one audit's, or all)."""
    check_table(table)
    return [
        store.join(results_uri, f)
        for m in _select(results_uri, run_id, audit_name)
        for f in m["tables"].get(table, {}).get("files", [])
    ]


def _select(results_uri: str, run_id: str | None, audit_name: str | None) -> list[dict]:
    manifests = committed_runs(results_uri, audit_name)
    return [m for m in manifests if run_id is None or m["run_id"] == run_id]


def _read_file(uri: str) -> tuple[pa.Table, int]:
    table = pq.read_table(io.BytesIO(store.read_bytes(uri)))
    meta = table.schema.metadata or {}
    return table, int(meta.get(b"mergeaudit.schema_version", b"1"))


def _read_files(results_uri: str, table: str, manifests: list[dict]) -> tuple[pa.Table, dict[str, str]]:
    """The rows of a table from these runs, and {run id: problem} of the runs left out because a
    file they name is missing or unreadable."""
    jobs = [(m, store.join(results_uri, f)) for m in manifests for f in m["tables"].get(table, {}).get("files", [])]

    def load(job: tuple[dict, str]) -> pa.Table | str:
        try:
            data, version = _read_file(job[1])
        except TransientStoreError:
            raise
        except (StoreError, pa.ArrowException, OSError, ValueError) as exc:
            return f"{job[1]}: {' '.join(str(exc).split())[:300]}"
        return upgrade(table, data, version)  # a newer schema is not damage: it raises

    with store.ContextThreadPool(8) as pool:  # the caller's s3_credentials
        parts = list(pool.map(load, jobs))
    damaged = {m["run_id"]: p for (m, _), p in zip(jobs, parts) if isinstance(p, str)}
    schema = SCHEMAS[table].append(PARTITION_FIELDS[0]).append(PARTITION_FIELDS[1])
    out = []
    for (manifest, _), data in zip(jobs, parts):
        if manifest["run_id"] in damaged:
            continue
        n = data.num_rows
        data = data.append_column(PARTITION_FIELDS[0], pa.array([manifest["date"]] * n, pa.string()))
        out.append(data.append_column(PARTITION_FIELDS[1], pa.array([manifest["run_id"]] * n, pa.string())))
    return (pa.concat_tables(out) if out else schema.empty_table()), damaged


def read_table(
    results_uri: str,
    table: str,
    run_id: str | None = None,
    audit_name: str | None = None,
    manifests: list[dict] | None = None,
) -> pa.Table:
    """The committed rows of a table (one run's, one audit's, or all), in the current schema,
    with `date` and `run_id` columns. `manifests` (from `committed_runs`) saves listing the
    commits again when reading several tables. A run replaced while being read is read again; a
    run with a missing or unreadable file is left out with a warning naming it."""
    check_table(table)
    for attempt in range(3):
        if manifests is None or attempt:
            manifests = _select(results_uri, run_id, audit_name)
        else:
            manifests = [m for m in manifests if run_id is None or m["run_id"] == run_id]
        data, damaged = _read_files(results_uri, table, manifests)
        if not damaged:
            return data
        if attempt < 2:  # a run rewritten meanwhile has a new manifest: read again
            now = {m["run_id"]: m.get("writer") for m in _select(results_uri, run_id, audit_name)}
            if any(now.get(m["run_id"]) != m.get("writer") for m in manifests if m["run_id"] in damaged):
                continue
        for rid, problem in sorted(damaged.items()):
            log.warning("skipping run %s of table %s: %s", rid, table, problem)
        return data
    raise AssertionError("unreachable")


def connect(results_uri: str, tables: list[str] | None = None, run_id: str | None = None):
    """An in-memory DuckDB connection with one view per committed table (all, or `tables`) and
    nothing else: external access (files, URLs, extensions) is switched off after registering the
    tables, and the configuration locked so that SQL cannot switch it back on."""
    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        for name in tables or list(SCHEMAS):
            con.register(name, read_table(results_uri, name, run_id=run_id))
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def query(results_uri: str, sql: str, run_id: str | None = None) -> pa.Table:
    """Run SQL over the committed tables (each table name is a view; no files, URLs or
    extensions are reachable); returns an Arrow table."""
    import duckdb

    used = [name for name in SCHEMAS if re.search(rf"\b{name}\b", sql)]
    if not used:
        raise ConfigError(f"the query names none of the tables: {', '.join(SCHEMAS)}")
    con = connect(results_uri, used, run_id=run_id)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise ConfigError(f"query failed: {' '.join(str(exc).split())}") from exc
    finally:
        con.close()
