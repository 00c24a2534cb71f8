"""Score a model with lm-evaluation-harness and our verifiers, offline.

Tasks are our shipped packs (YAML + JSONL beside this module) or any task lm-eval knows. Every
task is resolved before any model is loaded: unknown names fail with close matches, missing
data files name their path, unset data placeholders name the setting. lm-eval resolves
relative data paths against the working directory, not the YAML, so `materialize_tasks` writes
one self-contained YAML per task into a run folder, with absolute data paths, the number of
samples per prompt, and an absolute `include:` of lm-eval's own YAML where a task extends
one; `TaskManager(include_path=<that folder>, include_defaults=False)` indexes only those.

Each task is prompted as its pack says or the settings override (`prompting`: chat template,
system prompt, instruction); tasks sharing a chat template and system prompt are evaluated
together. Scores come in two kinds: lm-eval's own metrics, and, for tasks that declare a
verifier (`metadata.mergeaudit_verifier`: numeric, math or code), our verdicts on every sampled
completion (`verdicts`: the text after the reasoning trace is verified, generations that ran
out of tokens are truncated and wrong; avg@n, pass@k, outcome counts, token lengths, the prompt
as the unit). Tasks with code are refused before generation when the sandbox's minimum
isolation is not available (`sandbox.require_isolation`).

    result = evaluate_model(model, tokenizer, ["mergeaudit_add2"], EvalSettings(limit=20))
"""

from __future__ import annotations

import difflib
import functools
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeaudit import store
from mergeaudit.errors import EvaluationError
from mergeaudit.evaluation.generation import traced_hflm_class
from mergeaudit.evaluation.prompting import Prompting, apply_prompting, require_chat_template, resolve_prompting
from mergeaudit.evaluation.sandbox import require_isolation
from mergeaudit.evaluation.settings import EvalSettings
from mergeaudit.evaluation.verdicts import verify_samples
from mergeaudit.evaluation.verifiers import Verifier
from mergeaudit.progress import quiet_progress_bars
from mergeaudit.results.stats import pass_at_k  # noqa: F401 - re-exported for callers of the runner

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
        found[name] = TaskSource(
            name,
            cfg,
            path,
            meta.get("mergeaudit_verifier"),
            meta.get("mergeaudit_program_prefix"),
            meta.get("mergeaudit_format"),
        )
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
                problems.append(
                    f"task {task.name!r} reads its {split} split from evaluation.data_files.{key}, which is not set"
                )
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
            task = TaskSource(
                task.name,
                {**task.config, "dataset_kwargs": kwargs},
                task.origin,
                task.verifier,
                task.program_prefix,
                task.answer_format,
            )
        resolved.append(task)
    if problems:
        raise EvaluationError("; ".join(problems))
    return resolved


def materialize_tasks(
    tasks: list[TaskSource], workdir: Path, num_samples: int = 1, promptings: dict[str, Prompting] | None = None
) -> Path:
    """Write one self-contained YAML per task (absolute data paths, samples per prompt, the
    prompt template and stop sequences of its prompting)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        cfg = dict(task.config)
        if promptings and task.name in promptings:
            cfg = apply_prompting(cfg, promptings[task.name], task.name)
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
    """Score an in-memory HF model through lm-eval's HFLM (the caller placed it on its device),
    recording which generations ran out of tokens (`generation.traced_hflm_class`); `run_tasks`
    checks the prompting against its tokenizer before generating."""
    tasks = check_tasks(task_names, settings.data_files)
    lm = traced_hflm_class()(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        device=settings.device,
    )
    return run_tasks(lm, tasks, settings)


def evaluate_lm(lm, task_names: list[str], settings: EvalSettings = EvalSettings()) -> EvalResult:
    """Score any lm-eval LM (an oracle in tests, a served model, ...) on the named tasks."""
    return run_tasks(lm, check_tasks(task_names, settings.data_files), settings)


def promptings_of(tasks: list[TaskSource], settings: EvalSettings) -> dict[str, Prompting]:
    return {
        t.name: resolve_prompting(
            t.name, t.config, settings.chat_template, settings.system_prompt, settings.instruction
        )
        for t in tasks
    }


def check_prompting(tasks: list[TaskSource], settings: EvalSettings, tokenizer, where: str) -> None:
    """Before any generation: chat prompting needs a chat template, instructions need templates."""
    promptings = promptings_of(tasks, settings)
    if tokenizer is not None and any(p.chat_template for p in promptings.values()):
        require_chat_template(tokenizer, where)
    for task in tasks:
        apply_prompting(task.config, promptings[task.name], task.name)


def token_counter(lm) -> Callable[[str], int] | None:
    """Tokens of a text by the model's own tokenizer (HF tokenizers), None without one."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        return None
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def generation_overrides(settings: EvalSettings) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    if settings.num_samples > 1 or settings.temperature > 0:
        gen.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    if settings.max_gen_toks:
        gen["max_gen_toks"] = settings.max_gen_toks
    return gen


