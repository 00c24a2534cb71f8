"""Reading Hugging Face checkpoints where they live, one tensor at a time.

A checkpoint is a folder (any store URI) with `config.json`, weights in `model.safetensors` or
in shards named by `model.safetensors.index.json` (the two layouts transformers loads), and
tokenizer files. `Checkpoint.open` lists the folder and validates every header before any
tensor is read (once per process and version of the files: the result is remembered by URI and
fingerprint); tensors then stream with one ranged read each. Every read is pinned to the
version of its file that the listing (and so the fingerprint) saw: S3 GETs carry
`If-Match: <ETag>`, local reads compare size and mtime, and a file replaced mid-audit is a
`CheckpointChangedError` instead of a silent mix of old and new tensors. `iter_tensors` keeps
a bounded window of reads in flight (several requests at once, so S3 bandwidth is used), so
memory is bounded by that window, never by the model.

    ck = Checkpoint.open("s3://bucket/run-7/step-400")
    for name, tensor in ck.iter_tensors(window_bytes=256 << 20):
        ...

Untrusted input is never unpickled: a folder with only `.bin`/`.pt` weights is refused (see
`mergeaudit.checkpoint.convert` for the explicit, `weights_only` conversion).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from functools import cached_property

import torch

from mergeaudit import store
from mergeaudit.checkpoint.format import TensorSpec, parse_header, read_tensor
from mergeaudit.errors import (
    CheckpointChangedError,
    CheckpointError,
    ObjectChangedError,
    ShapeMismatchError,
    StoreError,
)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The prefetch window defaults to two of the checkpoint's largest tensors, within these bounds.
MIN_WINDOW_BYTES = 64 * 1024 * 1024
MAX_WINDOW_BYTES = 1024 * 1024 * 1024
# Concurrent ranged reads: object stores need several in flight to use their bandwidth; local
# reads are memory-copy bound, and more threads than cores only contend.
REMOTE_MAX_REQUESTS = 8
LOCAL_MAX_REQUESTS = 2
TIED_HEAD = "lm_head.weight"
METADATA_MEMO_SIZE = 64  # checkpoints whose config and headers a process remembers
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
_metadata: collections.OrderedDict[tuple[str, str], tuple[dict, dict[str, TensorSpec]]] = collections.OrderedDict()
_metadata_lock = threading.Lock()


def read_json(uri: str, expect: store.Expect = None) -> dict:
    """A small JSON object file (config, index); `expect` pins the read to the listed version."""
    try:
        data = json.loads(store.read_bytes(uri, expect=expect))
    except ObjectChangedError as exc:
        raise CheckpointChangedError(f"{exc}; it changed while the checkpoint was being opened") from exc
    except RecursionError:
        raise CheckpointError(f"{uri} is not valid JSON (nested too deeply)") from None
    except (UnicodeError, ValueError) as exc:  # JSONDecodeError, and over-long integers
        raise CheckpointError(f"{uri} is not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{uri} is not a JSON object")
    return data


class Checkpoint:
    """A validated, read-only view of one HF checkpoint; tensors stream on demand.

    The interface is `keys()`, `spec(name)`, `get(name)` and `iter_tensors()`. `uri`, `files`
    and `fingerprint` always describe the source; with a read-through cache the tensor bytes may
    come from a local copy of the same fingerprint.
    """

    def __init__(self, uri: str, config: dict, files: dict[str, store.FileInfo], specs: dict[str, TensorSpec]):
        self.uri = uri
        self.config = config
        self.files = files
        self._specs = specs

    @classmethod
    def open(cls, uri: str, cache=None) -> Checkpoint:
        """Open and validate a checkpoint folder; raises CheckpointError on anything wrong.

        `cache` (a `CheckpointCache`) serves the checkpoint's bytes (config, index, headers,
        tensors) from a local copy keyed by the source's fingerprint, downloading it on first
        use; only the listing then goes to the source.
        """
        norm = store.check_uri(uri)
        files = list_checkpoint_files(norm)
        lease = cache.fetch(norm, files) if cache is not None else None
        if lease is None:
            config, specs = remembered_metadata(norm, files)
            return cls(norm, config, files, specs)
        config, specs = read_metadata(norm, store.list_files(lease.path))
        ck = cls(norm, config, files, specs)
        ck.cache_lease = lease  # the cache never evicts the entry while this checkpoint lives
        return ck

    # -- the tiny interface ------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.uri} has no tensor {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self.spec(name))

    def iter_tensors(
        self,
        names: Iterable[str] | None = None,
        window_bytes: int | None = None,
        max_requests: int | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in order (file order by default) with reads prefetched.

        Up to `max_requests` ranged reads run at once (default: 2 on local disk, 8 on object
        stores) while their bytes stay within `window_bytes` (one tensor is always allowed,
        however large), so memory holds at most the window plus the tensor the caller is using.
        """
        specs = [self.spec(n) for n in (self.keys() if names is None else names)]
        if window_bytes is None:
            window_bytes = self.default_window()
        if max_requests is None:
            local = all(store.locate(s.file).is_local for s in specs[:1])
            max_requests = LOCAL_MAX_REQUESTS if local else REMOTE_MAX_REQUESTS
        yield from prefetch(specs, window_bytes, max_requests)

    # -- metadata ------------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """Digest of the files' names, sizes and ETags (or mtimes): the cache key of this checkpoint."""
        return store.fingerprint(list(self.files.values()))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())

    def default_window(self) -> int:
        """Two of the largest tensors, between MIN_WINDOW_BYTES and MAX_WINDOW_BYTES."""
        largest = max((s.nbytes for s in self._specs.values()), default=0)
        return min(MAX_WINDOW_BYTES, max(MIN_WINDOW_BYTES, 2 * largest))

    @property
    def tied_embeddings(self) -> bool:
        """True when the head shares the embedding matrix and is not stored."""
        return bool(self.config.get("tie_word_embeddings", False)) and TIED_HEAD not in self._specs

    def with_head_from_embeddings(self) -> Checkpoint:
        """This checkpoint with `lm_head.weight` read from its tied input embeddings (the same
        bytes), for merging it with checkpoints that store a head of their own (RL frameworks
        save one even when the base ties it, and mergekit merges the head that way). Itself
        when it stores a head or does not tie one."""
        embed = next((n for n in self._specs if n.endswith(EMBEDDING_SUFFIXES)), None)
        if not self.tied_embeddings or embed is None:
            return self
        specs = {**self._specs, TIED_HEAD: dataclasses.replace(self._specs[embed], name=TIED_HEAD)}
        ck = Checkpoint(self.uri, self.config, self.files, specs)
        if hasattr(self, "cache_lease"):
            ck.cache_lease = self.cache_lease  # its specs may point into the cache entry too
        return ck

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s.shape for n, s in self._specs.items()}

    def __repr__(self) -> str:
        return f"Checkpoint({self.uri!r}, tensors={len(self._specs)})"


