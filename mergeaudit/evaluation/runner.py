"""Score a model with lm-evaluation-harness and our verifiers, offline.

Tasks are our shipped packs (YAML + JSONL beside this module) or any task lm-eval knows. Every
task is resolved before any model is loaded: unknown names fail with close matches, missing
data files name their path, unset data placeholders name the setting. lm-eval resolves
relative data paths against the working directory, not the YAML, so `materialize_tasks` writes
one self-contained YAML per task into a run folder, with absolute data paths, the number of
samples per prompt, and an absolute `include:` of lm-eval's own YAML where a task extends
one; `TaskManager(include_path=<that folder>, include_defaults=False)` indexes only those.

Scores come in two kinds: lm-eval's own metrics, and, for tasks that declare a verifier
(`metadata.mergeaudit_verifier`: numeric, math or code), our verdicts on every sampled
completion (from lm-eval's logged samples): mean reward, pass@k by the unbiased estimator, the
format rate and the counts of verifier errors, of timeouts (a timeout scores 0 but is counted
apart, never as a plain wrong answer; its error starts "timeout:") and, for code, of violations
(forged verdicts). Reward, pass@k and format rate take the prompt as the unit: mean per prompt,
then mean and standard error across prompts, n = prompts (mergeaudit.results.stats states the
formulas). Per-sample rows carry the prompt hash, completion, extracted answer, verdict, reward
and any error. Tasks with code are refused before generation when the sandbox's minimum
isolation is not available (`sandbox.require_isolation`).

    result = evaluate_model(model, tokenizer, ["mergeaudit_add2"], EvalSettings(limit=20))
"""

from __future__ import annotations

import difflib
import functools
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeaudit import store
from mergeaudit.errors import EvaluationError
from mergeaudit.evaluation.sandbox import SandboxLimits, require_isolation
from mergeaudit.evaluation.verifiers import Verifier
from mergeaudit.results.stats import pass_at_k, prompt_mean_stderr

TASKS_DIR = Path(__file__).parent / "tasks"
LM_EVAL_PREFIX = "lm_eval://"
_PLACEHOLDER = re.compile(r"^\$\{([A-Za-z0-9_.-]+)\}$")
# Verifiers for lm-eval's own tasks, by name prefix: (kind, program prefix field).
BUILTIN_VERIFIERS = {
    "gsm8k": ("numeric", None),
    "hendrycks_math": ("math", None),
    "minerva_math": ("math", None),
    "aime": ("math", None),
    "humaneval": ("code", "prompt"),
}


@dataclass(frozen=True)
class EvalSettings:
    """How lm-eval runs and samples (explicit batch size and max length: auto sizing is
    unreliable), and how completions are verified."""

    limit: int | None = None
    batch_size: int = 16
    max_length: int = 256
    device: str = "cpu"
    bootstrap_iters: int = 1000
    seed: int = 1234
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_gen_toks: int | None = None
    pass_k: tuple[int, ...] = (1,)
    data_files: dict[str, str] = field(default_factory=dict)
    math_timeout: float = 10.0
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)


@dataclass(frozen=True)
class TaskSource:
    name: str
    config: dict[str, Any]
    origin: Path
    verifier: str | None = None
    program_prefix: str | None = None
    answer_format: str | None = None


@dataclass
class EvalResult:
    scores: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)


class Function(str):
    """A `!function` value kept as data (never imported while we read YAML)."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))
_Dumper.add_representer(Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def load_task_yaml(path: Path) -> dict[str, Any]:
    """A shipped task YAML with our own includes inlined; `lm_eval://` includes stay includes,
    made absolute, so lm-eval resolves their `!function`s next to their own files."""
    cfg = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(cfg, dict):
        raise EvaluationError(f"{path} is not a task YAML mapping")
    includes = cfg.pop("include", [])
    merged: dict[str, Any] = {}
    lm_includes = []
    for inc in includes if isinstance(includes, list) else [includes]:
        if inc.startswith(LM_EVAL_PREFIX):
            lm_includes.append(str(lm_eval_tasks_dir() / inc.removeprefix(LM_EVAL_PREFIX)))
        else:
            merged.update(load_task_yaml(path.parent / inc))
    merged.update(cfg)
    if lm_includes:
        merged["include"] = lm_includes if len(lm_includes) > 1 else lm_includes[0]
    return merged


@functools.cache
def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def shipped_tasks(tasks_dir: Path = TASKS_DIR) -> dict[str, TaskSource]:
    """Every shipped task by name (YAML files without a `task:` key are templates)."""
    found: dict[str, TaskSource] = {}
    for path in sorted(tasks_dir.rglob("*.yaml")):
        cfg = load_task_yaml(path)
        name = cfg.get("task")
        if not isinstance(name, str):
            continue
        if name in found:
            raise EvaluationError(f"task {name!r} is defined twice: {found[name].origin} and {path}")
        meta = cfg.get("metadata") or {}
        found[name] = TaskSource(name, cfg, path, meta.get("mergeaudit_verifier"),
                                 meta.get("mergeaudit_program_prefix"), meta.get("mergeaudit_format"))
    return found


@functools.cache
def lm_eval_index() -> dict[str, Path]:
    """lm-eval's own tasks by name (indexing its ~15k YAMLs takes a few seconds, once)."""
    from lm_eval.tasks import TaskManager

    index = {}
    for name, entry in TaskManager(include_defaults=True).task_index.items():
        yaml_path = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
        if yaml_path and yaml_path != -1:
            index[name] = Path(yaml_path)
    return index


