"""Score an in-memory model with lm-evaluation-harness on our shipped offline task packs.

The task packs live beside this module as lm-eval YAML + JSONL. lm-eval resolves relative data
paths against the working directory, not the YAML, so `materialize_tasks` writes, into a run
folder, one small YAML per task that includes the shipped one and names its data files by
absolute path. `TaskManager(include_path=<that folder>, include_defaults=False)` then indexes
only our tasks, in about no time and without the network.

    scores = evaluate_model(model, tokenizer, ["mergeaudit_add2"], EvalSettings(limit=20))
"""

from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergeaudit.errors import EvaluationError

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class EvalSettings:
    """How lm-eval runs: explicit batch size and max length (auto sizing is unreliable)."""

    limit: int | None = None
    batch_size: int = 16
    max_length: int = 256
    device: str = "cpu"
    bootstrap_iters: int = 1000
    seed: int = 1234


@dataclass(frozen=True)
class ShippedTask:
    name: str
    yaml_path: Path
    data_files: dict[str, Path]


class _TolerantLoader(yaml.SafeLoader):
    """Reads our task YAMLs as data: `!function` tags stay strings, nothing is imported."""


_TolerantLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def shipped_tasks(tasks_dir: Path = TASKS_DIR) -> dict[str, ShippedTask]:
    """Every task YAML under tasks_dir, by task name, with its data files resolved."""
    found: dict[str, ShippedTask] = {}
    for path in sorted(tasks_dir.rglob("*.yaml")):
        cfg = yaml.load(path.read_text(), Loader=_TolerantLoader)  # noqa: S506 - safe subclass
        name = cfg.get("task") if isinstance(cfg, dict) else None
        if not isinstance(name, str):
            continue
        if name in found:
            raise EvaluationError(f"task {name!r} is defined twice: {found[name].yaml_path} and {path}")
        files = ((cfg.get("dataset_kwargs") or {}).get("data_files")) or {}
        if isinstance(files, str):
            files = {"test": files}
        found[name] = ShippedTask(name, path, {split: (path.parent / f).resolve() for split, f in files.items()})
    return found


def check_tasks(names: list[str]) -> list[ShippedTask]:
    """The shipped tasks named; unknown names and missing data files fail here, all at once."""
    known = shipped_tasks()
    problems = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; known tasks: {', '.join(sorted(known))}"
            problems.append(f"unknown task {name!r}{hint}")
            continue
        for path in known[name].data_files.values():
            if not path.is_file():
                problems.append(f"task {name!r}: data file {path} is missing")
    if problems:
        raise EvaluationError("; ".join(problems))
    return [known[n] for n in names]


def materialize_tasks(tasks: list[ShippedTask], workdir: Path) -> Path:
    """Write one including YAML per task with absolute data paths; returns the folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        cfg = {
            "include": str(task.yaml_path),
            "task": task.name,
            "dataset_kwargs": {"data_files": {k: str(v) for k, v in task.data_files.items()}},
        }
        (workdir / f"{task.name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return workdir


def evaluate_model(model, tokenizer, task_names: list[str], settings: EvalSettings = EvalSettings()) -> list[dict]:
    """Score an in-memory HF model through lm-eval's HFLM; see `evaluate_lm` for the rows.

    The caller places the model on its device; we pass the device along so inputs follow it.
    """
    check_tasks(task_names)
    from lm_eval.models.huggingface import (
        HFLM,  # heavy import, kept off the library's import path
    )

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        device=settings.device,
    )
    return evaluate_lm(lm, task_names, settings)


def evaluate_lm(lm, task_names: list[str], settings: EvalSettings = EvalSettings()) -> list[dict]:
    """Run lm-eval's simple_evaluate for any lm-eval LM on our shipped tasks.

    Returns one row per (task, metric): task, metric, filter, value, stderr, n.
    """
    tasks = check_tasks(task_names)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="mergeaudit-tasks-") as tmp:
        include = materialize_tasks(tasks, Path(tmp))
        manager = TaskManager(include_path=str(include), include_defaults=False)
        results = simple_evaluate(
            model=lm,
            tasks=[t.name for t in tasks],
            task_manager=manager,
            limit=settings.limit,
            bootstrap_iters=settings.bootstrap_iters,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
            log_samples=False,
        )
    return score_rows(results)


def score_rows(results: dict) -> list[dict]:
    """Flatten lm-eval's results dict to (task, metric, filter, value, stderr, n) rows."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        n = (n_samples.get(task) or {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or key == "alias":
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({
                "task": task,
                "metric": metric,
                "filter": filt,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": int(n) if n is not None else None,
            })
    return rows
