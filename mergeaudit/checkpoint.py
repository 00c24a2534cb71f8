"""Hugging Face checkpoints in safetensors: validated headers, streaming reads, a writer.

A checkpoint is a folder (any store URI) holding `config.json`, one or more `*.safetensors`
files (with `model.safetensors.index.json` when sharded) and tokenizer files. Opening one reads
only the headers and validates them; tensors are then fetched one at a time with one ranged
read each, so memory is bounded by the largest tensor, never by the model.

    ckpt = Checkpoint.open("s3://bucket/run-7/step-400")
    for name, tensor in ckpt.iter_tensors():
        ...
    write_checkpoint("/tmp/out", tensors, source=ckpt)

Untrusted input is never unpickled: a folder with only `.bin`/`.pt` weights is refused.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from mergeaudit import store
from mergeaudit.errors import CheckpointError, ShapeMismatchError, StoreError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
DTYPE_NAMES = {v[0]: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: file URI and absolute byte range, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def parse_header(uri: str, size: int) -> dict[str, TensorSpec]:
    """Read and validate a safetensors header with ranged reads; no tensor data is read.

    Checks, before anything is allocated from the header's numbers: header length within the
    file and under MAX_HEADER_BYTES, well-formed JSON, supported dtypes, offsets inside the
    data area, equal to numel x itemsize, and not overlapping.
    """
    if size < 8:
        raise CheckpointError(f"{uri}: {size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", store.read_range(uri, 0, 8))
    if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{uri}: header length {header_len} does not fit the file ({size} bytes, "
            f"limit {MAX_HEADER_BYTES}); the file is truncated or not safetensors"
        )
    raw = store.read_range(uri, 8, 8 + header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{uri}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{uri}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_size = size - data_start
    specs: dict[str, TensorSpec] = {}
    problems: list[str] = []
    for name, entry in header.items():
        problem = _check_entry(name, entry, data_size)
        if problem:
            problems.append(problem)
            continue
        s, e = entry["data_offsets"]
        specs[name] = TensorSpec(name, entry["dtype"], tuple(entry["shape"]), uri, data_start + s, data_start + e)
    if problems:
        raise CheckpointError(f"{uri}: invalid header: " + "; ".join(problems[:20]))
    ranges = sorted((s.start, s.end, s.name) for s in specs.values())
    for (_s0, e0, n0), (s1, _e1, n1) in zip(ranges, ranges[1:], strict=False):
        if s1 < e0:
            raise CheckpointError(f"{uri}: tensors {n0!r} and {n1!r} overlap in the data area")
    return specs


def _check_entry(name: str, entry: object, data_size: int) -> str | None:
    if not isinstance(entry, dict):
        return f"{name!r}: entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        return f"tensor {name!r} has dtype {dtype!r}; supported: {', '.join(DTYPES)}"
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        return f"tensor {name!r} has an invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        return f"tensor {name!r} has invalid data_offsets {offsets!r}"
    s, e = offsets
    if not 0 <= s <= e <= data_size:
        return f"tensor {name!r} lies outside the data area (offsets {s}..{e}, data {data_size} bytes): truncated file?"
    expected = math.prod(shape) * DTYPES[dtype][1]
    if e - s != expected:
        return f"tensor {name!r} spans {e - s} bytes but shape {shape} x {dtype} needs {expected}"
    return None


def decode_tensor(spec: TensorSpec, data: bytes) -> torch.Tensor:
    """Bytes of one tensor (little-endian, as safetensors stores them) to a torch tensor."""
    if spec.numel == 0:
        return torch.empty(spec.shape, dtype=spec.torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=spec.torch_dtype).reshape(spec.shape)


class Checkpoint:
    """A validated, read-only view of one HF checkpoint; tensors stream on demand.

    The interface is `keys()`, `spec(name)`, `get(name)` and `iter_tensors()`.
    """

    def __init__(self, uri: str, config: dict, files: dict[str, store.FileInfo], specs: dict[str, TensorSpec]):
        self.uri = uri
        self.config = config
        self.files = files
        self._specs = specs

    @classmethod
    def open(cls, uri: str) -> Checkpoint:
        """Open and validate a checkpoint folder; raises CheckpointError on anything wrong."""
        norm = store.check_uri(uri)
        try:
            files = store.list_files(norm)
        except StoreError as exc:
            raise CheckpointError(f"checkpoint {uri} cannot be listed: {exc}") from exc
        if not files:
            raise CheckpointError(f"checkpoint {uri} does not exist or is empty")
        if CONFIG_FILE not in files:
            raise CheckpointError(f"checkpoint {uri} has no {CONFIG_FILE}")
        weight_names = sorted(n for n in files if n.endswith(".safetensors"))
        if not weight_names:
            pickled = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
            if pickled:
                raise CheckpointError(
                    f"checkpoint {uri} has only pickled weights ({', '.join(pickled)}); mergeaudit never "
                    "unpickles untrusted files. Convert them to safetensors first, e.g. "
                    "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out)` on a trusted machine"
                )
            raise CheckpointError(f"checkpoint {uri} has no *.safetensors weights")
        config = _read_json(files[CONFIG_FILE].uri)
        specs = _read_specs(norm, files, weight_names)
        return cls(norm, config, files, specs)

    # -- the tiny interface ------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.uri} has no tensor {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        spec = self.spec(name)
        return decode_tensor(spec, store.read_range(spec.file, spec.start, spec.end))

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, in file order unless names are given."""
        for name in names if names is not None else self.keys():
            yield name, self.get(name)

    # -- metadata ------------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """Digest of the files' names, sizes and ETags (or mtimes): the cache key of this checkpoint."""
        return store.fingerprint(list(self.files.values()))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s.shape for n, s in self._specs.items()}

    def __repr__(self) -> str:
        return f"Checkpoint({self.uri!r}, tensors={len(self._specs)})"


