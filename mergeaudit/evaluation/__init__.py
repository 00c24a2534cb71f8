"""Evaluation: lm-eval over in-memory models, our verifiers, and the offline task packs we ship.

    from mergeaudit.evaluation import evaluate_model, EvalSettings
"""

from mergeaudit.evaluation.runner import (
    EvalSettings,
    check_tasks,
    evaluate_model,
    shipped_tasks,
)

__all__ = ["EvalSettings", "check_tasks", "evaluate_model", "shipped_tasks"]