def prefetch(specs: list[TensorSpec], window_bytes: int, max_requests: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Read specs in order with a bounded window of concurrent ranged reads."""
    if not specs:
        return
    pending: collections.deque[tuple[TensorSpec, Future]] = collections.deque()
    inflight = 0
    upcoming = iter(specs)
    nxt = next(upcoming, None)
    # a ContextThreadPool: its reads use the caller's s3_credentials
    with store.ContextThreadPool(max_workers=max(1, max_requests), thread_name_prefix="mergeaudit-read") as pool:
        try:
            while pending or nxt is not None:
                while (
                    nxt is not None
                    and len(pending) < max_requests
                    and (not pending or inflight + nxt.nbytes <= window_bytes)
                ):
                    pending.append((nxt, pool.submit(read_tensor, nxt)))
                    inflight += nxt.nbytes
                    nxt = next(upcoming, None)
                spec, fut = pending.popleft()
                tensor = fut.result()
                inflight -= spec.nbytes
                yield spec.name, tensor
                del tensor
        finally:
            for _, fut in pending:
                fut.cancel()


def iter_aligned(
    checkpoints: list[Checkpoint],
    names: list[str],
    window_bytes: int | None = None,
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Yield (name, [tensor of each checkpoint]) for names present in all of them, every
    checkpoint prefetching in the same order; the window (default: the first checkpoint's)
    is shared out between them, so memory stays bounded however many are read."""
    if not checkpoints:
        return
    total = window_bytes if window_bytes is not None else checkpoints[0].default_window()
    share = max(1, total // len(checkpoints))
    streams = [ck.iter_tensors(names, window_bytes=share) for ck in checkpoints]
    for name in names:
        yield name, [next(s)[1] for s in streams]


def read_metadata(uri: str, files: dict[str, store.FileInfo]) -> tuple[dict, dict[str, TensorSpec]]:
    """The config and the validated tensor specs of a listed checkpoint (ranged reads only)."""
    config = read_json(files[CONFIG_FILE].uri, expect=files[CONFIG_FILE])
    return config, read_specs(uri, files, weight_layout(uri, files))


def remembered_metadata(uri: str, files: dict[str, store.FileInfo]) -> tuple[dict, dict[str, TensorSpec]]:
    """read_metadata, remembered per URI and fingerprint (the listing's versions, which every
    spec is pinned to): an audit opens each input in several stages and for every candidate,
    and headers read again would cost requests and bytes each time. Failures are not kept."""
    key = (uri, store.fingerprint(list(files.values())))
    with _metadata_lock:
        found = _metadata.get(key)
        if found is not None:
            _metadata.move_to_end(key)
    if found is None:
        found = read_metadata(uri, files)
        with _metadata_lock:
            _metadata[key] = found
            while len(_metadata) > METADATA_MEMO_SIZE:
                _metadata.popitem(last=False)
    return copy.deepcopy(found[0]), dict(found[1])


def list_checkpoint_files(uri: str) -> dict[str, store.FileInfo]:
    """The folder's files, refusing missing folders, missing config and pickle-only weights."""
    try:
        files = store.list_files(uri)
    except StoreError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be listed: {exc}") from exc
    if not files:
        raise CheckpointError(f"checkpoint {uri} does not exist or is empty")
    if CONFIG_FILE not in files:
        raise CheckpointError(f"checkpoint {uri} has no {CONFIG_FILE}")
    if not any(n.endswith(".safetensors") for n in files) and INDEX_FILE not in files:
        pickled = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise CheckpointError(
                f"checkpoint {uri} has only pickled weights ({', '.join(pickled)}); mergeaudit never "
                "unpickles untrusted files. Convert them once with `mergeaudit convert SRC OUT "
                "--allow-pickle` (torch.load with weights_only=True), or with transformers' "
                "save_pretrained(safe_serialization=True) on a trusted machine"
            )
        raise CheckpointError(f"checkpoint {uri} has no *.safetensors weights")
    return files


def weight_layout(uri: str, files: dict[str, store.FileInfo]) -> dict[str, str] | None:
    """The index's weight_map (name -> shard) when sharded, None for a single model.safetensors.

    These are the two layouts transformers loads; a lone shard without its index is what a
    crashed upload leaves behind, and is incomplete.
    """
    if INDEX_FILE in files:
        index = read_json(files[INDEX_FILE].uri, expect=files[INDEX_FILE])
        weight_map = index.get("weight_map")
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) and "/" not in v for v in weight_map.values())
        ):
            raise CheckpointError(f"{files[INDEX_FILE].uri} has no valid weight_map")
        missing = sorted({s for s in weight_map.values() if s not in files})
        if missing:
            raise CheckpointError(f"checkpoint {uri} is incomplete: missing shards {', '.join(missing)}")
        return weight_map
    if SINGLE_FILE in files:
        return None
    raise CheckpointError(f"checkpoint {uri} is incomplete: shards without {INDEX_FILE} (an interrupted upload?)")


