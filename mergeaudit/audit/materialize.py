"""A candidate's weights, streamed (a stored checkpoint's, or a merge computed tensor by tensor
on the fly) into an in-memory model or a local checkpoint folder, with the bf16 sparsity of its
update against the base measured on the way."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import torch

from mergeaudit.audit.records import Candidate
from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.checkpoint.settings import StorageSettings
from mergeaudit.merging.executor import prepare
from mergeaudit.modeling import build_model
from mergeaudit.updates import changed_bf16


def candidate_tensors(candidate: Candidate, storage: StorageSettings) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the candidate's tensors: a stored checkpoint's, or a merge computed on the fly."""
    if candidate.kind == "checkpoint":
        return storage.open(candidate.inputs[0].uri).iter_tensors()
    return prepare(candidate.plan, opener=storage.open).stream()


class UpdateSparsity:
    """Counts, tensor by tensor, the entries a candidate changes against its base in bf16."""

    def __init__(self, base: Checkpoint):
        self.base, self.changed, self.numel = base, 0, 0

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.changed += int(changed_bf16(self.base.get(name), tensor).sum())
        self.numel += tensor.numel()

    @property
    def sparsity(self) -> float:
        """The share of entries left unchanged (1.0 for no tensors)."""
        return 1.0 - self.changed / self.numel if self.numel else 1.0


def materialize(
    candidate: Candidate, storage: StorageSettings, device: str = "cpu", dtype: torch.dtype = torch.float32
):
    """Build the candidate as an in-memory HF model on `device`; returns (model, sparsity), the
    bf16 sparsity of its update against the base, measured while the tensors stream in."""
    base = storage.open(candidate.base.uri)
    counter = UpdateSparsity(base)
    model = build_model(base.config, candidate_tensors(candidate, storage), device, dtype, on_tensor=counter)
    return model, counter.sparsity


def save_candidate(candidate: Candidate, storage: StorageSettings, out_dir: str) -> float:
    """Write the candidate as a local checkpoint (for backends that load from disk); returns
    the bf16 sparsity of its update."""
    base = storage.open(candidate.base.uri)
    counter = UpdateSparsity(base)

    def tensors():
        for name, tensor in candidate_tensors(candidate, storage):
            counter(name, tensor)
            yield name, tensor

    write_checkpoint(out_dir, tensors(), source=base)
    return counter.sparsity


def release_device_memory(device: str) -> None:
    """Give a freed model's GPU memory back before the next candidate is built."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
