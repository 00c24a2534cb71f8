"""Hostile safetensors headers: our parser refuses what the safetensors library refuses.

Each hostile file is written locally and handed to `safetensors.safe_open` (the reference,
0.8.0) and to `parse_header` on a local folder and on the S3 endpoint: both must refuse it,
ours with a CheckpointError (never a RecursionError, ValueError or a hang). Valid files,
including unusual but legal ones, are accepted by both. The CLI turns a hostile header into
exit 2 and one line.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import yaml
from safetensors import safe_open

from mergeaudit import store
from mergeaudit.checkpoint import parse_header
from mergeaudit.errors import CheckpointError

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def blob(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


HOSTILE = {
    "deep_array_100k": blob(b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "deep_array_top": blob(b"[" * 100_000 + b"]" * 100_000),
    "int_5000_digits": blob(b'{"x":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', b"\0" * 8),
    "shape_2_pow_64": blob({"x": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}}),
    "shape_negative": blob({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
    "shape_negative_zero": blob(b'{"x":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'),
    "shape_float": blob(b'{"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', b"\0" * 8),
    "shape_exponent": blob(b'{"x":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}', b"\0" * 8),
    "numel_overflows_u64": blob({"x": {"dtype": "F32", "shape": [2**32, 2**32, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "duplicate_name_other_offsets": blob(
        b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        b"\0" * 16,
    ),
    "duplicate_field": blob(b'{"x":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "duplicate_metadata": blob(
        b'{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        b"\0" * 8,
    ),
    "gap_at_start": blob({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16),
    "gap_between": blob({"x": F32x2, "y": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, b"\0" * 24),
    "overlap": blob({"x": F32x2, "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "trailing_bytes": blob({"x": F32x2}, b"\0" * 16),
    "offsets_reversed": blob({"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8),
    "offsets_three": blob({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, b"\0" * 8),
    "metadata_list": blob({"__metadata__": [1], "x": F32x2}, b"\0" * 8),
    "metadata_string": blob({"__metadata__": "a", "x": F32x2}, b"\0" * 8),
    "metadata_int_value": blob({"__metadata__": {"a": 1}, "x": F32x2}, b"\0" * 8),
    "not_utf8": blob(b'{"x\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "utf16": blob(json.dumps({"x": F32x2}).encode("utf-16"), b"\0" * 8),
    "utf8_bom": blob(b"\xef\xbb\xbf" + json.dumps({"x": F32x2}).encode(), b"\0" * 8),
    "lone_surrogate": blob(b'{"x\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "nan_literal": blob(b'{"__metadata__":{"a":NaN},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "infinity_shape": blob(b'{"x":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}', b"\0" * 8),
    "control_char": blob(b'{"x\x01":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "missing_shape": blob({"x": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8),
    "top_level_list": blob(b"[]"),
    "trailing_nul": blob(json.dumps({"x": F32x2}).encode() + b"\0", b"\0" * 8),
    "header_length_zero": struct.pack("<Q", 0),
    "header_length_beyond_file": struct.pack("<Q", 2**40) + b"{}",
}

VALID = {
    "plain": blob({"x": F32x2}, b"\0" * 8),
    "metadata": blob({"__metadata__": {"format": "pt"}, "x": F32x2}, b"\0" * 8),
    "metadata_null": blob({"__metadata__": None, "x": F32x2}, b"\0" * 8),
    "empty": blob(b"{}"),
    "zero_sized_tensors": blob(
        {
            "x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
            "y": F32x2,
            "z": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [8, 8]},
        },
        b"\0" * 8,
    ),
    "offsets_out_of_name_order": blob(
        {"y": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]}, "x": F32x2}, b"\0" * 16
    ),
    "whitespace_padding": blob(b' {"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}    ', b"\0" * 8),
    "extra_entry_field": blob({"x": {**F32x2, "note": "ignored"}}, b"\0" * 8),
}


def safetensors_accepts(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        return True
    except Exception:  # noqa: BLE001 - the library raises several types; refusal is what counts
        return False


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_header_refused_like_safetensors(store_root, tmp_path, name):
    local = tmp_path / f"{name}.safetensors"
    local.write_bytes(HOSTILE[name])
    assert not safetensors_accepts(local), "the reference library refuses this file"
    uri = store.join(store_root, f"{name}.safetensors")
    store.write_bytes(uri, HOSTILE[name])
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        parse_header(uri, store.info(uri).size)
    assert time.perf_counter() - t0 < 1.0
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_header_accepted_like_safetensors(tmp_path, name):
    local = tmp_path / f"{name}.safetensors"
    local.write_bytes(VALID[name])
    assert safetensors_accepts(local)
    specs = parse_header(str(local), local.stat().st_size)
    with safe_open(str(local), "pt") as f:
        assert sorted(specs) == sorted(f.keys())


def test_identical_duplicate_names_are_refused_too(tmp_path):
    """safetensors keeps the last of two identical entries; we refuse any repeated name."""
    path = tmp_path / "dup.safetensors"
    entry = b'{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    path.write_bytes(blob(b'{"x":' + entry + b',"x":' + entry + b"}", b"\0" * 8))
    with pytest.raises(CheckpointError, match="duplicate key 'x'"):
        parse_header(str(path), path.stat().st_size)


def test_hostile_header_in_a_merge_input_exits_2_with_one_line(tmp_path, capsys):
    from mergeaudit.cli import main

    for name in ("deep_array_100k", "int_5000_digits", "shape_2_pow_64", "gap_between", "metadata_list"):
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama"}')
        (model / "model.safetensors").write_bytes(HOSTILE[name])
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(model)}]}))
        code = main(["merge", str(cfg), str(tmp_path / f"out-{name}")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("mergeaudit: error:"), err
        assert not (tmp_path / f"out-{name}").exists()
