"""Explicit, opt-in conversion of pickled PyTorch weights to safetensors.

mergeaudit never unpickles a checkpoint on its own. When a user opts in, `.bin`/`.pt` files are
loaded with `torch.load(weights_only=True)`, PyTorch's restricted unpickler that only builds
tensors and plain containers (no arbitrary code), and written as a regular safetensors
checkpoint with config and tokenizer copied over.

    mergeaudit convert s3://bkt/old-ckpt s3://bkt/old-ckpt-st --allow-pickle
"""

from __future__ import annotations

import io
import json

import torch

from mergeaudit import store
from mergeaudit.checkpoint.reader import CONFIG_FILE, PICKLE_SUFFIXES
from mergeaudit.checkpoint.writer import CheckpointWriter
from mergeaudit.errors import CheckpointError

PICKLE_INDEX = "pytorch_model.bin.index.json"


def pickled_shards(uri: str) -> list[str]:
    files = store.list_files(uri)
    if CONFIG_FILE not in files:
        raise CheckpointError(f"checkpoint {uri} has no {CONFIG_FILE}")
    if PICKLE_INDEX in files:
        index = json.loads(store.read_bytes(files[PICKLE_INDEX].uri))
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if s not in files]
        if missing or not shards:
            raise CheckpointError(f"checkpoint {uri}: {PICKLE_INDEX} names missing shards {missing}")
        return [files[s].uri for s in shards]
    shards = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
    if not shards:
        raise CheckpointError(f"checkpoint {uri} has no pickled weights to convert")
    return [files[s].uri for s in shards]


def convert_pickled(uri: str, out_uri: str, allow_pickle: bool = False, **writer_kwargs) -> str:
    """Convert a pickled checkpoint to safetensors at out_uri; requires allow_pickle=True."""
    if not allow_pickle:
        raise CheckpointError(
            "converting pickled weights needs an explicit opt-in (allow_pickle=True / --allow-pickle)"
        )
    uri = store.check_uri(uri)
    shards = pickled_shards(uri)
    with CheckpointWriter(out_uri, source=uri, **writer_kwargs) as writer:
        for shard in shards:
            try:
                state = torch.load(io.BytesIO(store.read_bytes(shard)), map_location="cpu", weights_only=True)
            except Exception as exc:  # the restricted unpickler refuses many things
                raise CheckpointError(f"{shard} cannot be loaded with weights_only=True: {exc}") from exc
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{shard} does not hold a state dict")
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{shard}: entry {name!r} is not a tensor")
                writer.add(name, tensor.clone())  # shared storage (tied weights) becomes its own
            del state
    return writer.uri
