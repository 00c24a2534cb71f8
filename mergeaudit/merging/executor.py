"""The streaming merge executor: a MergePlan, validated up front, run one tensor slot at a time.

A `MergePlan` says everything that determines a merge: method, base and models (by id and
URI), mergekit-style parameter settings, compute and output dtypes, seed, device and the
Fisher sources a method needs. `prepare` opens every checkpoint's headers, checks names and
shapes, and resolves and validates the parameters of every tensor, reporting every problem
at once, before any tensor is read. `PreparedMerge.stream()` then yields merged tensors with
memory bounded by one tensor per input plus the method's working set; `run_merge` writes them
as a sharded checkpoint with a `mergeaudit_merge.json` report of what was computed, after checking
that the output overlaps no input and replaces nothing mergeaudit did not write.

With a `vocabulary` plan (mergekit's `tokenizer_source: base | union | <model>`), every input's
vocabulary-indexed tensors are re-indexed onto the output tokenizer before the method sees them,
the output config's vocab_size is set to the output's rows and the output tokenizer is written
(see `mergeaudit.merging.vocab`); when no input's vocabulary changes, no tensor is touched.

Per tensor the report records the method's own figures (achieved density and rescale factor
for sparsifying methods, ...) and `erased`: the fraction of the merged update's nonzero entries
that the cast to the output dtype rounds back onto the base (sparse RLVR updates are often
below bf16 resolution).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
import torch

import mergeaudit
from mergeaudit import store
from mergeaudit.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    check_compatible,
    iter_aligned,
    untie_heads,
)
from mergeaudit.checkpoint.names import parse_tensor_name
from mergeaudit.checkpoint.writer import check_output
from mergeaudit.errors import ConfigError, NonFiniteError
from mergeaudit.merging.params import check_all
from mergeaudit.merging.registry import REGISTRY, MergeMethod, MethodParams, TensorSlot
from mergeaudit.merging.transfer import HostToDevice
from mergeaudit.merging.vocab import (
    Vocabulary,
    VocabularyPlan,
    build_vocabulary,
    is_vocabulary_tensor,
    promoted_dtype,
    tokenizer_files,
    with_vocab_size,
)

REPORT_FILE = "mergeaudit_merge.json"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"{what} {name!r} is not one of {', '.join(sorted(DTYPES))}") from None


class ModelRef(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    id: str
    uri: str


class MergePlan(pydantic.BaseModel):
    """Everything that determines a merge; small and serialisable (it travels between tasks)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    method: str
    base: ModelRef | None = None
    models: list[ModelRef]
    parameters: dict[str, Any] = {}
    model_parameters: list[dict[str, Any]] = []
    # None: per tensor, the promotion of its inputs' stored dtypes (mergekit without `dtype`:
    # bf16 and fp16 inputs compute in fp32, as torch.promote_types says)
    compute_dtype: str | None = "float32"
    out_dtype: str | None = None
    # without out_dtype: "stored", the reference checkpoint's dtype (audits: a merge saved like
    # its base), or "computed", the dtype the method returned (mergekit configs, as mergekit)
    output: Literal["stored", "computed"] = "stored"
    seed: int = 0
    device: str = "cpu"
    tokenizer_source: str | None = None  # a model id; default the base, else the first model
    # mergekit's tokenizer_source/tokenizer: rebuild the vocabulary (None: keep every input's)
    vocabulary: VocabularyPlan | None = None
    fisher: dict[str, str] = {}  # model id -> Fisher checkpoint URI

    def settings_for_models(self) -> list[dict[str, Any]]:
        if self.model_parameters and len(self.model_parameters) != len(self.models):
            raise ConfigError("model_parameters must have one entry per model")
        return list(self.model_parameters) or [{} for _ in self.models]


