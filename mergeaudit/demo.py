"""The demo: tiny checkpoints in a local store and the AuditConfig that audits them.

`mergeaudit demo` calls these, then runs the audit flow. The base is trained on two-digit
addition first (about 30 s on 2 cores), and the fine-tunes are sparse perturbations of it with
known density. Checkpoints are reused when the workdir holds a family built from the same
recipe, so a second run trains nothing and audits the same fingerprints.

    family = prepare_demo(Path(".mergeaudit/demo"))
    config = demo_config(family, Path(".mergeaudit/demo"))
"""

from __future__ import annotations

from pathlib import Path

from mergeaudit.toy.models import (
    ToyFamily,
    build_toy_family,
    family_recipe,
    load_toy_family,
)

DEMO_VARIANTS = {"ft_a": 0.1, "ft_b": 0.2}
DEMO_TRAIN_STEPS = 2000


def prepare_demo(workdir: Path, train_steps: int = DEMO_TRAIN_STEPS) -> ToyFamily:
    """Build (or reuse) the toy base and fine-tunes under workdir/checkpoints."""
    root = str(workdir / "checkpoints")
    recipe = family_recipe(DEMO_VARIANTS, train_steps=train_steps)
    return load_toy_family(root, recipe=recipe) or build_toy_family(root, **recipe)


def demo_config(family: ToyFamily, workdir: Path) -> dict:
    """The demo's AuditConfig as plain data (it is also written to workdir/audit.yaml)."""
    return {
        "name": "demo",
        "base": {"name": "base", "uri": family.base, "kind": "base"},
        "models": [{"name": n, "uri": u, "kind": "unknown"} for n, u in family.variants.items()],
        "strategies": [
            {"method": "linear"},
            {"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}},
        ],
        "evaluation": {"tasks": ["mergeaudit_add2"], "batch_size": 50},
        "results_uri": str(workdir / "results"),
    }
