"""Result tables: declared schemas, committed runs only, rewrites, concurrent writers, a killed
writer, older schema versions, and DuckDB queries over what is committed."""

from __future__ import annotations

import io
import multiprocessing
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergeaudit import store, tables
from mergeaudit.errors import ConfigError, MergeAuditError, SchemaError

SCORES = [
    {
        "candidate_id": "c1",
        "task": "t",
        "metric": "exact_match",
        "filter": "none",
        "value": 0.5,
        "stderr": 0.1,
        "n": 20,
    },
    {
        "candidate_id": "c2",
        "task": "t",
        "metric": "exact_match",
        "filter": "none",
        "value": 0.25,
        "stderr": None,
        "n": 20,
    },
]


def run_tables(n_scores: int = 2, name: str = "nightly") -> dict[str, list[dict]]:
    return {
        "scores": (SCORES * n_scores)[:n_scores],
        "candidates": [{"candidate_id": "c1", "name": "ties(a+b)", "kind": "merge", "status": "ok"}],
        "runs": [{"audit_name": name, "status": "completed"}],
    }


def test_write_and_read_back(store_root):
    uri = tables.write_table(store_root, "scores", "r1", "2026-11-27", SCORES)
    assert "scores/date=2026-11-27/run_id=r1/part-" in uri and uri.endswith(".parquet")
    got = tables.read_table(store_root, "scores")
    assert got.num_rows == 2
    assert set(got.column("run_id").to_pylist()) == {"r1"}
    assert got.column("stderr").to_pylist() == [0.1, None]
    meta = pq.read_schema(io.BytesIO(store.read_bytes(uri))).metadata
    assert meta[b"mergeaudit.schema_version"] == str(tables.SCHEMA_VERSION).encode()
    assert meta[b"mergeaudit.table"] == b"scores" and meta[b"mergeaudit.run_id"] == b"r1"


def test_rewriting_a_run_replaces_it_even_on_another_date(store_root):
    tables.write_run(store_root, "r1", "2026-11-27", run_tables(2))
    tables.write_run(store_root, "r1", "2026-11-28", run_tables(1))
    got = tables.read_table(store_root, "scores")
    assert got.num_rows == 1 and got.column("date").to_pylist() == ["2026-11-28"]
    assert len(tables.committed_runs(store_root)) == 1
    loc = store.locate(store_root)
    files = [p for p in loc.fs.find(loc.path) if p.endswith(".parquet")]
    assert len(files) == 3, files  # the replaced version's files are gone


