"""Evaluation: lm-eval over in-memory models, our verifiers (numeric, math, sandboxed code),
pass@k, and the offline task packs we ship.

    from mergeaudit.evaluation import EvalSettings, evaluate_model
    result = evaluate_model(model, tokenizer, ["mergeaudit_add2"], EvalSettings(limit=20))
    result.scores, result.samples
"""

from mergeaudit.evaluation.runner import (
    EvalResult,
    EvalSettings,
    check_tasks,
    evaluate_lm,
    evaluate_model,
    shipped_tasks,
)

__all__ = ["EvalResult", "EvalSettings", "check_tasks", "evaluate_lm", "evaluate_model", "shipped_tasks"]