@dataclass
class PreparedMerge:
    plan: MergePlan
    method: MergeMethod
    base: Checkpoint | None
    models: list[Checkpoint]
    fisher: list[Checkpoint] | None
    params: dict[str, MethodParams]
    vocab: Vocabulary | None = None
    vocab_changes: bool = False  # some input's vocabulary-indexed rows are re-indexed
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, merged tensor on the CPU in the output dtype) in file order."""
        plan = self.plan
        compute = parse_dtype(plan.compute_dtype, "dtype")
        out_dtype = parse_dtype(plan.out_dtype, "out_dtype")
        device = torch.device(plan.device)
        to_device = HostToDevice(device)  # pinned staging on CUDA, a no-op on the CPU
        sources = ([self.base] if self.base is not None else []) + self.models + (self.fisher or [])
        ids = tuple(m.id for m in plan.models)
        keys = tuple(ck.fingerprint for ck in self.models)  # masks follow the checkpoint, not its spelling
        k = len(self.models)
        n_in = k + (self.base is not None)  # base and models; Fisher tensors follow them
        for name, tensors in iter_aligned(sources, self.reference.keys()):
            stored = self.reference.spec(name).torch_dtype
            if self.vocab_changes and is_vocabulary_tensor(name):
                tensors = self._on_output_vocabulary(tensors[:n_in], compute) + tensors[n_in:]
            work = compute or promoted_dtype(tensors[:n_in])
            tensors = [to_device(t) for t in tensors]  # models stay in their stored dtype
            base = tensors.pop(0).to(work) if self.base is not None else None
            models, fisher = tuple(tensors[:k]), (tuple(tensors[k:]) if self.fisher else None)
            slot = TensorSlot(name, base, models, ids, fisher, plan.seed, dtype=work, random_keys=keys)
            merged = self.method.fn(slot, self.params[name])
            target = out_dtype or (merged.dtype if plan.output == "computed" else stored)
            out = merged.to(target)
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteError(_non_finite_reason(name, plan.method, merged, target, slot))
            info = dict(slot.info)
            if base is not None:
                update = merged.float() - base.float()
                moved = update != 0
                stayed = out == base.to(target)
                n = int(moved.sum())
                info["erased"] = float((moved & stayed).sum()) / n if n else 0.0
                info["update_entries"] = n
            self.stats[name] = info
            yield name, out.cpu()

    def _on_output_vocabulary(self, tensors: list[torch.Tensor], compute: torch.dtype | None) -> list[torch.Tensor]:
        """Base and models' rows on the output vocabulary: cast to the compute dtype first,
        then gathered in their promoted dtype (mergekit's GatherTensors, PermutedVocabulary)."""
        plan = self.plan
        ids = ([plan.base.id] if plan.base is not None else []) + [m.id for m in plan.models]
        if compute is not None:
            tensors = [t.to(compute) for t in tensors]
        gathered = self.vocab.gather(dict(zip(ids, tensors)))  # a base also listed as a model is one input
        return [gathered[i] for i in ids]


def _non_finite_reason(name: str, method: str, merged: torch.Tensor, target: torch.dtype, slot: TensorSlot) -> str:
    """Why a merged tensor is not finite: an input already was, the method overflowed, or the
    cast to the output dtype did."""
    inputs = ([("base", slot.base)] if slot.base is not None else []) + list(zip(slot.model_ids, slot.models))
    bad = [mid for mid, t in inputs if not bool(torch.isfinite(t).all())]
    if bad:
        return f"tensor {name!r}: input {', '.join(bad)} holds NaN or infinite values; the merge would too"
    if not bool(torch.isfinite(merged).all()):
        return (
            f"tensor {name!r}: {method} produced NaN or infinite values from finite inputs "
            f"(computing in {str(merged.dtype).removeprefix('torch.')})"
        )
    return (
        f"tensor {name!r}: the {method} result overflows {str(target).removeprefix('torch.')} "
        f"(largest magnitude {float(merged.abs().max()):.3g}); choose a wider output dtype or smaller weights"
    )


def prepare(plan: MergePlan, opener: Callable[[str], Checkpoint] = Checkpoint.open) -> PreparedMerge:
    """Open headers, check shapes, resolve and validate every tensor's params; nothing is read.

    `opener` opens a checkpoint URI (a read-through cache, say)."""
    method = REGISTRY.get(plan.method)
    parse_dtype(plan.compute_dtype, "dtype")
    parse_dtype(plan.out_dtype, "out_dtype")
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {plan.device!r} was asked for but CUDA is not available")
    if method.base == "required" and plan.base is None:
        raise ConfigError(f"{plan.method} needs a base_model")
    base = opener(plan.base.uri) if plan.base is not None else None
    models = [opener(m.uri) for m in plan.models]
    # a tied base (or model) merged with checkpoints that store their own lm_head: the tied
    # ones contribute their embeddings as their head, as mergekit does
    opened = untie_heads(([base] if base is not None else []) + models)
    base, models = (opened[0], opened[1:]) if base is not None else (None, opened)
    ref = base if base is not None else models[0]
    vocab, changes = None, False
    if plan.vocabulary is not None:
        vocab, changes = _plan_vocabulary(plan, base, models)
    else:
        check_compatible(ref, [m for m in models if m is not ref])
    num_layers = ref.config.get("num_hidden_layers")
    tensors = [(n, parse_tensor_name(n)[0]) for n in ref.keys()]
    params = check_all(method, tensors, num_layers, plan.parameters, plan.settings_for_models(), base is not None)
    fisher = None
    if any(p.uses_fisher() for p in params.values()):
        missing = [m.id for m in plan.models if m.id not in plan.fisher]
        if missing:
            raise ConfigError(
                f"{plan.method} needs a diagonal Fisher for every model; none for {', '.join(missing)} "
                "(estimate one with `mergeaudit fisher`)"
            )
        if changes:
            raise ConfigError(
                f"{plan.method} weighs by Fisher information, which has no rows for a rebuilt "
                "vocabulary; merge without tokenizer_source or with one that changes nothing"
            )
        fisher = [opener(plan.fisher[m.id]) for m in plan.models]
        check_compatible(ref, fisher)
    return PreparedMerge(plan, method, base, models, fisher, params, vocab, changes)


def _plan_vocabulary(plan: MergePlan, base: Checkpoint | None, models: list[Checkpoint]) -> tuple[Vocabulary, bool]:
    """The output vocabulary, and whether any input's vocabulary-indexed tensors change; checks
    that every input's tensors match but for their vocabulary rows, and hold the rows it uses."""
    if plan.tokenizer_source is not None:
        raise ConfigError("tokenizer_source (copy a model's tokenizer) and vocabulary (rebuild it) exclude each other")
    by_id = {m.id: ck for m, ck in zip(plan.models, models, strict=True)}
    if base is not None:
        by_id[plan.base.id] = base
    order = list(dict.fromkeys([m.id for m in plan.models] + ([plan.base.id] if base is not None else [])))
    vocab = build_vocabulary(plan.vocabulary, plan.base.id if base is not None else None, order, by_id)
    ref = base if base is not None else models[0]
    names = [n for n in ref.keys() if is_vocabulary_tensor(n)]
    problems, changes = [], not vocab.identity
    for key, ck in by_id.items():
        for name in names:
            if name in ck.keys():
                shape = ck.spec(name).shape
                problems.append(vocab.check_rows(key, name, shape))
                changes = changes or shape[0] != vocab.size
    if any(problems):
        raise ConfigError("the vocabulary cannot be gathered: " + "; ".join(p for p in problems if p))

    def rowless(ck: Checkpoint) -> Checkpoint:  # vocabulary rows may differ; everything else must not
        specs = {n: ck.spec(n) for n in ck.keys()}
        specs.update({n: dataclasses.replace(specs[n], shape=(0, *specs[n].shape[1:])) for n in names if n in specs})
        return Checkpoint(ck.uri, ck.config, ck.files, specs)

    check_compatible(rowless(ref), [rowless(ck) for ck in by_id.values() if ck is not ref])
    return vocab, changes


def plan_uris(plan: MergePlan) -> list[str]:
    """Every checkpoint URI a plan reads: base, models and Fisher sources."""
    return [*([plan.base.uri] if plan.base else []), *(m.uri for m in plan.models), *plan.fisher.values()]


def run_merge(
    plan: MergePlan,
    out_uri: str,
    max_shard_bytes: int | None = None,
    *,
    overwrite: bool = False,
    protect: Iterable[str] = (),
) -> dict[str, Any]:
    """Validate, merge and write a checkpoint at out_uri; returns the report (also written).

    out_uri must not overlap an input of the plan or a `protect` URI (the config file, say),
    and an existing out_uri is replaced only when it is a previous mergeaudit output and
    `overwrite` is set (see `mergeaudit.checkpoint.writer`); both are checked before any
    checkpoint is opened. A failure leaves an old checkpoint at out_uri as it was."""
    out_uri = store.check_uri(out_uri)
    protected = [*plan_uris(plan), *protect]
    check_output(out_uri, protected, overwrite)
    prepared = prepare(plan)
    vocab = prepared.vocab
    tok_id = vocab.file_source if vocab else plan.tokenizer_source or (plan.base.id if plan.base else plan.models[0].id)
    by_id = {m.id: ck for m, ck in zip(plan.models, prepared.models, strict=True)}
    if plan.base is not None:
        by_id[plan.base.id] = prepared.base
    if tok_id not in by_id:
        raise ConfigError(f"tokenizer_source {tok_id!r} is not one of the merged models")
    out_dtype = parse_dtype(plan.out_dtype, "out_dtype")
    started = dt.datetime.now(dt.timezone.utc)
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    config = dict(prepared.reference.config)
    if out_dtype is None and plan.output == "computed" and plan.compute_dtype:
        # mergekit: the config names `dtype` (without one, the reference config's stays)
        config.pop("torch_dtype", None)
        config["dtype"] = str(parse_dtype(plan.compute_dtype, "dtype")).removeprefix("torch.")
    files = {}
    if vocab is not None:
        config = with_vocab_size(config, vocab.size)  # mergekit sets it whenever it builds a tokenizer
        if vocab.rebuilt:
            files = tokenizer_files(vocab, by_id[tok_id])
    source = None if files else by_id[tok_id]
    with CheckpointWriter(
        out_uri, source=source, config=config, dtype=out_dtype, overwrite=overwrite, protect=protected, **kwargs
    ) as writer:
        for name, data in files.items():
            writer.add_file(name, data)
        for name, tensor in prepared.stream():
            writer.add(name, tensor)
        report = merge_report(prepared, started)
        writer.add_file(REPORT_FILE, json.dumps(report, indent=2, default=str).encode())
    return report


def merge_report(prepared: PreparedMerge, started: dt.datetime) -> dict[str, Any]:
    """What was merged, how, and per tensor what the method and the output cast did."""
    plan = prepared.plan
    erased = [s["erased"] for s in prepared.stats.values() if "erased" in s]
    weights = [s.get("update_entries", 0) for s in prepared.stats.values() if "erased" in s]
    total = sum(weights)
    return {
        "mergeaudit_version": mergeaudit.__version__,
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "plan": plan.model_dump(mode="json"),
        "method_reference": prepared.method.reference,
        "inputs": {
            "base": {"uri": prepared.base.uri, "fingerprint": prepared.base.fingerprint} if prepared.base else None,
            "models": [
                {"id": m.id, "uri": ck.uri, "fingerprint": ck.fingerprint}
                for m, ck in zip(plan.models, prepared.models, strict=True)
            ],
        },
        "erased_fraction": sum(e * w for e, w in zip(erased, weights, strict=True)) / total if total else 0.0,
        "resolved_params": distinct_params(prepared.params),
        "vocabulary": prepared.vocab.report(prepared.vocab_changes) if prepared.vocab is not None else None,
        "tensors": prepared.stats,
    }


def distinct_params(params: dict[str, MethodParams]) -> list[dict[str, Any]]:
    """The distinct resolved parameter sets (gradients and filters make several), with the
    number of tensors each applies to and one of them."""
    groups: dict[str, dict[str, Any]] = {}
    for name, p in params.items():
        dumped = p.model_dump(mode="json", by_alias=True)
        key = json.dumps(dumped, sort_keys=True)
        group = groups.setdefault(key, {"params": dumped, "tensors": 0, "example": name})
        group["tensors"] += 1
    return list(groups.values())
