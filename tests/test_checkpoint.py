"""Checkpoint I/O: validated headers, prefetched streaming, sharded atomic writes, discovery,
the read-through cache and opt-in pickle conversion. Storage cases run on a local folder and
on the S3 endpoint (`store_root`)."""

from __future__ import annotations

import json
import struct
import threading

import pytest
import torch

from mergeaudit import store
from mergeaudit.checkpoint import (
    Checkpoint,
    CheckpointCache,
    check_compatible,
    discover,
    parse_header,
    serialize_safetensors,
    write_checkpoint,
)
from mergeaudit.checkpoint import format as st_format
from mergeaudit.checkpoint import reader as ck_reader
from mergeaudit.checkpoint.convert import convert_pickled
from mergeaudit.errors import CheckpointError, ShapeMismatchError

CFG = {"model_type": "llama"}


def make_ckpt(root: str, tensors: dict[str, torch.Tensor], name: str = "ck", **kw) -> str:
    return write_checkpoint(store.join(root, name), tensors.items(), config=kw.pop("config", CFG), **kw)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(16, generator=g),
        "c.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "d.empty": torch.zeros(0, 4),
    }


def many_tensors(n: int = 7, size: int = 64) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((size,), float(i)) for i in range(n)}


# -- reading -----------------------------------------------------------------------------------


def test_roundtrip_single_file(store_root):
    tensors = sample_tensors()
    ck = Checkpoint.open(make_ckpt(store_root, tensors))
    assert ck.keys() == list(tensors)
    for name, t in ck.iter_tensors():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name])
    assert ck.spec("a.weight").shape == (4, 8)
    assert len(ck.fingerprint) == 32


def test_sharded_write_and_read(store_root):
    tensors = many_tensors()
    uri = make_ckpt(store_root, tensors, max_shard_bytes=600)
    files = store.list_files(uri)
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in files
    ck = Checkpoint.open(uri)
    assert {n: t[0].item() for n, t in ck.iter_tensors()} == {n: float(i) for i, n in enumerate(tensors)}


