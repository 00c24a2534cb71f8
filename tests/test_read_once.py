"""Each input is read once per worker: the read-through cache is on by default for object
stores, and the run summary counts the bytes read per input (issue 17).

An audit of three merge candidates on the S3 endpoint reads each input about 1.0x its size with
the default settings, and several times its size with `cache: off`; a second audit in the same
cache reads next to nothing from S3; local inputs are read in place, never copied.
"""

from __future__ import annotations

import datetime as dt

from mergeaudit import audit, store
from mergeaudit.checkpoint import reads
from mergeaudit.config import parse_config
from mergeaudit.toy import build_toy_family


def audit_config(family, results_uri: str, **storage) -> dict:
    return {
        "name": "read-once",
        "base": {"name": "base", "uri": family.base},
        "models": [{"name": n, "uri": u, "kind": "rlvr"} for n, u in family.variants.items()],
        "strategies": [{"method": "linear"}, {"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}}],
        "score_inputs": False,  # three merges, each of both inputs
        "evaluation": {"limit": 1, "batch_size": 1},
        "results_uri": results_uri,
        "storage": storage,
    }


def ratios(out: dict) -> dict[str, float]:
    return {name: n / out["input_sizes"][name] for name, n in out["bytes_read"].items()}


def test_reads_are_counted_per_object_ranged_and_whole(s3_bucket, tmp_path):
    data = bytes(range(256)) * 40
    uri, local = s3_bucket + "/obj.bin", str(tmp_path / "obj.bin")
    for u in (uri, local):
        store.write_bytes(u, data)
    fi = store.info(uri)
    before = store.bytes_read()
    assert store.read_range(uri, 8, 108) == data[8:108]
    assert store.read_range(uri, 0, 8, expect=fi) == data[:8]  # the pinned (If-Match) path
    buf = bytearray(50)
    store.read_into(uri, 1000, buf)
    assert store.read_bytes(uri) == data
    store.read_into(local, 10, bytearray(30))
    assert store.bytes_read_since(before) == {uri: 100 + 8 + 50 + len(data), local: 30}
    assert reads.by_checkpoint(store.bytes_read_since(before), [s3_bucket, str(tmp_path), s3_bucket + "/x"]) == {
        s3_bucket: 100 + 8 + 50 + len(data),
        str(tmp_path): 30,
        s3_bucket + "/x": 0,
    }


def run_stages(cfg) -> dict:
    """The flow's stages, chained as flows/merge_audit.py chains them, without Prefect."""
    before = store.bytes_read()
    records = audit.resolve_checkpoints(cfg)
    geometry = audit.compute_geometry(cfg, records)
    cands = audit.plan_candidates(cfg, records)
    evals = [audit.evaluate_to_store(c, cfg.evaluation, cfg.storage, cfg.results_uri) for c in cands]
    return audit.finish_run(
        cfg,
        audit.new_run_id(),
        dt.datetime.now(dt.timezone.utc),
        records,
        geometry,
        cands,
        evals,
        store.bytes_read_since(before),
    ).model_dump()


def test_an_audit_on_s3_reads_each_input_once(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    family = build_toy_family(s3_bucket + "/ckpts", variants={"rl": 0.05})

    cached = run_stages(parse_config(audit_config(family, s3_bucket + "/r1")))  # the defaults
    assert len(cached["summary"]) == 3 and set(cached["bytes_read"]) == {"base", "rl"}
    assert all(1.0 <= r <= 1.1 for r in ratios(cached).values()), ratios(cached)
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 2

    uncached = run_stages(parse_config(audit_config(family, s3_bucket + "/r2", cache="off")))
    assert all(r >= 3 for r in ratios(uncached).values()), ratios(uncached)  # geometry, then each merge

    again = run_stages(parse_config(audit_config(family, s3_bucket + "/r3")))  # evaluated anew, from the cache
    assert all(r <= 0.05 for r in ratios(again).values()), ratios(again)


def test_local_inputs_are_read_in_place(toy_family, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = parse_config(audit_config(toy_family, str(tmp_path / "r")))
    records = audit.resolve_checkpoints(cfg)
    before = store.bytes_read()
    audit.compute_geometry(cfg, records)
    for cand in audit.plan_candidates(cfg, records):
        for _ in audit.candidate_tensors(cand, cfg.storage):
            pass
    assert not (tmp_path / "cache").exists()
    read = reads.input_totals({n: r.uri for n, r in records.items()}, store.bytes_read_since(before))
    assert all(read[n] >= 4 * records[n].nbytes for n in read), read  # geometry, then three merges