def run_tasks(lm, tasks: list[TaskSource], settings: EvalSettings) -> EvalResult:
    """lm-eval's `evaluate` on the materialised tasks, then our verifiers on its samples.

    Chat template and system prompt are arguments of lm-eval's `evaluate`, not of a task, so
    tasks are evaluated in groups that share them. We call `evaluate` rather than
    `simple_evaluate`: the latter also shells out to collect pip, git and system information
    for its results header (0.3 s per call measured here, per candidate), which our runs table
    records once instead."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    if any(t.verifier == "code" for t in tasks):  # refuse before generating, not after
        require_isolation(settings.sandbox.minimum_isolation)
    check_prompting(
        tasks, settings, getattr(lm, "tokenizer", None) if hasattr(lm, "apply_chat_template") else None, "the model"
    )
    memoize_lm_eval_templates()
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    gen = generation_overrides(settings)
    promptings = promptings_of(tasks, settings)
    groups: dict[tuple[bool, str | None], list[TaskSource]] = {}
    for task in tasks:
        groups.setdefault(promptings[task.name].group, []).append(task)
    merged: dict[str, dict] = {"results": {}, "samples": {}, "n-samples": {}}
    with quiet_progress_bars(), tempfile.TemporaryDirectory(prefix="mergeaudit-tasks-") as tmp:
        for i, ((chat, system), group) in enumerate(groups.items()):
            include = materialize_tasks(group, Path(tmp) / f"group{i}", settings.num_samples, promptings)
            loaded = TaskManager(include_path=str(include), include_defaults=False).load([t.name for t in group])
            for task_obj in loaded["tasks"].values():
                if gen and task_obj.get_config("output_type") == "generate_until":
                    task_obj.set_config(key="generation_kwargs", value=gen, update=True)
                if task_obj.get_config("num_fewshot") is None:
                    task_obj.set_config(key="num_fewshot", value=0)
                task_obj.set_fewshot_seed(seed=settings.seed)
            results = evaluate(
                lm=lm,
                task_dict=loaded,
                limit=settings.limit,
                bootstrap_iters=settings.bootstrap_iters,
                log_samples=True,
                verbosity="WARNING",
                apply_chat_template=chat,
                system_instruction=system,
                fewshot_as_multiturn=chat and settings.fewshot_as_multiturn,
            )
            for key in merged:
                merged[key].update(results.get(key) or {})
    out = EvalResult(scores=score_rows(merged))
    info, count = getattr(lm, "generation_info", None), token_counter(lm)
    with Verifier(settings.math_timeout, settings.sandbox) as verifier:
        for task in tasks:
            samples, scores = verify_samples(
                task,
                merged["samples"].get(task.name, []),
                verifier,
                settings.pass_k,
                info,
                count,
                settings.think_tags,
                settings.num_samples,
            )
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
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "n": int(n) if n is not None else None,
                }
            )
    return rows
