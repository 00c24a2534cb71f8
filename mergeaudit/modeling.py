"""Building Hugging Face models from streamed tensors, safely.

The architecture comes from a checkpoint's config.json through transformers' built-in classes
only (`trust_remote_code` stays off); weights are copied into a model allocated on the target
device without random init, as they stream, so memory holds the model plus one tensor, never
a second copy of the state dict.

    model = build_model(ck.config, ck.iter_tensors(), device="cuda")
    tokenizer = load_tokenizer(ck.uri)
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mergeaudit import store
from mergeaudit.checkpoint import CONFIG_FILE, TOKENIZER_FILES
from mergeaudit.checkpoint.cache import local_copy
from mergeaudit.errors import CheckpointError


def load_tokenizer(uri: str):
    """The tokenizer of a checkpoint on any store (its small files copied to a temp folder).

    Its files come from the read-through cache's copy of these very files (same fingerprint)
    when there is one; else from the store, once per process (remembered by URI and version: an
    audit loads the base's tokenizer for every candidate)."""
    from transformers import AutoTokenizer

    files = store.list_files(uri)
    lease = local_copy(files)  # held while its files are read
    if lease is not None:
        files = store.list_files(lease.path)
    with tempfile.TemporaryDirectory(prefix="mergeaudit-tok-") as tmp:
        for name in TOKENIZER_FILES + (CONFIG_FILE,):
            if name in files:
                (Path(tmp) / name).write_bytes(_small_file(files[name].uri, files[name].version))
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)


@functools.lru_cache(maxsize=16)
def _small_file(uri: str, version: str) -> bytes:
    return store.read_bytes(uri, expect=version)  # that version, or ObjectChangedError


def empty_model(config: dict, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """An uninitialised causal LM of the config's architecture on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise CheckpointError("config.json has no model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        raise CheckpointError(f"config.json: {exc}") from None
    with no_init_weights(), torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)


def build_model(
    config: dict,
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
):
    """A model with the streamed weights loaded, in eval mode; every weight must be supplied
    (a tied head may be absent). `on_tensor` sees each tensor as it arrives."""
    model = empty_model(config, device, dtype)
    targets = model.state_dict(keep_vars=True)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    loaded: set[str] = set()
    kind = type(model).__name__
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in targets:
                raise CheckpointError(f"tensor {name!r} does not fit {kind}")
            if tuple(targets[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(tensor.shape)}, {kind} wants {list(targets[name].shape)}"
                )
            if on_tensor is not None:
                on_tensor(name, tensor)
            targets[name].copy_(tensor)
            loaded.add(name)
    missing = set(targets) - loaded - tied
    if missing:
        raise CheckpointError(f"weights missing for {kind}: {sorted(missing)[:5]}")
    if tied and "lm_head.weight" not in loaded:
        model.tie_weights()
    return model.eval()
