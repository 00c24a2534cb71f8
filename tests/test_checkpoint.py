"""Checkpoints: validated headers, streaming reads, sharded writes; local folder and S3."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from mergeaudit import store
from mergeaudit.checkpoint import (
    Checkpoint,
    check_compatible,
    parse_header,
    serialize_safetensors,
    write_checkpoint,
)
from mergeaudit.errors import CheckpointError, ShapeMismatchError


def make_ckpt(root: str, tensors: dict[str, torch.Tensor], **kw) -> str:
    uri = store.join(root, "ck")
    return write_checkpoint(uri, tensors.items(), config={"model_type": "llama"}, **kw)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(16, generator=g),
        "c.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "d.empty": torch.zeros(0, 4),
    }


def test_roundtrip_single_file(store_root):
    tensors = sample_tensors()
    ck = Checkpoint.open(make_ckpt(store_root, tensors))
    assert ck.keys() == list(tensors)
    for name, t in ck.iter_tensors():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name])
    assert ck.spec("a.weight").shape == (4, 8)
    assert len(ck.fingerprint) == 32


def test_sharded_write_and_read(store_root):
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(7)}
    uri = make_ckpt(store_root, tensors, max_shard_bytes=600)
    files = store.list_files(uri)
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in files
    ck = Checkpoint.open(uri)
    assert {n: t[0].item() for n, t in ck.iter_tensors()} == {n: float(i) for i, n in enumerate(tensors)}


def test_missing_shard_is_incomplete(store_root):
    uri = make_ckpt(store_root, {f"t{i}": torch.ones(64) for i in range(4)}, max_shard_bytes=300)
    store.remove(store.join(uri, "model-00002.safetensors"))
    with pytest.raises(CheckpointError, match="missing shards model-00002.safetensors"):
        Checkpoint.open(uri)


def test_truncated_file_is_refused_before_any_tensor_is_read(store_root):
    uri = make_ckpt(store_root, sample_tensors())
    blob = store.read_bytes(store.join(uri, "model.safetensors"))
    store.write_bytes(store.join(uri, "model.safetensors"), blob[:-10])
    with pytest.raises(CheckpointError, match="outside the data area"):
        Checkpoint.open(uri)


def _write_raw(root: str, header: dict | bytes, data: bytes = b"", length: int | None = None) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    uri = store.join(root, "raw.safetensors")
    store.write_bytes(uri, struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return uri


@pytest.mark.parametrize(
    "header,data,length,match",
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**40, "header length"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        ({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "tensor 'x' has dtype 'I64'"),
        ({"x": {"dtype": "F32", "shape": [2**20], "data_offsets": [0, 2**22]}}, b"\0" * 8, None, "outside the data area"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "invalid shape"),
    ],
)
def test_hostile_headers(tmp_path, header, data, length, match):
    uri = _write_raw(str(tmp_path), header, data, length)
    with pytest.raises(CheckpointError, match=match):
        parse_header(uri, store.info(uri).size)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    root = tmp_path / "pk"
    root.mkdir()
    (root / "config.json").write_text("{}")
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles.*Convert them to safetensors"):
        Checkpoint.open(str(root))


def test_missing_checkpoint(store_root):
    with pytest.raises(CheckpointError, match="does not exist|cannot be listed"):
        Checkpoint.open(store.join(store_root, "absent"))


def test_compatibility_reports_every_mismatch_at_once(tmp_path):
    base = Checkpoint.open(make_ckpt(str(tmp_path / "a"), {"model.embed_tokens.weight": torch.zeros(10, 4),
                                                           "x": torch.zeros(3), "y": torch.zeros(2)}))
    other = Checkpoint.open(make_ckpt(str(tmp_path / "b"), {"model.embed_tokens.weight": torch.zeros(12, 4),
                                                            "x": torch.zeros(4), "z": torch.zeros(2)}))
    with pytest.raises(ShapeMismatchError) as info:
        check_compatible(base, [other])
    msg = str(info.value)
    assert "4 problems" in msg and "vocabulary size differs" in msg
    assert "lacks y" in msg and "extra tensor z" in msg and "x: shape [4] vs base [3]" in msg


def test_written_checkpoint_loads_in_transformers(toy_family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_family.variants["ft_a"])
    ck = Checkpoint.open(toy_family.variants["ft_a"])
    assert torch.equal(model.state_dict()["model.norm.weight"], ck.get("model.norm.weight"))


def test_serializer_matches_the_safetensors_library(tmp_path):
    from safetensors.torch import load

    tensors = sample_tensors()
    loaded = load(serialize_safetensors(tensors, {"format": "pt"}))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
