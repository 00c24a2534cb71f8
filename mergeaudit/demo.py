"""The demo: tiny checkpoints in a local store and the AuditConfig that audits them.

`mergeaudit demo` calls these, then runs the audit flow. Checkpoints are reused when the
workdir already holds an intact family, so a second run audits the same fingerprints.

    family = prepare_demo(Path(".mergeaudit/demo"))
    config = demo_config(family, Path(".mergeaudit/demo"))
"""

from __future__ import annotations

from pathlib import Path

from mergeaudit.toy.models import ToyFamily, build_toy_family, load_toy_family

DEMO_VARIANTS = {"ft_a": 0.1, "ft_b": 0.2}


def prepare_demo(workdir: Path) -> ToyFamily:
    """Build (or reuse) the toy base and fine-tunes under workdir/checkpoints."""
    root = str(workdir / "checkpoints")
    family = load_toy_family(root)
    if family is None or family.variants.keys() != DEMO_VARIANTS.keys():
        family = build_toy_family(root, variants=DEMO_VARIANTS)
    return family


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
        "evaluation": {"tasks": ["mergeaudit_add2"], "limit": 50, "batch_size": 25},
        "results_uri": str(workdir / "results"),
    }
