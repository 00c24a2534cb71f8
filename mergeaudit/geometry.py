"""Task vectors and their geometry, streamed tensor by tensor.

For a base checkpoint and fine-tuned checkpoints, the task vector of a tensor is
`delta = w_ft - w_base`. Per tensor and model we record the update sparsity under the bf16
definition of Mukherjee et al. (arXiv 2505.11711: an entry is unchanged when base and
fine-tune are bit-identical after casting both to bf16) and the relative update norm
||delta|| / ||w_base||. The base is read once; each fine-tune's tensor is read next to it, so
memory holds a handful of tensors, never a model.

    rows = geometry_rows(Checkpoint.open(base_uri), {"math": Checkpoint.open(math_uri)})
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from mergeaudit.checkpoint import Checkpoint

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+?)(?:\.(?:weight|bias))?$")


def parse_tensor_name(name: str) -> tuple[int | None, str]:
    """Layer index and module of an HF tensor name (`model.layers.3.mlp.up_proj.weight`)."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)), m.group(2)
    module = name.removeprefix("model.").removesuffix(".weight").removesuffix(".bias")
    return None, module


def changed_bf16(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Mask of entries that differ after casting both tensors to bf16 (bitwise, so -0 != +0)."""
    a = base.to(torch.bfloat16).view(torch.int16)
    b = ft.to(torch.bfloat16).view(torch.int16)
    return a != b


def tensor_geometry(base: torch.Tensor, ft: torch.Tensor) -> dict[str, float | int]:
    """Update sparsity (bf16 definition) and norms of one tensor's task vector."""
    changed = int(changed_bf16(base, ft).sum())
    numel = base.numel()
    b32 = base.float()
    update_norm = float(torch.linalg.vector_norm(ft.float() - b32))
    base_norm = float(torch.linalg.vector_norm(b32))
    return {
        "numel": numel,
        "changed_bf16": changed,
        "sparsity_bf16": 1.0 - changed / numel if numel else 1.0,
        "update_norm": update_norm,
        "base_norm": base_norm,
        "rel_update_norm": update_norm / base_norm if base_norm > 0 else float("nan"),
    }


def geometry_rows(base: Checkpoint, models: Mapping[str, Checkpoint]) -> list[dict]:
    """One row per (model, tensor); mismatched or missing tensors get a row with a reason."""
    rows: list[dict] = []
    for name in base.keys():
        layer, module = parse_tensor_name(name)
        w = base.get(name)
        for model_name, ck in models.items():
            row = {"model": model_name, "tensor": name, "layer": layer, "module": module, "reason": None}
            if name not in ck.keys():
                row.update(numel=w.numel(), reason="missing in model")
            elif ck.spec(name).shape != tuple(w.shape):
                row.update(numel=w.numel(), reason=f"shape {list(ck.spec(name).shape)} vs base {list(w.shape)}")
            else:
                row.update(tensor_geometry(w, ck.get(name)))
            rows.append(row)
        del w
    for model_name, ck in models.items():
        for name in sorted(set(ck.keys()) - set(base.keys())):
            layer, module = parse_tensor_name(name)
            rows.append({"model": model_name, "tensor": name, "layer": layer, "module": module,
                         "numel": ck.spec(name).numel, "reason": "not in base"})
    return rows


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per model: global bf16 sparsity and relative update norm over the measured tensors."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("reason"):
            continue
        acc = out.setdefault(row["model"], {"numel": 0, "changed": 0, "upd2": 0.0, "base2": 0.0})
        acc["numel"] += row["numel"]
        acc["changed"] += row["changed_bf16"]
        acc["upd2"] += row["update_norm"] ** 2
        acc["base2"] += row["base_norm"] ** 2
    return {
        m: {
            "sparsity_bf16": 1.0 - a["changed"] / a["numel"] if a["numel"] else 1.0,
            "rel_update_norm": (a["upd2"] ** 0.5) / (a["base2"] ** 0.5) if a["base2"] else float("nan"),
        }
        for m, a in out.items()
    }