def _read_json(uri: str) -> dict:
    try:
        data = json.loads(store.read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{uri} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{uri} is not a JSON object")
    return data


def _read_specs(uri: str, files: dict[str, store.FileInfo], weight_names: list[str]) -> dict[str, TensorSpec]:
    if INDEX_FILE in files:
        index = _read_json(files[INDEX_FILE].uri)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{files[INDEX_FILE].uri} has no weight_map")
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if s not in files]
        if missing:
            raise CheckpointError(f"checkpoint {uri} is incomplete: missing shards {', '.join(missing)}")
    elif SINGLE_FILE in files:
        weight_map, shard_names = None, [SINGLE_FILE]
    elif len(weight_names) == 1:
        weight_map, shard_names = None, weight_names
    else:
        raise CheckpointError(f"checkpoint {uri} has several safetensors files but no {INDEX_FILE}")
    specs: dict[str, TensorSpec] = {}
    for shard in shard_names:
        fi = files[shard]
        for name, spec in sorted(parse_header(fi.uri, fi.size).items(), key=lambda kv: kv[1].start):
            if weight_map is not None and weight_map.get(name) != shard:
                raise CheckpointError(f"{fi.uri}: tensor {name!r} is not mapped to this shard by the index")
            if name in specs:
                raise CheckpointError(f"checkpoint {uri}: tensor {name!r} appears in two shards")
            specs[name] = spec
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(specs))
        if absent:
            raise CheckpointError(f"checkpoint {uri}: index names tensors no shard holds: {', '.join(absent[:10])}")
    return specs


def check_compatible(base: Checkpoint, others: Iterable[Checkpoint]) -> None:
    """Every checkpoint has the same tensor names and shapes as base; all mismatches at once."""
    problems = []
    ref = base.shapes()
    for ck in others:
        shapes = ck.shapes()
        for name in sorted(set(ref) - set(shapes)):
            problems.append(f"{ck.uri} lacks {name}")
        for name in sorted(set(shapes) - set(ref)):
            problems.append(f"{ck.uri} has extra tensor {name}")
        for name in sorted(set(ref) & set(shapes)):
            if ref[name] != shapes[name]:
                what = "vocabulary size differs: " if "embed" in name or "lm_head" in name else ""
                problems.append(f"{ck.uri} {name}: {what}shape {list(shapes[name])} vs base {list(ref[name])}")
    if problems:
        raise ShapeMismatchError(
            f"checkpoints do not match {base.uri} ({len(problems)} problems): " + "; ".join(problems[:20])
        )


def serialize_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize tensors in the safetensors layout (header padded to 8 bytes, then data)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {t.dtype}; supported: {', '.join(DTYPES)}")
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def write_checkpoint(
    out_uri: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: Checkpoint | None = None,
    config: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write a checkpoint: shards as they fill, the index (if sharded) last.

    Config and tokenizer files come from `source` (or `config` overrides the config). Weights
    are written after the config and tokenizer, so a crash leaves a folder that `Checkpoint.open`
    refuses rather than one that looks complete.
    """
    out_uri = store.check_uri(out_uri)
    if config is None and source is None:
        raise CheckpointError("write_checkpoint needs a source checkpoint or a config")
    cfg = dict(config if config is not None else source.config)
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    if source is not None:
        for name in TOKENIZER_FILES:
            if name in source.files:
                store.copy(source.files[name].uri, store.join(out_uri, name))
    store.write_bytes(store.join(out_uri, CONFIG_FILE), json.dumps(cfg, indent=2, sort_keys=True).encode())

    shards: list[dict[str, torch.Tensor]] = [{}]
    pending: list[str] = []
    shard_bytes, total = 0, 0
    weight_map: dict[str, str] = {}

    def flush(final: bool) -> None:
        nonlocal shard_bytes
        if not shards[-1]:
            return
        name = SINGLE_FILE if final and not pending else f"model-{len(pending) + 1:05d}.safetensors"
        store.write_bytes(store.join(out_uri, name), serialize_safetensors(shards[-1], metadata))
        for t in shards[-1]:
            weight_map[t] = name
        pending.append(name)
        shards[-1] = {}
        shard_bytes = 0

    for name, t in tensors:
        t = t.to(dtype) if dtype is not None else t
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            flush(final=False)
        shards[-1][name] = t
        shard_bytes += nbytes
        total += nbytes
    flush(final=True)
    if len(pending) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        store.write_bytes(store.join(out_uri, INDEX_FILE), json.dumps(index, indent=2).encode())
    return out_uri