def test_concurrent_reads_agree(store_root):
    tensors = {f"t{i}": torch.randn(257, generator=torch.Generator().manual_seed(i)) for i in range(24)}
    ck = Checkpoint.open(make_ckpt(store_root, tensors, max_shard_bytes=4096))
    outcomes: list[list[tuple[str, torch.Tensor]] | BaseException] = [[] for _ in range(4)]

    def worker(i: int) -> None:
        try:
            names = list(tensors)[i::2] + list(tensors)
            outcomes[i] = list(ck.iter_tensors(names, window_bytes=3000, max_requests=4))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcomes[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, got in enumerate(outcomes):
        assert not isinstance(got, BaseException), got
        assert [n for n, _ in got] == list(tensors)[i::2] + list(tensors)
        assert all(torch.equal(t, tensors[n]) for n, t in got)


def test_prefetch_keeps_reads_in_order_and_within_the_window(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(20)}  # 1000 bytes each
    ck = Checkpoint.open(make_ckpt(str(tmp_path), tensors))
    lock, state = threading.Lock(), {"now": 0, "peak": 0}
    real = st_format.read_tensor

    def counting(spec):
        with lock:
            state["now"] += spec.nbytes
            state["peak"] = max(state["peak"], state["now"])
        return real(spec)

    monkeypatch.setattr(ck_reader, "read_tensor", counting)
    seen = []
    for name, t in ck.iter_tensors(window_bytes=3500, max_requests=8):
        seen.append(name)
        assert t[0].item() == float(name[1:])
        with lock:
            state["now"] -= t.numel() * 4
    assert seen == list(tensors)
    assert 2000 <= state["peak"] <= 3500
    # one tensor larger than the window is still read, alone
    assert [n for n, _ in ck.iter_tensors(window_bytes=10)] == list(tensors)


# -- validation --------------------------------------------------------------------------------


def test_missing_shard_is_incomplete(store_root):
    uri = make_ckpt(store_root, many_tensors(4), max_shard_bytes=300)
    store.remove(store.join(uri, "model-00002.safetensors"))
    with pytest.raises(CheckpointError, match="missing shards model-00002.safetensors"):
        Checkpoint.open(uri)


def test_shards_without_index_are_incomplete(store_root):
    uri = make_ckpt(store_root, many_tensors(4), max_shard_bytes=300)
    store.remove(store.join(uri, "model.safetensors.index.json"))
    with pytest.raises(CheckpointError, match="incomplete: shards without model.safetensors.index.json"):
        Checkpoint.open(uri)


@pytest.mark.parametrize("cut", [10, 1, -1])
def test_truncated_or_padded_file_is_refused(store_root, cut):
    uri = make_ckpt(store_root, sample_tensors())
    blob = store.read_bytes(store.join(uri, "model.safetensors"))
    store.write_bytes(store.join(uri, "model.safetensors"), blob[:-cut] if cut > 0 else blob + b"\0" * 8)
    with pytest.raises(CheckpointError, match="outside the data area|file has"):
        Checkpoint.open(uri)


def _write_raw(root: str, header: dict | bytes, data: bytes = b"", length: int | None = None) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    uri = store.join(root, "raw.safetensors")
    store.write_bytes(uri, struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return uri


HOSTILE = [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**40, "header length"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 0, "header length 0"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"\xff\xfe\x00garbage", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "tensor 'x' has dtype 'I64'"),
    ({"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 8, None, "outside the data area"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
    (
        {
            "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
        None,
        "overlap",
    ),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "invalid shape"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, b"\0" * 4, None, "invalid data_offsets"),
    ({"x": [1, 2, 3]}, b"", None, "entry is not an object"),
]


@pytest.mark.parametrize("header,data,length,match", HOSTILE)
def test_hostile_headers(store_root, header, data, length, match):
    uri = _write_raw(store_root, header, data, length)
    with pytest.raises(CheckpointError, match=match):
        parse_header(uri, store.info(uri).size)


def test_hostile_header_requests_nothing_beyond_the_file(tmp_path, monkeypatch):
    uri = _write_raw(str(tmp_path), {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**40)
    asked = []
    real = store.read_range
    monkeypatch.setattr(store, "read_range", lambda u, s, e, **kw: asked.append((s, e)) or real(u, s, e, **kw))
    with pytest.raises(CheckpointError):
        parse_header(uri, store.info(uri).size)
    assert asked == [(0, 8)]


def test_pickle_only_checkpoint_is_refused(store_root):
    root = store.join(store_root, "pk")
    store.write_bytes(store.join(root, "config.json"), b"{}")
    store.write_bytes(store.join(root, "pytorch_model.bin"), b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles.*mergeaudit convert SRC OUT --allow-pickle"):
        Checkpoint.open(root)


def test_missing_checkpoint(store_root):
    with pytest.raises(CheckpointError, match="does not exist|cannot be listed"):
        Checkpoint.open(store.join(store_root, "absent"))


def test_compatibility_reports_every_mismatch_at_once(store_root):
    base = Checkpoint.open(
        make_ckpt(
            store_root,
            {"model.embed_tokens.weight": torch.zeros(10, 4), "x": torch.zeros(3), "y": torch.zeros(2)},
            name="a",
        )
    )
    other = Checkpoint.open(
        make_ckpt(
            store_root,
            {"model.embed_tokens.weight": torch.zeros(12, 4), "x": torch.zeros(4), "z": torch.zeros(2)},
            name="b",
        )
    )
    with pytest.raises(ShapeMismatchError) as info:
        check_compatible(base, [other])
    msg = str(info.value)
    assert "4 problems" in msg and "vocabulary size differs (12 vs 10)" in msg
    assert "lacks y" in msg and "extra tensor z" in msg and "x: shape [4] vs base [3]" in msg


def test_tied_embeddings(tmp_path):
    emb = {"model.embed_tokens.weight": torch.ones(10, 4)}
    tied_cfg = {**CFG, "tie_word_embeddings": True}
    tied = Checkpoint.open(make_ckpt(str(tmp_path), emb, name="tied", config=tied_cfg))
    tied2 = Checkpoint.open(make_ckpt(str(tmp_path), emb, name="tied2", config=tied_cfg))
    untied = Checkpoint.open(make_ckpt(str(tmp_path), {**emb, "lm_head.weight": torch.ones(10, 4)}, name="untied"))
    assert tied.tied_embeddings and not untied.tied_embeddings
    check_compatible(tied, [tied2])
    with pytest.raises(
        ShapeMismatchError, match="lm_head.weight: tied to the embeddings in .*tied but stored in .*untied"
    ):
        check_compatible(tied, [untied])


# -- writing and publishing ---------------------------------------------------------------------


class Crash(Exception):
    pass


def crashing(tensors, after: int):
    for i, item in enumerate(tensors.items()):
        if i == after:
            raise Crash()
        yield item


@pytest.mark.parametrize("after", [0, 2, 5])
def test_crash_during_publish_leaves_nothing_complete(store_root, after):
    with pytest.raises(Crash):
        write_checkpoint(
            store.join(store_root, "out"), crashing(many_tensors(7), after), config=CFG, max_shard_bytes=600
        )
    assert not [s for s in discover(store_root) if s.complete]


@pytest.mark.parametrize("fail_on", range(1, 6))
def test_failing_store_writes_never_publish(store_root, monkeypatch, fail_on):
    calls = {"n": 0}
    real_open, real_write = store.open_write, store.write_bytes

    def counted(fn):
        def wrapper(*a, **k):
            calls["n"] += 1
            if calls["n"] == fail_on:
                raise OSError("injected store failure")
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(store, "open_write", counted(real_open))
    monkeypatch.setattr(store, "write_bytes", counted(real_write))
    try:
        write_checkpoint(store.join(store_root, "out"), many_tensors(7).items(), config=CFG, max_shard_bytes=600)
    except OSError:
        assert not [s for s in discover(store_root) if s.complete]
    else:
        pytest.fail("the injected failure did not happen")


def test_republish_replaces_the_old_checkpoint(store_root):
    uri = make_ckpt(store_root, many_tensors(7), max_shard_bytes=600)
    make_ckpt(store_root, {"only": torch.ones(3)}, overwrite=True)
    ck = Checkpoint.open(uri)
    assert ck.keys() == ["only"]
    # one file; on S3 a replacement is a fresh shard behind an index (the index PUT is the swap)
    assert len([n for n in store.list_files(uri) if n.endswith(".safetensors")]) == 1


def test_local_crash_while_replacing_keeps_the_old_checkpoint(tmp_path):
    uri = make_ckpt(str(tmp_path), many_tensors(3))
    with pytest.raises(Crash):
        write_checkpoint(uri, crashing(many_tensors(7), 4), config=CFG, max_shard_bytes=600, overwrite=True)
    assert [s.uri for s in discover(str(tmp_path)) if s.complete] == [uri]
    assert Checkpoint.open(uri).keys() == ["t0", "t1", "t2"]


def test_writer_copies_config_and_tokenizer_and_records_dtype(toy_family, store_root):
    src = Checkpoint.open(toy_family.base)
    uri = write_checkpoint(store.join(store_root, "copy"), src.iter_tensors(), source=src, dtype=torch.float16)
    out = Checkpoint.open(uri)
    assert "tokenizer.json" in out.files and out.config["dtype"] == "float16"
    assert {out.spec(n).dtype for n in out.keys()} == {"F16"}


def test_completion_marker(store_root):
    uri = make_ckpt(store_root, many_tensors(3), marker="_COMPLETE")
    assert [s.complete for s in discover(store_root, marker="_COMPLETE")] == [True]
    store.remove(store.join(uri, "_COMPLETE"))
    (status,) = discover(store_root, marker="_COMPLETE")
    assert not status.complete and "marker" in status.problem


def test_discovery_lists_nested_checkpoints_with_their_state(store_root):
    good = make_ckpt(store_root, many_tensors(2), name="run1/step-100")
    bad = make_ckpt(store_root, many_tensors(4), name="run1/step-200", max_shard_bytes=300)
    store.remove(store.join(bad, "model-00001.safetensors"))
    found = {s.uri: s for s in discover(store_root)}
    assert set(found) == {good, bad}
    assert found[good].complete and found[good].fingerprint == Checkpoint.open(good).fingerprint
    assert not found[bad].complete and "missing shards" in found[bad].problem


def test_written_checkpoint_loads_in_transformers(toy_family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_family.variants["ft_a"])
    ck = Checkpoint.open(toy_family.variants["ft_a"])
    assert torch.equal(model.state_dict()["model.norm.weight"], ck.get("model.norm.weight"))


def test_sharded_checkpoint_loads_in_transformers(toy_family, tmp_path):
    from transformers import AutoModelForCausalLM

    src = Checkpoint.open(toy_family.base)
    uri = write_checkpoint(str(tmp_path / "sharded"), src.iter_tensors(), source=src, max_shard_bytes=40_000)
    assert len([n for n in store.list_files(uri) if n.endswith(".safetensors")]) >= 3
    model = AutoModelForCausalLM.from_pretrained(uri)
    for name, t in src.iter_tensors():
        assert torch.equal(model.state_dict()[name], t)


def test_serializer_matches_the_safetensors_library():
    from safetensors.torch import load

    tensors = sample_tensors()
    loaded = load(serialize_safetensors(tensors, {"format": "pt"}))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_writer_refuses_unsupported_dtypes_and_duplicates(tmp_path):
    with pytest.raises(CheckpointError, match="dtype torch.int64"):
        write_checkpoint(str(tmp_path / "x"), [("i", torch.ones(2, dtype=torch.int64))], config=CFG)
    with pytest.raises(CheckpointError, match="written twice"):
        write_checkpoint(str(tmp_path / "y"), [("a", torch.ones(2)), ("a", torch.ones(2))], config=CFG)
    assert not discover(str(tmp_path))


# -- cache ---------------------------------------------------------------------------------------


def test_read_through_cache(s3_bucket, tmp_path, monkeypatch):
    uri = make_ckpt(s3_bucket, many_tensors(5), max_shard_bytes=600)
    cache = CheckpointCache(tmp_path / "cache", max_bytes=10**6)
    first = Checkpoint.open(uri, cache=cache)
    assert first.uri == uri and first.fingerprint == Checkpoint.open(uri).fingerprint
    read_from = []
    real = store.read_into

    def spy(u, start, buf, **kw):
        read_from.append(u)
        return real(u, start, buf, **kw)

    monkeypatch.setattr(store, "read_into", spy)
    second = Checkpoint.open(uri, cache=cache)
    assert {n: t[0].item() for n, t in second.iter_tensors()} == {f"t{i}": float(i) for i in range(5)}
    assert read_from and not [u for u in read_from if u.startswith("s3://")], "cached bytes come from local disk"
    # a changed file changes the fingerprint: the stale copy is not served
    make_ckpt(s3_bucket, {"t0": torch.full((64,), 9.0)}, overwrite=True)
    assert Checkpoint.open(uri, cache=cache).get("t0")[0].item() == 9.0
    assert len(cache.entries()) == 2


def test_cache_evicts_least_recently_used(s3_bucket, tmp_path):
    from mergeaudit.checkpoint.cache import touch_seconds_ago

    a = make_ckpt(s3_bucket, many_tensors(3, 1000), name="a")
    b = make_ckpt(s3_bucket, many_tensors(3, 1000), name="b")
    size = sum(f.size for f in store.list_files(a).values())
    cache = CheckpointCache(tmp_path / "cache", max_bytes=int(size * 1.5))
    Checkpoint.open(a, cache=cache)
    touch_seconds_ago(cache.entries()[0][0], 60)
    Checkpoint.open(b, cache=cache)
    (only,) = cache.entries()
    assert only[0].name == Checkpoint.open(b).fingerprint
    tiny = CheckpointCache(tmp_path / "tiny", max_bytes=10)
    assert Checkpoint.open(a, cache=tiny).get("t1")[0].item() == 1.0 and not tiny.entries()


# -- pickle conversion ---------------------------------------------------------------------------


def test_convert_pickled_weights_only_on_request(store_root, tmp_path):
    import io

    src = store.join(store_root, "legacy")
    buf = io.BytesIO()
    emb = torch.randn(10, 4)
    torch.save({"model.embed_tokens.weight": emb, "lm_head.weight": emb}, buf)  # shared storage
    store.write_bytes(store.join(src, "pytorch_model.bin"), buf.getvalue())
    store.write_bytes(store.join(src, "config.json"), json.dumps(CFG).encode())
    with pytest.raises(CheckpointError, match="explicit opt-in"):
        convert_pickled(src, store.join(store_root, "conv"))
    out = Checkpoint.open(convert_pickled(src, store.join(store_root, "conv"), allow_pickle=True))
    assert torch.equal(out.get("lm_head.weight"), emb) and out.config == CFG


def test_convert_refuses_code_in_pickles(tmp_path):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_pickled(str(src), str(tmp_path / "out"), allow_pickle=True)
    assert not marker.exists()
    assert not discover(str(tmp_path / "out"))


def test_large_tensors_are_private_copies_of_the_file(store_root):
    big = torch.randn(700, 1024, generator=torch.Generator().manual_seed(3))  # 2.8 MB: mapped locally
    uri = make_ckpt(store_root, {"big": big, "small": torch.ones(4)})
    ck = Checkpoint.open(uri)
    got = ck.get("big")
    assert torch.equal(got, big)
    got.mul_(0)  # writing to a tensor never writes to the checkpoint
    assert torch.equal(Checkpoint.open(uri).get("big"), big)


def test_file_shrunk_after_open_is_an_error_not_a_crash(tmp_path):
    uri = make_ckpt(str(tmp_path), {"big": torch.ones(700, 1024)})
    ck = Checkpoint.open(uri)
    path = tmp_path / "ck" / "model.safetensors"
    with open(path, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(CheckpointError, match="changed while being read"):
        ck.get("big")


def other_tensors() -> dict[str, torch.Tensor]:
    """Same names and sizes as many_tensors(3, 1000), other bytes (so another fingerprint)."""
    return {f"t{i}": torch.full((1000,), 10.0 + i) for i in range(3)}


def test_cache_never_touches_folders_it_did_not_create(s3_bucket, tmp_path):
    from mergeaudit.checkpoint.cache import touch_seconds_ago

    a = make_ckpt(s3_bucket, many_tensors(3, 1000), name="a")
    size = sum(f.size for f in store.list_files(a).values())
    root = tmp_path / "cache"
    root.mkdir()
    precious = root / "precious"
    precious.mkdir()
    (precious / "data.bin").write_bytes(b"x" * size)
    lookalike = root / Checkpoint.open(make_ckpt(s3_bucket, other_tensors(), name="b")).fingerprint
    lookalike.mkdir()
    (lookalike / "model.safetensors").write_bytes(b"not from the cache")
    for folder in (precious, lookalike):
        touch_seconds_ago(folder, 3600)
    cache = CheckpointCache(root, max_bytes=int(size * 1.5))
    assert cache.entries() == []
    Checkpoint.open(a, cache=cache)
    b = Checkpoint.open(store.join(s3_bucket, "b"), cache=cache)  # its folder is taken: read in place
    assert b.get("t2")[0].item() == 12.0
    assert (precious / "data.bin").read_bytes() == b"x" * size
    assert (lookalike / "model.safetensors").read_bytes() == b"not from the cache"
    assert [e[0].name for e in cache.entries()] == [Checkpoint.open(a).fingerprint]


def test_cache_never_evicts_an_entry_in_use_and_says_when_too_small(s3_bucket, tmp_path, caplog):
    a = make_ckpt(s3_bucket, many_tensors(3, 1000), name="a")
    b = make_ckpt(s3_bucket, other_tensors(), name="b")
    size = sum(f.size for f in store.list_files(a).values())
    cache = CheckpointCache(tmp_path / "cache", max_bytes=int(size * 1.5))
    reading = Checkpoint.open(a, cache=cache)
    stream = reading.iter_tensors()
    assert next(stream)[0] == "t0"
    with caplog.at_level("WARNING", logger="mergeaudit.checkpoint.cache"):
        other = Checkpoint.open(b, cache=cache)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "too small" in warning and str(size) in warning and str(int(size * 1.5)) in warning and b in warning
    assert {n: t[0].item() for n, t in stream} == {"t1": 1.0, "t2": 2.0}, "the entry in use is still there"
    assert other.get("t1")[0].item() == 11.0 and other.spec("t1").file.startswith("s3://"), "read in place"
    assert [e[0].name for e in cache.entries()] == [reading.fingerprint]
    del reading, stream
    Checkpoint.open(b, cache=cache)  # no longer in use: evicted for b
    assert [e[0].name for e in cache.entries()] == [other.fingerprint]


def test_cache_lease_holds_across_processes(s3_bucket, tmp_path):
    import subprocess
    import sys

    a = make_ckpt(s3_bucket, many_tensors(3, 1000), name="a")
    b = make_ckpt(s3_bucket, other_tensors(), name="b")
    size = sum(f.size for f in store.list_files(a).values())
    code = (
        f"import sys\nfrom mergeaudit.checkpoint import Checkpoint, CheckpointCache\n"
        f"ck = Checkpoint.open({a!r}, cache=CheckpointCache({str(tmp_path / 'cache')!r}, {int(size * 1.5)}))\n"
        "print('ready', flush=True)\nsys.stdin.read()\nprint(ck.get('t2')[0].item(), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        cache = CheckpointCache(tmp_path / "cache", max_bytes=int(size * 1.5))
        Checkpoint.open(b, cache=cache)
        assert [e[0].name for e in cache.entries()] == [Checkpoint.open(a).fingerprint]
        out, _ = proc.communicate("", timeout=60)
    finally:
        proc.kill()
    assert out.strip() == "2.0" and proc.returncode == 0


def test_cache_refuses_a_checkpoint_replaced_while_it_is_downloaded(s3_bucket, tmp_path, monkeypatch):
    from mergeaudit.errors import CheckpointChangedError

    uri = make_ckpt(s3_bucket, many_tensors(3, 1000))
    cache = CheckpointCache(tmp_path / "cache", max_bytes=10**7)
    real = store.read_range

    def replaced_first(u, start, end, **kw):
        if u.endswith(".safetensors") and not replaced_first.done:
            replaced_first.done = True
            store.write_bytes(u, store.read_bytes(store.join(other, "model.safetensors")))
        return real(u, start, end, **kw)

    other = make_ckpt(s3_bucket, other_tensors(), name="other")
    replaced_first.done = False
    monkeypatch.setattr(store, "read_range", replaced_first)
    with pytest.raises(CheckpointChangedError, match="changed while it was being cached"):
        Checkpoint.open(uri, cache=cache)
    assert cache.entries() == [] and [p.name for p in (tmp_path / "cache").iterdir()] == []