def builtin_task(name: str, yaml_path: Path) -> TaskSource:
    kind, prefix = next((v for k, v in BUILTIN_VERIFIERS.items() if name.startswith(k)), (None, None))
    return TaskSource(name, {"include": str(yaml_path), "task": name}, yaml_path, kind, prefix)


def resolve_data_files(task: TaskSource, data_files: dict[str, str], problems: list[str]) -> dict[str, str]:
    files = ((task.config.get("dataset_kwargs") or {}).get("data_files")) or {}
    if isinstance(files, str):
        files = {"test": files}
    out = {}
    for split, ref in files.items():
        m = _PLACEHOLDER.match(str(ref))
        if m:
            key = m.group(1)
            if key not in data_files:
                problems.append(f"task {task.name!r} reads its {split} split from evaluation.data_files.{key}, "
                                f"which is not set")
                continue
            ref = data_files[key]
            scheme, _ = store.split_scheme(ref)
            if scheme != "file":
                out[split] = ref  # fetched into the run folder by materialize_tasks
                continue
            path = Path(ref).expanduser().absolute()
        else:
            path = (task.origin.parent / ref).resolve()
        if not path.is_file():
            problems.append(f"task {task.name!r}: data file {path} is missing")
        out[split] = str(path)
    return out


def check_tasks(names: list[str], data_files: dict[str, str] | None = None) -> list[TaskSource]:
    """The tasks named, with data files resolved; every problem at once, before any model."""
    known = shipped_tasks()
    problems: list[str] = []
    resolved = []
    for name in names:
        if name in known:
            task = known[name]
        else:
            index = lm_eval_index()
            if name not in index:
                close = difflib.get_close_matches(name, list(known) + list(index), n=3, cutoff=0.6)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                problems.append(f"unknown task {name!r}{hint}; shipped tasks: {', '.join(sorted(known))}")
                continue
            task = builtin_task(name, index[name])
        files = resolve_data_files(task, data_files or {}, problems)
        if files:
            kwargs = dict(task.config.get("dataset_kwargs") or {})
            kwargs["data_files"] = files
            task = TaskSource(task.name, {**task.config, "dataset_kwargs": kwargs}, task.origin, task.verifier,
                              task.program_prefix, task.answer_format)
        resolved.append(task)
    if problems:
        raise EvaluationError("; ".join(problems))
    return resolved


def materialize_tasks(tasks: list[TaskSource], workdir: Path, num_samples: int = 1) -> Path:
    """Write one self-contained YAML per task (absolute data paths, samples per prompt)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        cfg = dict(task.config)
        kwargs = cfg.get("dataset_kwargs") or {}
        files = dict(kwargs.get("data_files") or {})
        for split, ref in files.items():
            if store.split_scheme(ref)[0] != "file":
                local = workdir / "data" / task.name / f"{split}{Path(ref).suffix or '.jsonl'}"
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(store.read_bytes(ref))
                files[split] = str(local)
        if files:
            cfg["dataset_kwargs"] = {**kwargs, "data_files": files}
        if num_samples > 1:
            cfg["repeats"] = num_samples
        (workdir / f"{task.name}.yaml").write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False))
    return workdir


def evaluate_model(model, tokenizer, task_names: list[str], settings: EvalSettings = EvalSettings()) -> EvalResult:
    """Score an in-memory HF model through lm-eval's HFLM (the caller placed it on its device)."""
    tasks = check_tasks(task_names, settings.data_files)
    from lm_eval.models.huggingface import HFLM  # heavy import, kept off the library's import path

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
              max_length=settings.max_length, device=settings.device)
    return run_tasks(lm, tasks, settings)


def evaluate_lm(lm, task_names: list[str], settings: EvalSettings = EvalSettings()) -> EvalResult:
    """Score any lm-eval LM (an oracle in tests, vLLM, ...) on the named tasks."""
    return run_tasks(lm, check_tasks(task_names, settings.data_files), settings)


def generation_overrides(settings: EvalSettings) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    if settings.num_samples > 1 or settings.temperature > 0:
        gen.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    if settings.max_gen_toks:
        gen["max_gen_toks"] = settings.max_gen_toks
    return gen


