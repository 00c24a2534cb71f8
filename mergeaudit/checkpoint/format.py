"""The safetensors file format: header validation, tensor decoding, serialization.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (name ->
dtype, shape, data_offsets relative to the data area), then the data area. We parse the header
ourselves because `safetensors.safe_open` only takes local paths, and because an untrusted
header must be validated before any number in it is used to allocate or request bytes. The
parser refuses everything safetensors 0.8 refuses (tests/test_hostile_headers.py checks each
case against the library) and a little more (any repeated key, rank over 32, dims over 2**63-1);
a hostile header is a CheckpointError, never a RecursionError or ValueError. TensorSpecs carry
their file's listed version tag, and tensor reads are pinned to it (CheckpointChangedError).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mergeaudit import store
from mergeaudit.errors import CheckpointChangedError, CheckpointError, ObjectChangedError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE)
MAX_RANK = 32  # far beyond any weight; bounds the work a hostile shape can cause
MAX_DIM = 2**63 - 1  # torch sizes are int64
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F64": (torch.float64, 8),  # what mergekit writes for `dtype: float64`
}
DTYPE_NAMES = {v[0]: k for k, v in DTYPES.items()}
HUGE_PAGE_BYTES = 2 * 1024 * 1024
MAP_MIN_BYTES = 1024 * 1024  # smaller local tensors are copied: one mapping each would waste VMAs


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: file URI and absolute byte range, dtype and shape, and the
    version tag the file was listed with (reads are pinned to it; None: unpinned)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int
    version: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def parse_header(uri: str, size: int, expect: store.Expect = None) -> dict[str, TensorSpec]:
    """Read and validate a safetensors header with ranged reads; no tensor data is read.

    Checked before any number from the header is used: header length within the file and under
    MAX_HEADER_BYTES; strict UTF-8 JSON (see decode_header); supported dtypes; shapes of at
    most MAX_RANK dimensions, each in [0, 2**63); offsets equal to numel x itemsize; and, as
    the safetensors library checks, tensors that tile the data area in order with no gap or
    overlap, ending exactly where the file does (a truncated or padded file is not complete).
    Every problem is a CheckpointError. `expect` (the file's listed FileInfo) pins the reads to
    that version, and is carried by every TensorSpec so tensor reads are pinned too.
    """
    version = expect.version if isinstance(expect, store.FileInfo) else expect
    if size < 8:
        raise CheckpointError(f"{uri}: {size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", _pinned_read(uri, 0, 8, version))
    if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{uri}: header length {header_len} does not fit the file ({size} bytes, "
            f"limit {MAX_HEADER_BYTES}); the file is truncated or not safetensors"
        )
    header = decode_header(uri, _pinned_read(uri, 8, 8 + header_len, version))
    data_start = 8 + header_len
    data_size = size - data_start
    specs: dict[str, TensorSpec] = {}
    problems: list[str] = []
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        problems.append("__metadata__ must be an object of string values")
    for name, entry in header.items():
        problem = _check_entry(name, entry, data_size)
        if problem:
            problems.append(problem)
            continue
        s, e = entry["data_offsets"]
        specs[name] = TensorSpec(
            name, entry["dtype"], tuple(entry["shape"]), uri, data_start + s, data_start + e, version
        )
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise CheckpointError(f"{uri}: invalid header: " + "; ".join(problems[:20]) + more)
    pos, prev = data_start, None
    for start, end, name in sorted((s.start, s.end, s.name) for s in specs.values()):
        if start < pos:
            raise CheckpointError(f"{uri}: tensors {prev!r} and {name!r} overlap in the data area")
        if start > pos:
            raise CheckpointError(
                f"{uri}: data-area bytes {pos - data_start}..{start - data_start} belong to "
                f"no tensor (a gap before {name!r}); safetensors refuses such files"
            )
        pos, prev = end, name
    if pos != size:
        raise CheckpointError(
            f"{uri}: the header describes {pos} bytes but the file has {size}: truncated, padded or still being written"
        )
    return specs


def _pinned_read(uri: str, start: int, end: int, version: str | None) -> bytes:
    try:
        return store.read_range(uri, start, end, expect=version)
    except ObjectChangedError as exc:
        raise CheckpointChangedError(f"{exc}; it changed after the checkpoint was listed") from exc


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _Refused(ValueError):
    pass


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"duplicate key {dup!r}")
    return out


def _pairs_checking_text(pairs: list[tuple[str, object]]) -> dict[str, object]:
    for key, value in pairs:
        key.encode()  # a lone surrogate escape (\ud800) is not Unicode text: UnicodeEncodeError
        if isinstance(value, str):
            value.encode()
    return _pairs(pairs)


def _int(text: str) -> int:
    if len(text) > 20:  # 2**64 has 20 digits; longer ones would cost quadratic time to convert
        raise _Refused(f"a {len(text)}-digit number")
    value = int(text)
    if value == 0 and text.startswith("-"):
        raise _Refused("-0 is not an unsigned integer")
    return value


def _no_float(text: str) -> float:
    raise _Refused(f"a non-integer number {text[:24]!r} (headers hold unsigned integers and strings only)")


def decode_header(uri: str, raw: bytes) -> dict[str, object]:
    """The header's JSON object, refusing what the safetensors library's parser refuses.

    Strict UTF-8 (no BOM, no UTF-16, no lone surrogates); no NaN/Infinity or non-integer
    numbers (every number in a header is an unsigned integer); no integers over 20 digits (so
    no 5000-digit integer reaches int()); no duplicate keys, at any level (safetensors refuses
    a repeated field and a repeated name with other offsets; identical repeats are refused here
    too); no nesting beyond Python's recursion limit (a 100k-deep array is an error, not a
    crash).
    """
    # strict UTF-8 bytes hold no surrogates; only \uD800-\uDFFF escapes can make a lone one
    hook = _pairs_checking_text if _SURROGATE_ESCAPE.search(raw) else _pairs
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=hook, parse_int=_int, parse_float=_no_float, parse_constant=_no_float
        )
    except RecursionError:
        raise CheckpointError(f"{uri}: header is not valid JSON (nested too deeply)") from None
    except (UnicodeError, ValueError) as exc:  # JSONDecodeError and _Refused are ValueErrors
        what = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{uri}: header is not valid JSON ({what})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{uri}: header is not a JSON object")
    return header


def _check_entry(name: str, entry: object, data_size: int) -> str | None:
    if not isinstance(entry, dict):
        return f"{name!r}: entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        return f"tensor {name!r} has dtype {dtype!r}; supported: {', '.join(DTYPES)}"
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_RANK
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
    ):
        return (
            f"tensor {name!r} has an invalid shape {_short(shape)} (at most {MAX_RANK} dimensions, "
            f"each an integer in [0, 2**63))"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        return f"tensor {name!r} has invalid data_offsets {_short(offsets)}"
    s, e = offsets
    if not 0 <= s <= e <= data_size:
        return f"tensor {name!r} lies outside the data area (offsets {s}..{e}, data {data_size} bytes): truncated file?"
    expected = math.prod(shape) * DTYPES[dtype][1]  # at most 32 x 63 bits: cheap
    if e - s != expected:
        return f"tensor {name!r} spans {e - s} bytes but shape {shape} x {dtype} needs {expected}"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def alloc_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """A writable buffer for one tensor's bytes.

    Large buffers are anonymous mappings advised to use transparent huge pages: filling fresh
    memory is otherwise dominated by 4 KiB page faults (measured here: 1.4 GB/s into new
    bytearrays vs 3.4-7 GB/s into huge-page mappings).
    """
    if nbytes < HUGE_PAGE_BYTES:
        return bytearray(nbytes)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def map_local(spec: TensorSpec, path: str) -> torch.Tensor:
    """A large local tensor as a private (copy-on-write) mapping of its file range.

    No copy is made: the tensor's pages are the page cache's until someone writes to them.
    MADV_WILLNEED starts the kernel's read-ahead now, so a prefetched tensor is in the page
    cache by the time it is used. (Pre-faulting the mapping in the prefetch thread with
    MADV_POPULATE_READ measured no faster on 2 cores, where it competes with the consumer;
    MAP_POPULATE is worse still: on a writable private mapping it copies every page.)
    The open file's size and mtime are checked against the listed version before mapping; a
    file replaced by rename afterwards is harmless (the mapping keeps the old inode), but one
    rewritten in place after this check is not detected: publishing replaces checkpoints by
    rename and never rewrites files in place.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_size < spec.end:
            raise CheckpointChangedError(f"{spec.file} shrank below tensor {spec.name!r}: it changed while being read")
        if spec.version is not None:
            try:
                store.check_local_version(spec.file, st, spec.version)
            except ObjectChangedError as exc:
                raise _changed(spec, exc) from exc
        start = spec.start - spec.start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(
            fd, spec.end - start, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start
        )
    finally:
        os.close(fd)
    with contextlib.suppress(OSError, AttributeError):
        mapped.madvise(mmap.MADV_WILLNEED)
    return torch.frombuffer(mapped, dtype=spec.torch_dtype, offset=spec.start - start, count=spec.numel).reshape(
        spec.shape
    )


