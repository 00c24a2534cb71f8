"""Update geometry: the sparsity-curse diagnostics, streamed tensor by tensor.

For a base and N fine-tuned checkpoints, in one streaming pass over each (the base read once,
all checkpoints prefetching in step; memory holds one tensor per checkpoint plus chunk-sized
intermediates), `compute_geometry` returns two tables' rows:

- `geometry_tensors`, per model at scope `tensor`, `layer` and `model`: the update sparsity
  under three definitions with counts (see `stats`), the norms of update and base and their
  ratio, and for 2-D tensors the spectral figures of `spectral`; `kind` (rlvr, sft, ...) comes
  from the caller's config. Skipped or mismatched tensors are rows with a `reason`.
- `geometry_pairs`, per pair of models at scope `tensor`, `layer` and `global`: one-sided
  overlaps of the bf16 update masks and their Jaccard index, each with its value by chance for
  independent masks of the same per-tensor densities (expected overlap sum_t |A_t||B_t| / n_t)
  and the lift over chance; the sign-conflict rate on the overlap; cosine similarity of the
  updates, overall and restricted to the overlap; the ratio of their norms.

    tensor_rows, pair_rows = compute_geometry(Checkpoint.open(base), {"math": Checkpoint.open(m)})
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mergeaudit.checkpoint import Checkpoint, iter_aligned
from mergeaudit.geometry.spectral import SpectralSettings, decompose, spectral_figures
from mergeaudit.geometry.stats import ModelSums, PairSums, changed_bf16, tensor_sums

__all__ = ["GeometrySettings", "SpectralSettings", "changed_bf16", "compute_geometry", "parse_tensor_name"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+?)(?:\.(?:weight|bias))?$")


@dataclass(frozen=True)
class GeometrySettings:
    eta: float = 1e-3
    abs_tol: float = 1e-5
    spectral: SpectralSettings | None = field(default_factory=SpectralSettings)


def parse_tensor_name(name: str) -> tuple[int | None, str]:
    """Layer index and module of an HF tensor name (`model.layers.3.mlp.up_proj.weight`)."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)), m.group(2)
    module = name.removeprefix("model.").removesuffix(".weight").removesuffix(".bias")
    return None, module


def compute_geometry(
    base: Checkpoint,
    models: Mapping[str, Checkpoint],
    kinds: Mapping[str, str] | None = None,
    settings: GeometrySettings = GeometrySettings(),
) -> tuple[list[dict], list[dict]]:
    """Rows of geometry_tensors and geometry_pairs for every model against the base."""
    names = list(models)
    kinds = {m: (kinds or {}).get(m, "unknown") for m in names}
    ref = base.shapes()
    shapes = {m: ck.shapes() for m, ck in models.items()}
    provenance = {m: {"model_uri": ck.uri, "model_fingerprint": ck.fingerprint} for m, ck in models.items()}
    common = {"base_uri": base.uri, "base_fingerprint": base.fingerprint}

    def problem(model: str, tensor: str) -> str | None:
        if tensor not in shapes[model]:
            return "missing in model"
        if shapes[model][tensor] != ref[tensor]:
            return f"shape {list(shapes[model][tensor])} vs base {list(ref[tensor])}"
        return None

    model_acc: dict[tuple[str, int | None], ModelSums] = defaultdict(ModelSums)
    pair_acc: dict[tuple[str, str, int | None], PairSums] = defaultdict(PairSums)
    tensor_rows: list[dict] = []
    pair_rows: list[dict] = []

    def model_row(model: str, scope: str, tensor: str | None, layer: int | None, module: str | None, **values) -> dict:
        return {"scope": scope, "model": model, "kind": kinds[model], **provenance[model], **common,
                "tensor": tensor, "layer": layer, "module": module, "reason": None, **values}

    def pair_row(a: str, b: str, scope: str, tensor: str | None, layer: int | None, module: str | None,
                 sums: PairSums) -> dict:
        return {"scope": scope, "model_a": a, "model_b": b, "kind_a": kinds[a], "kind_b": kinds[b],
                "model_a_fingerprint": provenance[a]["model_fingerprint"],
                "model_b_fingerprint": provenance[b]["model_fingerprint"], **common,
                "mask": "bf16", "tensor": tensor, "layer": layer, "module": module, **sums.derived()}

    def measure(tensor: str, w: torch.Tensor, present: list[str], fts: list[torch.Tensor]) -> None:
        layer, module = parse_tensor_name(tensor)
        sums = tensor_sums(w, fts, settings.eta, settings.abs_tol)
        spectral = settings.spectral if w.ndim == 2 and min(w.shape) > 1 else None
        if spectral is not None:
            w32 = w.float()
            subspaces = decompose(w32, spectral.k(tuple(w.shape)), spectral)
        for m, ft, acc in zip(present, fts, sums.models, strict=True):
            extra = spectral_figures(w32, ft.float(), subspaces, spectral) if spectral is not None else {}
            tensor_rows.append(model_row(m, "tensor", tensor, layer, module, **acc.derived(), **extra))
            model_acc[(m, layer)].add(acc)
        for (i, j), p in sums.pairs.items():
            pair_rows.append(pair_row(present[i], present[j], "tensor", tensor, layer, module, p))
            pair_acc[(present[i], present[j], layer)].add(p)

    shared = [t for t in base.keys() if all(problem(m, t) is None for m in names)]
    for tensor, (w, *fts) in iter_aligned([base, *models.values()], shared):
        measure(tensor, w, names, fts)
    done = set(shared)
    for tensor in [t for t in base.keys() if t not in done]:
        layer, module = parse_tensor_name(tensor)
        present = [m for m in names if problem(m, tensor) is None]
        for m in names:
            if m not in present:
                tensor_rows.append(model_row(m, "tensor", tensor, layer, module, numel=base.spec(tensor).numel,
                                             reason=problem(m, tensor)))
        if present:
            measure(tensor, base.get(tensor), present, [models[m].get(tensor) for m in present])
    for m in names:
        for tensor in sorted(set(shapes[m]) - set(ref)):
            layer, module = parse_tensor_name(tensor)
            tensor_rows.append(model_row(m, "tensor", tensor, layer, module, numel=models[m].spec(tensor).numel,
                                         reason="not in base"))

    tensor_rows += _aggregate_models(model_acc, names, model_row)
    pair_rows += _aggregate_pairs(pair_acc, names, pair_row)
    return tensor_rows, pair_rows


def _aggregate_models(acc: dict[tuple[str, int | None], ModelSums], names: list[str], row) -> list[dict]:
    rows = []
    for m in names:
        total = ModelSums()
        for (model, layer), sums in sorted(acc.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0)):
            if model != m:
                continue
            total.add(sums)
            if layer is not None:
                rows.append(row(m, "layer", None, layer, None, **sums.derived()))
        rows.append(row(m, "model", None, None, None, **total.derived()))
    return rows


def _aggregate_pairs(acc: dict[tuple[str, str, int | None], PairSums], names: list[str], row) -> list[dict]:
    rows = []
    for a, b in itertools.combinations(names, 2):
        total = PairSums()
        for (ma, mb, layer), sums in sorted(acc.items(), key=lambda kv: (kv[0][2] is None, kv[0][2] or 0)):
            if (ma, mb) != (a, b):
                continue
            total.add(sums)
            if layer is not None:
                rows.append(row(a, b, "layer", None, layer, None, sums))
        rows.append(row(a, b, "global", None, None, None, total))
    return rows
