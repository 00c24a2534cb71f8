"""Evaluation: lm-eval over in-memory or served models, our verifiers (numeric, math, sandboxed
code), avg@n and pass@k, prompting as reasoning models expect, and the offline task packs we ship.

    from mergeaudit.evaluation import EvalSettings, evaluate_model
    result = evaluate_model(model, tokenizer, ["mergeaudit_add2"], EvalSettings(limit=20))
    result.scores, result.samples

The names below are loaded on first use, so `mergeaudit.config` can import the settings model
(`mergeaudit.evaluation.settings`) without loading the runner.
"""

import importlib

_EXPORTS = {
    name: "mergeaudit.evaluation.runner"
    for name in ("EvalResult", "check_tasks", "evaluate_lm", "evaluate_model", "shipped_tasks")
}
_EXPORTS.update({name: "mergeaudit.evaluation.settings" for name in ("EvalSettings", "ServerSettings")})
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
