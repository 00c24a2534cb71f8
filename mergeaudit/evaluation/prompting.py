"""Prompt a model the way its authors evaluate it, and split its reasoning trace from its answer.

RLVR-trained reasoning models are evaluated through the tokenizer's chat template, with the
problem as the user turn and an instruction appended to it ("Please reason step by step, and
put your final answer within \\boxed{}."), no stop sequence but the end of the turn, and a
reasoning trace, often inside `<think>...</think>`, before the answer. A task pack states its
defaults in its YAML (`metadata.mergeaudit_prompting`):

    chat_template: true                      # use the tokenizer's chat template
    system_prompt: null                      # a system turn (None: none)
    instruction: "Please reason step by step, ..."   # appended to each problem, chat mode only
    chat_doc_to_text: "{{problem}}"          # the bare problem (no "Problem:/Solution:" scaffold)
    chat_until: []                           # stop sequences in chat mode (the turn's end only)

`evaluation.chat_template`, `system_prompt` and `instruction` override a pack's defaults (an
instruction set in the evaluation settings is appended in plain mode too). Without a chat
template the task's own prompt and stop sequences are used unchanged, as lm-eval defines them.

`split_trace(completion, ("<think>", "</think>"))` returns the trace and the text after it: the
verifier scores only the latter. A completion that closes the trace answers after its last
closing tag; one that opens a trace and never closes it has no answer; one without tags is all
answer (chat templates that open the trace themselves put only the closing tag in the
completion).

    prompting = resolve_prompting(task, settings)
    cfg = apply_prompting(task.config, prompting, task.name)
    trace, answer, closed = split_trace(text, settings.think_tags)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergeaudit.errors import EvaluationError

# DeepSeek-R1's usage recommendation for mathematical problems, the prompt Qwen2.5-Math and most
# RLVR math evaluations (SimpleRL-Zoo, DAPO, Open-Reasoner-Zero) use.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPTING_KEYS = {"chat_template", "system_prompt", "instruction", "chat_doc_to_text", "chat_until"}


@dataclass(frozen=True)
class Prompting:
    chat_template: bool = False
    system_prompt: str | None = None
    instruction: str | None = None
    doc_to_text: str | None = None  # replaces the task's prompt template (chat mode)
    until: tuple[str, ...] | None = None  # replaces the task's stop sequences (chat mode)

    @property
    def group(self) -> tuple[bool, str | None]:
        """What lm-eval takes per call, not per task: tasks are evaluated in groups of these."""
        return self.chat_template, self.system_prompt


def pack_defaults(task_name: str, config: dict[str, Any]) -> dict[str, Any]:
    meta = (config.get("metadata") or {}).get("mergeaudit_prompting") or {}
    if not isinstance(meta, dict) or set(meta) - PROMPTING_KEYS:
        raise EvaluationError(
            f"task {task_name!r}: metadata.mergeaudit_prompting takes only {', '.join(sorted(PROMPTING_KEYS))}"
        )
    return meta


def resolve_prompting(
    task_name: str,
    config: dict[str, Any],
    chat_template: bool | None,
    system_prompt: str | None,
    instruction: str | None,
) -> Prompting:
    """The pack's defaults, overridden by the evaluation settings that are set."""
    pack = pack_defaults(task_name, config)
    chat = bool(pack.get("chat_template", False)) if chat_template is None else chat_template
    if not chat:
        return Prompting(False, system_prompt, instruction)
    until = pack.get("chat_until")
    return Prompting(
        True,
        system_prompt if system_prompt is not None else pack.get("system_prompt"),
        instruction if instruction is not None else pack.get("instruction"),
        pack.get("chat_doc_to_text"),
        tuple(until) if until is not None else None,
    )


def apply_prompting(config: dict[str, Any], prompting: Prompting, task_name: str) -> dict[str, Any]:
    """The task's config with its prompt template and stop sequences set for this prompting."""
    cfg = dict(config)
    if prompting.doc_to_text is not None:
        cfg["doc_to_text"] = prompting.doc_to_text
    if prompting.instruction:
        template = cfg.get("doc_to_text")
        if type(template) is not str:  # a `!function` (a str subclass) or a list
            raise EvaluationError(
                f"task {task_name!r} builds its prompt with {template!r}, not a template: "
                f"an instruction cannot be appended to it (set evaluation.instruction: null)"
            )
        cfg["doc_to_text"] = template + "\n{% raw %}" + prompting.instruction + "{% endraw %}"
    if prompting.until is not None:
        gen = dict(cfg.get("generation_kwargs") or {})
        gen["until"] = list(prompting.until)
        cfg["generation_kwargs"] = gen
    return cfg


def split_trace(completion: str, tags: tuple[str, str] | None) -> tuple[str, str | None, bool]:
    """(trace, answer text or None, whether a trace was found)."""
    if not tags:
        return "", completion, False
    open_tag, close_tag = tags
    if close_tag in completion:
        trace, _, answer = completion.rpartition(close_tag)
        return trace.split(open_tag, 1)[-1], answer.strip(), True
    if open_tag in completion:
        return completion.split(open_tag, 1)[1], None, True  # the trace never ended
    return "", completion, False


def require_chat_template(tokenizer: Any, where: str) -> None:
    """Refuse chat-template prompting, before any generation, for a tokenizer without one."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvaluationError(
            f"evaluation.chat_template is on but the tokenizer of {where} has no chat template "
            f"(set evaluation.chat_template: false, or give the checkpoint a chat_template)"
        )
