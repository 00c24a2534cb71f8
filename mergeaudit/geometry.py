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

from mergeaudit.checkpoint import Checkpoint, iter_aligned

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
    """One row per (model, tensor); mismatched or missing tensors get a row with a reason.

    Tensors every model shares with the base stream together (the base read once, all
    checkpoints prefetching in step); the rare partly-shared ones are read one by one.
    """
    rows: list[dict] = []
    shapes = {m: ck.shapes() for m, ck in models.items()}
    ref = base.shapes()

    def problem(model: str, name: str) -> str | None:
        if name not in shapes[model]:
            return "missing in model"
        if shapes[model][name] != ref[name]:
            return f"shape {list(shapes[model][name])} vs base {list(ref[name])}"
        return None

    def row(model: str, name: str, **values) -> dict:
        layer, module = parse_tensor_name(name)
        return {"model": model, "tensor": name, "layer": layer, "module": module, "reason": None, **values}

    shared = [n for n in base.keys() if all(problem(m, n) is None for m in models)]
    for name, (w, *fts) in iter_aligned([base, *models.values()], shared):
        rows += [row(m, name, **tensor_geometry(w, ft)) for m, ft in zip(models, fts, strict=True)]
    done = set(shared)
    for name in [n for n in base.keys() if n not in done]:
        w = base.get(name)
        for m, ck in models.items():
            reason = problem(m, name)
            rows.append(row(m, name, numel=w.numel(), reason=reason) if reason
                        else row(m, name, **tensor_geometry(w, ck.get(name))))
    for m, ck in models.items():
        for name in sorted(set(shapes[m]) - set(ref)):
            rows.append(row(m, name, numel=ck.spec(name).numel, reason="not in base"))
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