def run_tasks(lm, tasks: list[TaskSource], settings: EvalSettings) -> EvalResult:
    """lm-eval's `evaluate` on the materialised tasks, then our verifiers on its samples.

    We call `evaluate` rather than `simple_evaluate`: the latter also shells out to collect
    pip, git and system information for its results header (0.3 s per call measured here,
    per candidate), which our runs table records once instead."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    if any(t.verifier == "code" for t in tasks):  # refuse before generating, not after
        require_isolation(settings.sandbox.minimum_isolation)
    memoize_lm_eval_templates()
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    gen = generation_overrides(settings)
    with tempfile.TemporaryDirectory(prefix="mergeaudit-tasks-") as tmp:
        include = materialize_tasks(tasks, Path(tmp), settings.num_samples)
        loaded = TaskManager(include_path=str(include), include_defaults=False).load([t.name for t in tasks])
        for task_obj in loaded["tasks"].values():
            if gen and task_obj.get_config("output_type") == "generate_until":
                task_obj.set_config(key="generation_kwargs", value=gen, update=True)
            if task_obj.get_config("num_fewshot") is None:
                task_obj.set_config(key="num_fewshot", value=0)
            task_obj.set_fewshot_seed(seed=settings.seed)
        results = evaluate(lm=lm, task_dict=loaded, limit=settings.limit, bootstrap_iters=settings.bootstrap_iters,
                           log_samples=True, verbosity="WARNING")
    out = EvalResult(scores=score_rows(results))
    with Verifier(settings.math_timeout, settings.sandbox) as verifier:
        for task in tasks:
            if task.verifier is None:
                continue
            samples, scores = verify_samples(task, results["samples"].get(task.name, []), verifier, settings.pass_k)
            out.samples += samples
            out.scores += scores
    return out


def memoize_lm_eval_templates() -> None:
    """Compile each prompt template once. lm-eval 0.4.13's `utils.apply_template` compiles the
    Jinja template again for every document and field (measured: 40% of the time outside
    generation on the shipped tasks); rendering is unchanged. Installed once per process."""
    import lm_eval.utils as lm_utils

    if getattr(lm_utils.apply_template, "_mergeaudit_memoized", False):
        return
    compile_template = functools.lru_cache(maxsize=512)(lm_utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_template(template).render(**doc)

    apply_template._mergeaudit_memoized = True
    lm_utils.apply_template = apply_template


def score_rows(results: dict) -> list[dict]:
    """lm-eval's aggregate metrics as (task, metric, filter, value, stderr, n) rows."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        n = (n_samples.get(task) or {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": int(n) if n is not None else None})
    return rows


def verify_samples(task: TaskSource, logged: list[dict], verifier: Verifier,
                   pass_k: tuple[int, ...]) -> tuple[list[dict], list[dict]]:
    """Verdicts on every completion of a task, and the aggregate score rows."""
    samples, rewards, per_doc, formats, errors = [], [], [], [], 0  # rewards, formats: one list per prompt
    counts = {"timeout": 0, "violation": 0}
    metric = {"numeric": "numeric_match", "math": "math_verify", "code": "code_pass"}[task.verifier]
    for entry in logged:
        completions = [str(c) for c in (entry.get("resps") or [[]])[0]]
        reference = str(entry.get("target"))
        prefix = str(entry["doc"].get(task.program_prefix, "")) if task.program_prefix else ""
        correct = 0
        rewards.append([])
        formats.append([])
        for i, completion in enumerate(completions):
            v = verifier.verify(task.verifier, completion, reference, task.answer_format, prefix)
            correct += v.correct
            rewards[-1].append(v.reward)
            errors += v.error is not None
            if v.status in counts:
                counts[v.status] += 1
            if v.format_ok is not None:
                formats[-1].append(1.0 if v.format_ok else 0.0)
            samples.append({"task": task.name, "doc_id": int(entry["doc_id"]), "sample": i,
                            "prompt_hash": entry.get("prompt_hash"), "completion": completion,
                            "extracted": v.extracted, "verdict": v.correct, "reward": v.reward,
                            "format_ok": v.format_ok, "error": v.error, "verifier": task.verifier,
                            "status": v.status})
        per_doc.append((len(completions), correct))
    if not samples:
        return [], []
    scores = []

    def row(name: str, per_prompt: list[list[float]]) -> None:
        # the prompt is the unit: mean per prompt, then mean and standard error across prompts
        per_prompt = [xs for xs in per_prompt if xs]
        mean, stderr = prompt_mean_stderr(per_prompt)
        scores.append({"task": task.name, "metric": name, "filter": "verifier", "value": mean,
                       "stderr": stderr, "n": len(per_prompt)})

    row(metric, rewards)
    for k in pass_k:
        if all(n >= k for n, _ in per_doc):  # pass@k of a prompt with fewer than k samples is undefined
            row(f"pass@{k}", [[pass_at_k(n, c, k)] for n, c in per_doc])
    if any(formats):
        row("format_rate", formats)
    scores.append({"task": task.name, "metric": "verifier_errors", "filter": "verifier", "value": float(errors),
                   "stderr": None, "n": len(samples)})
    # Counted apart (they are also errors): a timeout is not a wrong answer, a violation is a forgery.
    scores.append({"task": task.name, "metric": "verifier_timeouts", "filter": "verifier",
                   "value": float(counts["timeout"]), "stderr": None, "n": len(samples)})
    if task.verifier == "code":
        scores.append({"task": task.name, "metric": "code_violations", "filter": "verifier",
                       "value": float(counts["violation"]), "stderr": None, "n": len(samples)})
    return samples, scores