@pytest.mark.integration
def test_a_writer_killed_mid_run_leaves_no_visible_rows(tmp_path):
    root = str(tmp_path / "results")
    tables.write_run(root, "r0", "2026-11-26", run_tables(2))
    code = textwrap.dedent(f"""
        import os, signal
        from mergeaudit import store, tables
        real = store.write_bytes
        def dying(uri, data):
            if "/_commits/" in uri:          # every data file is written: die before the commit
                os.kill(os.getpid(), signal.SIGKILL)
            real(uri, data)
        store.write_bytes = dying
        tables.write_run({root!r}, "r1", "2026-11-27", {run_tables(2)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert store.exists(root + "/scores/date=2026-11-27/run_id=r1")  # it did write data files...
    for table in ("scores", "candidates", "runs"):  # ...that nobody sees
        assert set(tables.read_table(root, table).column("run_id").to_pylist()) == {"r0"}
    assert [m["run_id"] for m in tables.committed_runs(root)] == ["r0"]
    assert tables.query(root, "select count(*) as n from scores").column("n").to_pylist() == [2]
    removed = tables.vacuum(root, older_than_s=0)
    assert len(removed) == 3 and all("run_id=r1" in u for u in removed)
    assert tables.read_table(root, "scores").num_rows == 2


def _write_runs(args: tuple[str, int]) -> None:
    root, worker = args
    for k in range(3):
        tables.write_run(root, f"w{worker}-r{k}", "2026-11-27", run_tables(worker + 1, name=f"audit{worker}"))


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_concurrent_writers_lose_nothing(backend, tmp_path, request):
    root = str(tmp_path / "results") if backend == "local" else request.getfixturevalue("s3_bucket") + "/results"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_write_runs, [(root, w) for w in range(4)])
    runs = tables.committed_runs(root)
    assert len(runs) == 12
    scores = tables.read_table(root, "scores")
    assert scores.num_rows == 3 * (1 + 2 + 3 + 4)
    assert {r["run_id"] for r in tables.read_table(root, "runs", audit_name="audit2").to_pylist()} == {
        "w2-r0",
        "w2-r1",
        "w2-r2",
    }


def test_older_schema_versions_are_read_and_upgraded(tmp_path):
    """A version-1 results folder (part-0.parquet files, no manifests, fewer columns) reads
    next to a version-2 run; a v1 run without its `runs` file was never committed."""
    root = str(tmp_path / "results")
    v1_scores = pa.schema(
        [
            ("candidate_id", pa.string()),
            ("task", pa.string()),
            ("metric", pa.string()),
            ("filter", pa.string()),
            ("value", pa.float64()),
            ("stderr", pa.float64()),
            ("n", pa.int64()),
        ]
    )
    v1_runs = pa.schema([("audit_name", pa.string()), ("status", pa.string())])

    def put(table: str, run: str, schema: pa.Schema, rows: list[dict]) -> None:
        data = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
            {b"mergeaudit.schema_version": b"1", b"mergeaudit.table": table.encode()}
        )
        buf = io.BytesIO()
        pq.write_table(data, buf)
        store.write_bytes(f"{root}/{table}/date=2026-11-01/run_id={run}/part-0.parquet", buf.getvalue())

    put("scores", "old1", v1_scores, SCORES)
    put("runs", "old1", v1_runs, [{"audit_name": "nightly", "status": "completed"}])
    put("scores", "old2", v1_scores, SCORES)  # a v1 writer died before its runs row: not committed
    tables.write_run(root, "new1", "2026-11-27", run_tables(1))
    scores = tables.read_table(root, "scores")
    assert sorted(scores.column("run_id").to_pylist()) == ["new1", "old1", "old1"]
    assert scores.schema.names[: len(tables.SCHEMAS["scores"])] == tables.SCHEMAS["scores"].names
    assert scores.filter(pa.compute.equal(scores["run_id"], "old1")).column("method").null_count == 2
    assert [m["run_id"] for m in tables.committed_runs(root, audit_name="nightly")] == ["old1", "new1"]
    tables.write_run(root, "old1", "2026-11-01", run_tables(1))  # rewriting a v1 run replaces it
    assert not store.exists(f"{root}/scores/date=2026-11-01/run_id=old1/part-0.parquet")
    assert tables.read_table(root, "scores", run_id="old1").num_rows == 1


def test_newer_schema_versions_are_refused(tmp_path):
    data = tables.to_arrow("scores", SCORES)
    with pytest.raises(Exception, match="newer than this mergeaudit"):
        tables.upgrade("scores", data, tables.SCHEMA_VERSION + 1)


def test_query_joins_committed_tables(store_root):
    tables.write_run(store_root, "r1", "2026-11-27", run_tables(2))
    got = tables.query(
        store_root,
        "select c.name, count(*) as n from scores s join candidates c using (run_id, candidate_id) group by c.name",
    )
    assert got.to_pylist() == [{"name": "ties(a+b)", "n": 1}]
    with pytest.raises(ConfigError, match="names none of the tables"):
        tables.query(store_root, "select 1")
    with pytest.raises(ConfigError, match="query failed"):
        tables.query(store_root, "select nope from scores")


def test_bad_rows_and_ids_fail_before_anything_is_written(tmp_path):
    root = str(tmp_path / "r")
    with pytest.raises(SchemaError, match="not in the schema: bogus"):
        tables.write_run(root, "r1", "2026-11-27", {"scores": SCORES, "runs": [{"bogus": 1}]})
    with pytest.raises(SchemaError, match="unknown table"):
        tables.to_arrow("nope", [])
    with pytest.raises(SchemaError, match="table scores: .*int64"):
        tables.write_run(root, "r1", "2026-11-27", {"scores": [{**SCORES[0], "n": "eight"}]})
    with pytest.raises(ConfigError, match="run id"):
        tables.write_run(root, "../x", "2026-11-27", {"scores": SCORES})
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        tables.write_run(root, "r1", "27.11.2026", {"scores": SCORES})
    assert not store.exists(root)


def test_a_schema_violation_is_our_bug_not_the_users(tmp_path, monkeypatch, capsys):
    """Rows that do not fit the schema come from our code: not a MergeAuditError, so the CLI
    does not blame the user with a one-line error and exit status 2, and shows the traceback."""
    from mergeaudit import cli

    assert not issubclass(SchemaError, MergeAuditError)
    with pytest.raises(ConfigError, match="unknown table"):  # a table the user names is theirs
        tables.read_table(str(tmp_path), "nope")
    monkeypatch.setattr(tables, "query", lambda *a, **k: tables.to_arrow("scores", [{"n": "eight"}]))
    with pytest.raises(SchemaError):
        cli.main(["query", str(tmp_path), "select 1"])
    assert "mergeaudit: error" not in capsys.readouterr().err


def test_reading_a_missing_table_gives_an_empty_one(tmp_path):
    assert tables.read_table(str(tmp_path), "runs").num_rows == 0
    assert tables.committed_runs(str(tmp_path)) == []


# -- a damaged store still answers ---------------------------------------------------------------


def _manifest_path(root: str, run_id: str) -> str:
    return tables.manifest_uri(root, run_id)


def _edit_manifest(root: str, run_id: str, edit) -> None:
    import json

    doc = json.loads(store.read_bytes(_manifest_path(root, run_id)))
    edit(doc)
    store.write_bytes(_manifest_path(root, run_id), json.dumps(doc).encode())


def _two_runs(root: str) -> None:
    tables.write_run(root, "r0", "2026-11-26", run_tables(2))
    tables.write_run(root, "r1", "2026-11-27", run_tables(1))


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize(
    "bad",
    [
        "../precious.parquet",
        "{abs}",
        "s3://elsewhere/x.parquet",
        "scores/date=2026-11-26/run_id=r0/{r0file}",
        "scores/date=2026-11-27/run_id=r1/../../../../precious.parquet",
    ],
)
def test_a_manifest_naming_files_outside_its_run_is_never_followed(tmp_path, caplog, bad):
    root = str(tmp_path / "results")
    _two_runs(root)
    precious = tmp_path / "precious.parquet"
    r0file = tables.committed_files(root, "scores", run_id="r0")[0]
    precious.write_bytes(store.read_bytes(r0file))  # a valid scores file, even
    bad = bad.format(abs=str(precious), r0file=r0file.rsplit("/", 1)[1])
    _edit_manifest(root, "r1", lambda d: d["tables"]["scores"].update(files=[bad]))
    with caplog.at_level("WARNING", logger="mergeaudit.tables"):
        assert tables.read_table(root, "scores").column("run_id").to_pylist() == ["r0", "r0"]
    assert "r1" in _warnings(caplog) and "outside its run's folders" in _warnings(caplog)
    tables.write_run(root, "r1", "2026-11-27", run_tables(1))  # rewriting the run deletes nothing it names
    tables.vacuum(root, older_than_s=0)
    assert precious.exists() and store.exists(r0file)
    assert sorted(tables.read_table(root, "scores").column("run_id").to_pylist()) == ["r0", "r0", "r1"]


@pytest.mark.parametrize("damage", ["truncated", "not json", "stray list", "empty", "other format", "other run"])
def test_a_damaged_commit_is_skipped_and_every_other_run_answers(store_root, caplog, damage):
    from mergeaudit import report

    _two_runs(store_root)
    uri = _manifest_path(store_root, "r1")
    if damage == "truncated":
        store.write_bytes(uri, store.read_bytes(uri)[:40])
    elif damage == "not json":
        store.write_bytes(store.join(store_root, "_commits", "notes.json"), b"\xff\xfe hello")
    elif damage == "stray list":
        store.write_bytes(store.join(store_root, "_commits", "x.json"), b"[1, 2]")
    elif damage == "empty":
        store.write_bytes(uri, b"")
    elif damage == "other format":
        _edit_manifest(store_root, "r1", lambda d: d.update(format="someone-else/9"))
    else:
        _edit_manifest(store_root, "r1", lambda d: d.update(run_id="r0"))
    survivors = ["r0", "r1"] if damage in ("not json", "stray list") else ["r0"]
    with caplog.at_level("WARNING", logger="mergeaudit.tables"):
        assert [m["run_id"] for m in tables.committed_runs(store_root)] == survivors
        for table in ("scores", "candidates", "runs"):
            assert set(tables.read_table(store_root, table).column("run_id").to_pylist()) == set(survivors)
        assert tables.query(store_root, "select count(*) as n from candidates").column("n").to_pylist() == [
            len(survivors)
        ]
        assert report.load_run(store_root, "r0").run_id == "r0"
    assert "skipping run" in _warnings(caplog)
    tables.vacuum(store_root, older_than_s=0)  # a damaged run's files are kept for recovery
    assert len(tables.committed_files(store_root, "scores")) == len(survivors)
    assert store.exists(store.join(store_root, "scores", "date=2026-11-27", "run_id=r1"))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_missing_or_broken_data_file_skips_its_run(store_root, caplog, damage):
    from mergeaudit import report

    _two_runs(store_root)
    (lost,) = tables.committed_files(store_root, "scores", run_id="r1")
    if damage == "deleted":
        store.remove(lost)
    else:
        store.write_bytes(lost, store.read_bytes(lost)[:30])
    with caplog.at_level("WARNING", logger="mergeaudit.tables"):
        assert tables.read_table(store_root, "scores").column("run_id").to_pylist() == ["r0", "r0"]
        assert tables.query(store_root, "select count(*) as n from scores").column("n").to_pylist() == [2]
        assert tables.read_table(store_root, "candidates").num_rows == 2
        assert report.load_run(store_root, "r0").run_id == "r0"
    assert "r1" in _warnings(caplog) and store.basename(lost) in _warnings(caplog)


def test_vacuum_removes_temporary_files_of_killed_writers_and_nothing_else(tmp_path):
    root = str(tmp_path / "results")
    _two_runs(root)
    part = tmp_path / "results" / "scores" / "date=2026-11-27" / "run_id=r2"
    part.mkdir(parents=True)
    leftovers = [
        part / ".part-0123456789ab.parquet.tmp-0123456789ab",
        tmp_path / "results" / "_commits" / ".r2.json.tmp-ba9876543210",
    ]
    for f in leftovers:
        f.write_bytes(b"half written")
    mine = [
        tmp_path / "results" / "README.md",
        tmp_path / "results" / "scores" / "notes.txt",
        tmp_path / "results" / "_commits" / "keep.txt",
    ]
    for f in mine:
        f.write_text("not mergeaudit's")
    assert tables.vacuum(root, older_than_s=3600) == []  # a write in progress survives
    removed = tables.vacuum(root, older_than_s=0)
    assert sorted(removed) == sorted(str(f) for f in leftovers)
    assert all(f.exists() for f in mine) and not any(f.exists() for f in leftovers)
    assert tables.read_table(root, "scores").num_rows == 3


@pytest.mark.parametrize(
    "sql",
    [
        "select * from scores, read_csv('/etc/passwd')",
        "select * from read_parquet('{root}/scores/*/*/*.parquet')",
        "copy scores to '{root}/../exfil.csv'",
        "set lock_configuration = false",
        "attach '{root}/../x.db' as x; select * from scores",
        "select * from scores, read_text('/etc/hostname')",
    ],
)
def test_query_reaches_only_the_registered_tables(tmp_path, sql):
    root = str(tmp_path / "results")
    _two_runs(root)
    with pytest.raises(ConfigError, match="query failed"):
        tables.query(root, sql.format(root=root) + (" -- scores" if "scores" not in sql else ""))
    assert not (tmp_path / "exfil.csv").exists() and not (tmp_path / "x.db").exists()
    assert tables.query(root, "select count(*) as n from scores").column("n").to_pylist() == [3]


def test_v2_probe_settings_in_filter_become_columns():
    rows = [
        {"candidate_id": "p", "task": "t", "metric": "score_drop", "filter": "gaussian@0.1", "value": 0.3},
        {"candidate_id": "c", "task": "t", "metric": "exact_match", "filter": "strict-match", "value": 0.5},
    ]
    v2 = pa.Table.from_pylist(rows)
    up = tables.upgrade("scores", v2, 2).to_pylist()
    assert [(r["filter"], r["probe_family"], r["probe_x"]) for r in up] == [
        ("probe", "gaussian", 0.1),
        ("strict-match", None, None),
    ]
    assert tables.upgrade("scores", tables.to_arrow("scores", rows), 3).column("probe_family").null_count == 2
