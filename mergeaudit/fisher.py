"""Diagonal empirical Fisher of a checkpoint on a calibration set, stored and cached.

For each calibration example (a JSONL row with `prompt` and `response`: a reference answer or
a response a verifier accepted), the log-likelihood of the response given the prompt is
differentiated, one example at a time, and the squared gradients are averaged:
F = mean_x (d/dtheta log p(response | prompt))^2, the diagonal of the empirical Fisher.

The result is written as a checkpoint-shaped folder (config.json, model.safetensors in fp32
with the model's tensor names, fisher.json with its provenance) under
`CACHE_URI/<model fingerprint>-<calibration and settings digest>/`, so a model's Fisher is
computed once per checkpoint version and calibration set, and read by the merge executor with
the same streaming reader as any checkpoint.

    settings = FisherSettings(calibration="calib.jsonl", cache_uri="s3://audits/fisher")
    uri = estimate_fisher("s3://ckpts/rl-math", settings)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pydantic
import torch

import mergeaudit
from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, CheckpointWriter, check_complete
from mergeaudit.errors import ConfigError, MergeAuditError
from mergeaudit.fields import StoreURI
from mergeaudit.frozen import Frozen
from mergeaudit.modeling import build_model, load_tokenizer

META_FILE = "fisher.json"
log = logging.getLogger(__name__)


class FisherSettings(Frozen):
    """How the diagonal Fisher of a model is estimated (`fisher:` in an audit's YAML; the fisher
    and sar merge methods need it)."""

    calibration: StoreURI = pydantic.Field(description="JSONL of {prompt, response} rows (path or store URI).")
    max_examples: int = pydantic.Field(64, ge=1, description="Calibration rows used (the first ones).")
    max_length: int = pydantic.Field(256, ge=8, description="Tokens of prompt plus response kept (the last ones).")
    cache_uri: StoreURI | None = pydantic.Field(
        None, description="Where Fisher checkpoints are cached (in an audit, default RESULTS/fisher)."
    )
    device: str | None = pydantic.Field(
        None,
        pattern=r"^(cpu|cuda(:\d+)?|mps)$",
        description="Where gradients are computed (default: evaluation.device in an inline audit, else cpu).",
    )


def read_calibration(uri: str, limit: int) -> list[dict[str, str]]:
    """Validated calibration rows; every problem at once, before any model is loaded."""
    try:
        text = store.read_bytes(store.check_uri(uri)).decode()
    except (UnicodeDecodeError, MergeAuditError) as exc:
        raise ConfigError(f"calibration file {uri}: {exc}") from None
    rows, problems = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {i}: not JSON ({exc.msg})")
            continue
        if not (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("response"), str)
            and row["response"]
        ):
            problems.append(f"line {i}: needs string fields prompt and (non-empty) response")
            continue
        rows.append({"prompt": row["prompt"], "response": row["response"]})
    if problems:
        raise ConfigError(f"calibration file {uri}: " + "; ".join(problems[:10]))
    if not rows:
        raise ConfigError(f"calibration file {uri} has no examples")
    return rows[:limit]


def fisher_key(ck: Checkpoint, rows: list[dict[str, str]], settings: FisherSettings) -> str:
    h = hashlib.sha256(json.dumps([rows, settings.max_length, mergeaudit.__version__]).encode()).hexdigest()
    return f"{ck.fingerprint}-{h[:16]}"


def compute_fisher(model, tokenizer, rows: list[dict[str, str]], settings: FisherSettings) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradients of the response log-likelihood, per parameter."""
    params = {n: p for n, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    model.eval()  # no dropout: the Fisher of the deployed model
    used = 0
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response = response + [tokenizer.eos_token_id]
        ids = (prompt + response)[-settings.max_length :]
        n_resp = min(len(response), len(ids) - 1)
        if n_resp <= 0:
            continue
        input_ids = torch.tensor([ids], device=settings.device or "cpu")
        labels = input_ids.clone()
        labels[:, : len(ids) - n_resp] = -100
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=labels).loss * n_resp  # -log p(response | prompt)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n].add_(p.grad.float().square())
        used += 1
    if used == 0:
        raise ConfigError("no calibration example has a response token within max_length")
    model.zero_grad(set_to_none=True)
    return {n: (a / used).cpu() for n, a in acc.items()}


def estimate_fisher(
    model_uri: str, settings: FisherSettings, opener: Callable[[str], Checkpoint] = Checkpoint.open
) -> str:
    """The Fisher checkpoint of a model (computed, or found in `settings.cache_uri`); returns
    its URI. `opener` opens the model (through a read-through checkpoint cache, say)."""
    if settings.cache_uri is None:
        raise ConfigError("FisherSettings.cache_uri is needed: where the Fisher checkpoints are cached")
    ck = opener(model_uri)
    rows = read_calibration(settings.calibration, settings.max_examples)
    out = store.join(settings.cache_uri, fisher_key(ck, rows, settings))
    if check_complete(out).complete:
        log.info("Fisher of %s found in the cache at %s", ck.uri, out)
        return out
    with torch.enable_grad():
        model = build_model(ck.config, ck.iter_tensors(), device=settings.device or "cpu", dtype=torch.float32)
        fisher = compute_fisher(model, load_tokenizer(ck.uri), rows, settings)
    del model
    meta = {
        "model_uri": ck.uri,
        "model_fingerprint": ck.fingerprint,
        "calibration_uri": settings.calibration,
        "examples": len(rows),
        "max_length": settings.max_length,
        "estimator": "empirical diagonal Fisher, per-example gradients of the response log-likelihood",
        "mergeaudit_version": mergeaudit.__version__,
    }
    # out is this cache's own entry: a leftover of a killed write may be replaced
    with CheckpointWriter(out, config=ck.config, dtype=torch.float32, overwrite=True) as writer:
        for name in ck.keys():
            if name in fisher:
                writer.add(name, fisher[name])
        writer.add_file(META_FILE, json.dumps(meta, indent=2).encode())
    return out


def calibration_from_problems(problems: list[dict[str, str]], path: Path) -> Path:
    """Write verifiable problems ({question, answer}) as a calibration JSONL (demo and tests)."""
    with open(path, "w") as fh:
        for p in problems:
            fh.write(json.dumps({"prompt": p["question"], "response": p["answer"]}) + "\n")
    return path
