"""Result tables: declared schemas, Hive partitions readable by pyarrow and DuckDB, rewrites."""

from __future__ import annotations

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mergeaudit import store, tables
from mergeaudit.errors import ConfigError

SCORES = [
    {"candidate_id": "c1", "task": "t", "metric": "exact_match", "filter": "none", "value": 0.5, "stderr": 0.1, "n": 20},
    {"candidate_id": "c2", "task": "t", "metric": "exact_match", "filter": "none", "value": 0.25, "stderr": None, "n": 20},
]


def test_write_and_read_back(store_root):
    uri = tables.write_table(store_root, "scores", "r1", "2026-11-27", SCORES)
    assert uri.endswith("scores/date=2026-11-27/run_id=r1/part-0.parquet")
    got = tables.read_table(store_root, "scores")
    assert got.num_rows == 2
    assert set(got.column("run_id").to_pylist()) == {"r1"}
    assert got.column("stderr").to_pylist() == [0.1, None]


def test_plain_pyarrow_and_duckdb_read_the_layout(tmp_path):
    import duckdb

    root = str(tmp_path / "results")
    tables.write_table(root, "scores", "r1", "2026-11-27", SCORES)
    tables.write_table(root, "scores", "r2", "2026-11-28", SCORES[:1])
    table = ds.dataset(root + "/scores", partitioning="hive").to_table()
    assert table.num_rows == 3 and set(table.column("run_id").to_pylist()) == {"r1", "r2"}
    n = duckdb.sql(
        f"select count(*) from read_parquet('{root}/scores/*/*/*.parquet', hive_partitioning=true) where run_id = 'r2'"
    ).fetchall()[0][0]
    assert n == 1


def test_rewriting_a_run_replaces_it_even_on_another_date(store_root):
    tables.write_table(store_root, "scores", "r1", "2026-11-27", SCORES)
    tables.write_table(store_root, "scores", "r1", "2026-11-28", SCORES[:1])
    got = tables.read_table(store_root, "scores")
    assert got.num_rows == 1 and got.column("date").to_pylist() == ["2026-11-28"]


def test_files_carry_the_schema_version(tmp_path):
    uri = tables.write_table(str(tmp_path), "scores", "r1", "2026-11-27", SCORES)
    meta = pq.read_schema(uri).metadata
    assert meta[b"mergeaudit.schema_version"] == str(tables.SCHEMA_VERSION).encode()
    assert meta[b"mergeaudit.table"] == b"scores"


def test_unknown_columns_and_tables_fail():
    with pytest.raises(ConfigError, match="not in the schema: bogus"):
        tables.to_arrow("scores", [{"bogus": 1}])
    with pytest.raises(ConfigError, match="unknown table"):
        tables.to_arrow("nope", [])


def test_reading_a_missing_table_gives_an_empty_one(tmp_path):
    assert tables.read_table(str(tmp_path), "runs").num_rows == 0
    assert not store.exists(str(tmp_path / "runs"))
