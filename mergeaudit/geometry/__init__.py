"""Update geometry: the sparsity-curse diagnostics, streamed tensor by tensor.

For a base and N fine-tuned checkpoints, in one streaming pass over each (the base read once,
all checkpoints prefetching in step; memory holds one tensor per checkpoint plus chunk-sized
intermediates), `compute_geometry` returns two tables' rows:

- `geometry_tensors`, per model at scope `tensor`, `layer`, `module` (attention / mlp / norm /
  embedding / other, from the tensor name; `lm_head` counts as embedding) and `model`: the update
  sparsity under three definitions with counts (see `stats`; scope rows average the tensors'
  sparsities unweighted, as Mukherjee et al. do, and keep the numel-weighted figure as
  `sparsity_bf16_numel_weighted`), the norms of update and base and their ratio, the elected-sign
  disagreement (of this model's changed entries that another model changed too, the share whose
  sign differs from TIES's elected sign over all models of the audit), for 2-D tensors the
  spectral figures of `spectral` (at wider scopes the unweighted means of `update_rank_ratio`
  and `spectral_drift` over the 2-D tensors), and the overlap of the update mask with the base's principal
  weights (Zhu et al., arXiv 2511.08567: the top-`principal_alpha` entries of |U_k S_k V_k^T|),
  with its value by chance (changed * |P| / n per tensor) and the lift over chance. `kind` (rlvr,
  sft, ...) comes from the caller's config. Skipped or mismatched tensors (missing, another shape,
  another dtype than the base's: not compared, as a conversion adds spurious updates) are rows with
  a `reason`.
- `geometry_pairs`, per pair of models at scope `tensor`, `layer`, `module` and `global`:
  one-sided overlaps of the bf16 update masks and their Jaccard index, each with its value by
  chance for independent masks of the same per-tensor densities (expected overlap
  sum_t |A_t||B_t| / n_t) and the lift over chance; the sign-conflict rate on the overlap; cosine
  similarity of the updates, overall and restricted to the overlap; the ratio of their norms; and,
  where the caller gives each model's diagonal Fisher, the share of each model's Fisher mass on the
  overlap and on its exclusive entries.

The base's decomposition of each 2-D tensor (and its principal mask) is computed once and shared
by all fine-tunes.

    tensor_rows, pair_rows = compute_geometry(Checkpoint.open(base), {"math": Checkpoint.open(m)})
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Collection, Mapping

import torch

from mergeaudit.checkpoint import Checkpoint, iter_aligned
from mergeaudit.checkpoint.names import parse_tensor_name
from mergeaudit.geometry.kernels import kernel_view, masked_changes
from mergeaudit.geometry.settings import GeometrySettings
from mergeaudit.geometry.spectral import (
    Decomposition,
    decompose,
    principal_mask,
    spectral_figures,
)
from mergeaudit.geometry.stats import ModelSums, PairSums, fisher_sums, tensor_sums
from mergeaudit.updates import changed_bf16

__all__ = ["GeometrySettings", "changed_bf16", "compute_geometry", "module_type", "parse_tensor_name"]

# module type from the module path; the first match wins (norms before attention: `attn_norm`)
_MODULE_TYPES = (
    ("norm", re.compile(r"norm|(?:^|[._])ln(?:_|\d|$)")),
    ("embedding", re.compile(r"embed|wte|wpe|lm_head|tok_embeddings|(?:^|\.)output$")),
    ("attention", re.compile(r"attn|attention|(?:^|\.)(?:q|k|v|o|qkv)_proj|query|key|value|c_attn")),
    ("mlp", re.compile(r"mlp|ffn|feed_forward|(?:gate|up|down)_proj|fc\d|c_fc|dense_h_to_4h|dense_4h_to_h|experts")),
)


def module_type(module: str) -> str:
    """attention | mlp | norm | embedding | other, from a module path (`self_attn.q_proj`)."""
    for name, pattern in _MODULE_TYPES:
        if pattern.search(module):
            return name
    return "other"


def compute_geometry(
    base: Checkpoint,
    models: Mapping[str, Checkpoint],
    kinds: Mapping[str, str] | None = None,
    settings: GeometrySettings = GeometrySettings(),
    fisher: Mapping[str, Checkpoint] | None = None,
    pairs: Collection[tuple[str, str]] | None = None,
    decompositions: dict[tuple[str, str, int], Decomposition] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Rows of geometry_tensors and geometry_pairs for every model against the base; `fisher`
    (model name -> diagonal Fisher checkpoint, mergeaudit.fisher) adds the Fisher-mass columns
    to the pairs of models that both have one; `pairs` limits the pairs measured (default: all);
    `decompositions`, a dict the caller keeps, shares the base's decompositions between calls on
    the same base (keyed by base fingerprint, tensor and k), so a second call makes none again."""
    names = list(models)
    wanted = None if pairs is None else {frozenset(p) for p in pairs}
    kinds = {m: (kinds or {}).get(m, "unknown") for m in names}
    fisher = {m: ck for m, ck in (fisher or {}).items() if m in models}
    ref = base.shapes()
    shapes = {m: ck.shapes() for m, ck in models.items()}
    provenance = {m: {"model_uri": ck.uri, "model_fingerprint": ck.fingerprint} for m, ck in models.items()}
    common = {"base_uri": base.uri, "base_fingerprint": base.fingerprint}
    alpha = settings.principal_alpha if settings.spectral else None

    def problem(model: str, tensor: str) -> str | None:
        if tensor not in shapes[model]:
            return "missing in model"
        if shapes[model][tensor] != ref[tensor]:
            return f"shape {list(shapes[model][tensor])} vs base {list(ref[tensor])}"
        dtype, base_dtype = models[model].spec(tensor).dtype, base.spec(tensor).dtype
        if dtype != base_dtype:
            return f"dtype {dtype} vs base {base_dtype}: not compared"
        return None

    model_acc: dict[tuple[str, str, object], ModelSums] = defaultdict(ModelSums)
    pair_acc: dict[tuple[str, str, str, object], PairSums] = defaultdict(PairSums)
    tensor_rows: list[dict] = []
    pair_rows: list[dict] = []

    def model_row(model: str, scope: str, tensor: str | None, layer: int | None, module: str | None, **values) -> dict:
        return {
            "scope": scope,
            "model": model,
            "kind": kinds[model],
            **provenance[model],
            **common,
            "tensor": tensor,
            "layer": layer,
            "module": module,
            "reason": None,
            **values,
        }

    def pair_row(
        a: str, b: str, scope: str, tensor: str | None, layer: int | None, module: str | None, sums: PairSums
    ) -> dict:
        return {
            "scope": scope,
            "model_a": a,
            "model_b": b,
            "kind_a": kinds[a],
            "kind_b": kinds[b],
            "model_a_fingerprint": provenance[a]["model_fingerprint"],
            "model_b_fingerprint": provenance[b]["model_fingerprint"],
            **common,
            "mask": "bf16",
            "tensor": tensor,
            "layer": layer,
            "module": module,
            **sums.derived(),
        }

    def measure(tensor: str, w: torch.Tensor, present: list[str], fts: list[torch.Tensor]) -> None:
        layer, module = parse_tensor_name(tensor)
        mtype = module_type(module)
        chosen = (
            None
            if wanted is None
            else [
                (i, j)
                for i, j in itertools.combinations(range(len(present)), 2)
                if frozenset((present[i], present[j])) in wanted
            ]
        )
        sums = tensor_sums(w, fts, settings.eta, settings.abs_tol, elected_sign=settings.elected_sign, pairs=chosen)
        spectral = settings if settings.spectral and w.ndim == 2 and min(w.shape) > 1 else None
        if spectral is not None:
            w32 = w.to(settings.device).float()
            key = (base.fingerprint, tensor, spectral.k(tuple(w.shape)))
            decomposition = (decompositions or {}).get(key) or decompose(w32, key[2], spectral)
            if decompositions is not None:
                decompositions[key] = decomposition
            if alpha is not None:
                _principal_sums(w, fts, sums.models, principal_mask(decomposition, tuple(w.shape), alpha).cpu())
        for m, ft, acc in zip(present, fts, sums.models, strict=True):
            extra = {}
            if spectral is not None:  # the kernels' sum of squares tells whether the update is finite
                extra = spectral_figures(
                    w32, ft.to(settings.device).float(), decomposition, spectral, finite=math.isfinite(acc.update_sq)
                )
                acc.add_spectral(extra)
            tensor_rows.append(model_row(m, "tensor", tensor, layer, module, **{**acc.derived(alpha), **extra}))
            for key in ((m, "layer", layer), (m, "module", mtype), (m, "model", None)):
                if key[1] != "layer" or layer is not None:
                    model_acc[key].add(acc)
        with_fisher = [i for i, m in enumerate(present) if m in fisher]
        fisher_tensors = {i: fisher[present[i]].get(tensor) for i in with_fisher} if len(with_fisher) > 1 else {}
        masks = {i: changed_bf16(w, fts[i]) for i in fisher_tensors}
        for (i, j), p in sums.pairs.items():
            if i in fisher_tensors and j in fisher_tensors:
                fisher_sums(p, fisher_tensors[i], fisher_tensors[j], masks[i], masks[j])
            a, b = present[i], present[j]
            pair_rows.append(pair_row(a, b, "tensor", tensor, layer, module, p))
            for key in ((a, b, "layer", layer), (a, b, "module", mtype), (a, b, "global", None)):
                if key[2] != "layer" or layer is not None:
                    pair_acc[key].add(p)

    shared = [t for t in base.keys() if all(problem(m, t) is None for m in names)]
    for tensor, (w, *fts) in iter_aligned([base, *models.values()], shared):
        measure(tensor, w, names, fts)
    done = set(shared)
    for tensor in [t for t in base.keys() if t not in done]:
        layer, module = parse_tensor_name(tensor)
        present = [m for m in names if problem(m, tensor) is None]
        for m in names:
            if m not in present:
                tensor_rows.append(
                    model_row(
                        m, "tensor", tensor, layer, module, numel=base.spec(tensor).numel, reason=problem(m, tensor)
                    )
                )
        if present:
            measure(tensor, base.get(tensor), present, [models[m].get(tensor) for m in present])
    for m in names:
        for tensor in sorted(set(shapes[m]) - set(ref)):
            layer, module = parse_tensor_name(tensor)
            tensor_rows.append(
                model_row(m, "tensor", tensor, layer, module, numel=models[m].spec(tensor).numel, reason="not in base")
            )

    order = {"layer": 0, "module": 1, "model": 2, "global": 2}
    for (m, scope, value), acc in sorted(
        model_acc.items(), key=lambda kv: (names.index(kv[0][0]), order[kv[0][1]], str(kv[0][2]).zfill(8))
    ):
        tensor_rows.append(
            model_row(
                m,
                scope,
                None,
                value if scope == "layer" else None,
                value if scope == "module" else None,
                **acc.derived(alpha),
            )
        )

    def pair_order(kv):
        (a, b, scope, value), _ = kv
        return names.index(a), names.index(b), order[scope], str(value).zfill(8)

    for (a, b, scope, value), acc in sorted(pair_acc.items(), key=pair_order):
        pair_rows.append(
            pair_row(a, b, scope, None, value if scope == "layer" else None, value if scope == "module" else None, acc)
        )
    return tensor_rows, pair_rows


def _principal_sums(w: torch.Tensor, fts: list[torch.Tensor], accs: list[ModelSums], mask: torch.Tensor) -> None:
    """Each model's changed entries inside the base's principal mask, and that overlap by chance."""
    size, n = int(mask.sum()), mask.numel()
    mask_view = mask.reshape(-1).view(torch.uint8).numpy()
    b = kernel_view(w.reshape(-1))
    for ft, acc in zip(fts, accs, strict=True):
        acc.principal_numel += n
        acc.principal_changed += acc.changed_bf16
        acc.principal_overlap += int(masked_changes(b, kernel_view(ft.reshape(-1)), mask_view))
        acc.principal_chance += acc.changed_bf16 * size / n
