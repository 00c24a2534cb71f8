"""mergekit YAML configs, read unchanged into a MergePlan.

Supported: `models` (each `model:` a path or store URI, with optional `parameters:`),
`base_model`, `merge_method`, `parameters` (scalars, per-layer gradient lists, `filter`
conditions), `dtype` (the compute dtype, as in mergekit), `out_dtype`, `tokenizer_source`
(`base`, `union` or one of the models) and the `tokenizer:` block with `source` (default
`union`, as in mergekit) and `pad_to_multiple_of`: the vocabulary is rebuilt as mergekit does
(see mergeaudit.merging.vocab). Refused with a clear reason: `slices`/`modules` (layer
surgery), LoRA references (`model+lora`), `tokenizer: tokens:` (per-token embedding
overrides), both `tokenizer_source` and `tokenizer:`, a tokenizer source that is not a merged
model, Hugging Face hub ids (nothing is downloaded), unknown keys, and
numbers that are not finite or lie beyond +-1e6 (a NaN weight would merge into NaNs). The file
is read with a bounded loader (mergeaudit.safe_yaml): no alias bombs, no deep nesting.

    plan = load_mergekit_config("ties.yaml", seed=0)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergeaudit import store
from mergeaudit.errors import ConfigError, MergeAuditError
from mergeaudit.merging.executor import MergePlan, ModelRef, parse_dtype
from mergeaudit.merging.params import number_problems
from mergeaudit.merging.registry import REGISTRY
from mergeaudit.merging.vocab import VocabularyPlan
from mergeaudit.safe_yaml import load_yaml

SUPPORTED_KEYS = {
    "models",
    "base_model",
    "merge_method",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
}
REFUSED = {
    "slices": "layer slices are not supported (merge whole models)",
    "modules": "modules are not supported (merge whole models)",
}
TOKENIZER_KEYS = {"source", "pad_to_multiple_of"}
IGNORED = {"chat_template", "name"}


def model_uri(ref: Any, where: str, config_dir: Path) -> str:
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: a model reference must be a path or URI, got {ref!r}")
    if "+" in ref and "://" not in ref.split("+", 1)[0]:
        raise ConfigError(f"{where}: LoRA references ({ref!r}) are not supported; merge the adapter first")
    scheme, _ = store.split_scheme(ref)
    if scheme == "file":
        path = Path(ref).expanduser()
        if not path.is_absolute():
            cwd_path = Path(os.getcwd()) / path
            path = cwd_path if cwd_path.exists() else config_dir / path
        if not path.exists():
            raise ConfigError(
                f"{where}: {ref!r} is not a local folder (Hugging Face hub ids are not downloaded; "
                "use a path or an s3:// URI)"
            )
        return str(path.absolute())
    try:
        return store.check_uri(ref)
    except MergeAuditError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def plan_from_mergekit(data: Any, config_dir: Path, seed: int = 0, device: str = "cpu") -> MergePlan:
    """A MergePlan from a parsed mergekit config; every problem reported at once."""
    if not isinstance(data, dict):
        raise ConfigError("a mergekit config is a mapping")
    problems = [f"{k}: {REFUSED[k]}" for k in data if k in REFUSED]
    unknown = sorted(set(data) - SUPPORTED_KEYS - set(REFUSED) - IGNORED)
    if unknown:
        problems.append(f"unknown keys {', '.join(unknown)} (supported: {', '.join(sorted(SUPPORTED_KEYS))})")
    method_name = data.get("merge_method")
    method = None
    if not isinstance(method_name, str):
        problems.append("merge_method is required")
    else:
        try:
            method = REGISTRY.get(method_name)
        except MergeAuditError as exc:
            problems.append(str(exc))
    base_ref = data.get("base_model")
    base = None
    if base_ref is not None:
        try:
            base = ModelRef(id=str(base_ref), uri=model_uri(base_ref, "base_model", config_dir))
        except MergeAuditError as exc:
            problems.append(str(exc))
    models: list[ModelRef] = []
    model_params: list[dict[str, Any]] = []
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        problems.append("models must be a non-empty list")
        entries = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            problems.append(f"models[{i}] needs a `model:` key")
            continue
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            problems.append(f"models[{i}]: unknown keys {', '.join(extra)}")
        # mergekit lists the base among the models; for methods that take a base it is not an input
        if base is not None and str(entry["model"]) == base.id and (method is None or method.base != "none"):
            continue
        try:
            models.append(ModelRef(id=str(entry["model"]), uri=model_uri(entry["model"], f"models[{i}]", config_dir)))
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                raise ConfigError(f"models[{i}].parameters must be a mapping")
            model_params.append(params)
        except MergeAuditError as exc:
            problems.append(str(exc))
    if base is not None and method is not None and method.base == "none" and base.id not in {m.id for m in models}:
        # mergekit merges a base_model the models do not list as one more input, with the
        # global parameters (its linear gives it `parameters.weight`)
        models.append(base)
        model_params.append({})
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        problems.append("parameters must be a mapping")
        parameters = {}
    problems += number_problems(parameters, "parameters")
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            problems += number_problems(entry.get("parameters"), f"models[{i}].parameters")
    for key in ("dtype", "out_dtype"):
        try:
            parse_dtype(data.get(key), key)
        except MergeAuditError as exc:
            problems.append(str(exc))
    vocabulary, tok_problems = vocabulary_plan(data, {m.id for m in models} | ({base.id} if base else set()))
    problems += tok_problems
    if problems:
        raise ConfigError("invalid mergekit config: " + "; ".join(problems))
    return MergePlan(
        method=method_name,
        base=base,
        models=models,
        parameters=parameters,
        model_parameters=model_params,
        compute_dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        output="computed",
        seed=seed,
        device=device,
        vocabulary=vocabulary,
    )


def vocabulary_plan(data: dict, model_ids: set[str]) -> tuple[VocabularyPlan | None, list[str]]:
    """mergekit's `tokenizer_source` or `tokenizer:` block as a VocabularyPlan, and the problems."""
    tok, block = data.get("tokenizer_source"), data.get("tokenizer")
    if tok is None and block is None:
        return None, []
    if tok is not None and block is not None:
        return None, ["tokenizer_source and tokenizer: cannot both be given (mergekit refuses them too)"]
    pad = None
    if block is not None:
        if not isinstance(block, dict):
            return None, ["tokenizer: must be a mapping"]
        problems = []
        if "tokens" in block:
            problems.append(
                "tokenizer.tokens (per-token embedding overrides) is not supported; use tokenizer.source alone"
            )
        unknown = sorted(set(block) - TOKENIZER_KEYS - {"tokens"})
        if unknown:
            problems.append(
                f"tokenizer: unknown keys {', '.join(map(str, unknown))} "
                f"(supported: {', '.join(sorted(TOKENIZER_KEYS))})"
            )
        tok, pad = block.get("source", "union"), block.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 1 <= pad <= 1 << 20):
            problems.append(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
        if problems:
            return None, problems
    if not isinstance(tok, str) or not tok:
        return None, [f"tokenizer source must be base, union or a model, got {tok!r}"]
    if tok not in ("base", "union") and tok not in model_ids:
        return None, [f"tokenizer source {tok!r} is not one of the models (base, union or a merged model)"]
    return VocabularyPlan(source=tok, pad_to_multiple_of=pad), []


def load_mergekit_config(path: str | Path, seed: int = 0, device: str = "cpu") -> MergePlan:
    """A MergePlan from a mergekit YAML file (bounded loader: see mergeaudit.safe_yaml)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    return plan_from_mergekit(load_yaml(raw, source=str(path)), path.parent.absolute(), seed=seed, device=device)