def read_specs(uri: str, files: dict[str, store.FileInfo], weight_map: dict[str, str] | None) -> dict[str, TensorSpec]:
    """Validate every shard's header (ranged reads only) and check it against the index."""
    shard_names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    specs: dict[str, TensorSpec] = {}
    for shard in shard_names:
        fi = files[shard]
        for name, spec in sorted(parse_header(fi.uri, fi.size, expect=fi).items(), key=lambda kv: kv[1].start):
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


def untie_heads(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """When some of the checkpoints store `lm_head.weight` and others tie it to their input
    embeddings, the tied ones read their head from their embeddings; otherwise unchanged."""
    if not any(TIED_HEAD in ck.keys() for ck in checkpoints):
        return checkpoints
    return [ck.with_head_from_embeddings() for ck in checkpoints]


def check_compatible(base: Checkpoint, others: Iterable[Checkpoint]) -> None:
    """Every checkpoint has the same tensor names and shapes as base; all mismatches at once.

    An embedding or head whose first dimension differs is named as a vocabulary mismatch; a
    head that one checkpoint ties to its embeddings while another stores it is named as such.
    """
    problems = []
    ref = base.shapes()
    for ck in others:
        shapes = ck.shapes()
        for name in sorted(set(ref) ^ set(shapes)):
            lacking, holding = (ck, base) if name in ref else (base, ck)
            if name == TIED_HEAD and lacking.tied_embeddings:
                problems.append(f"{TIED_HEAD}: tied to the embeddings in {lacking.uri} but stored in {holding.uri}")
            elif name in ref:
                problems.append(f"{ck.uri} lacks {name}")
            else:
                problems.append(f"{ck.uri} has extra tensor {name}")
        for name in sorted(set(ref) & set(shapes)):
            if ref[name] != shapes[name]:
                vocab = ("embed" in name or name == TIED_HEAD) and ref[name][1:] == shapes[name][1:]
                what = f"vocabulary size differs ({shapes[name][0]} vs {ref[name][0]}): " if vocab else ""
                problems.append(f"{ck.uri} {name}: {what}shape {list(shapes[name])} vs base {list(ref[name])}")
    if problems:
        raise ShapeMismatchError(
            f"checkpoints do not match {base.uri} ({len(problems)} problems): " + "; ".join(problems[:20])
        )