def read_tensor(spec: TensorSpec) -> torch.Tensor:
    """One tensor: mapped from a local file, or fetched with one ranged read.

    The returned tensor owns its memory (frombuffer keeps the buffer or mapping alive) and may
    be written to without touching the checkpoint. A file that no longer has the version the
    spec was parsed from is a CheckpointChangedError.
    """
    if spec.numel == 0:
        return torch.empty(spec.shape, dtype=spec.torch_dtype)
    loc = store.locate(spec.file)
    if loc.is_local and spec.nbytes >= MAP_MIN_BYTES:
        store.count_read(spec.file, spec.nbytes)  # paged in when used: read all the same
        return map_local(spec, loc.path)
    try:
        if loc.is_local:
            buf = bytearray(spec.nbytes)
            store.read_into(spec.file, spec.start, buf, expect=spec.version)
        else:
            # allocate only once the bytes have arrived, so a request in flight costs one copy
            data = store.read_range(spec.file, spec.start, spec.end, expect=spec.version)
            buf = alloc_buffer(spec.nbytes)
            memoryview(buf)[:] = data
            del data
    except ObjectChangedError as exc:
        raise _changed(spec, exc) from exc
    return torch.frombuffer(buf, dtype=spec.torch_dtype).reshape(spec.shape)


def _changed(spec: TensorSpec, exc: ObjectChangedError) -> CheckpointChangedError:
    return CheckpointChangedError(
        f"tensor {spec.name!r} not read: {exc}. The checkpoint changed after it was opened and "
        "fingerprinted; its score would mix versions. Audit it again to score the new version"
    )


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def dtype_name(name: str, t: torch.Tensor) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise CheckpointError(
            f"cannot write tensor {name!r} of dtype {t.dtype}; supported: {', '.join(DTYPES)}"
        ) from None


def build_header(entries: list[tuple[str, str, list[int], int]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header (padded to 8 bytes) for (name, dtype, shape, nbytes)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def serialize_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A whole safetensors file in memory (small files and tests; the writer streams)."""
    entries, chunks = [], []
    for name, t in tensors.items():
        data = tensor_bytes(t)
        entries.append((name, dtype_name(name, t), list(t.shape), data.nbytes))
        chunks.append(bytes(data))
    return build_header(entries, metadata) + b"".join(chunks)
