"""The evaluation settings: `evaluation:` in an audit's YAML, and what every evaluation
function takes (one model, from the YAML to lm-eval and the verifiers).

What to score candidates on, how to prompt (chat template, system prompt, instruction), how lm-eval
samples (n samples per prompt, temperature, token budget), how completions are verified
(reasoning-trace tags, math and code deadlines, sandbox isolation), and which backend generates:
`hf` builds the candidate in this process (small models), `served` writes it to local disk and
scores it through an OpenAI-compatible server started on the worker (`vllm serve` on GPUs,
`transformers serve` on a CPU).

    settings = EvalSettings(tasks=["mergeaudit_math500_local"], chat_template=True, num_samples=16,
                            temperature=0.6, top_p=0.95, max_gen_toks=32768, backend="served")
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from mergeaudit.evaluation.sandbox import SandboxLimits
from mergeaudit.frozen import Frozen

DEVICES = ("auto", "cpu", "cuda", "mps", *(f"cuda:{i}" for i in range(8)))


def _task_choices() -> dict:
    """The form's choices for one task: a shipped task, or any lm-eval task name."""
    from mergeaudit.evaluation.runner import shipped_tasks

    return {
        "anyOf": [
            {"title": "shipped task", "type": "string", "enum": sorted(shipped_tasks())},
            {"title": "lm-eval task", "type": "string", "examples": ["gsm8k", "minerva_math500", "mbpp"]},
        ]
    }


def engine_for(engine: str, device: str) -> str:
    """The server engine `auto` stands for: vllm for a cuda device, transformers serve elsewhere."""
    if engine != "auto":
        return engine
    return "vllm" if device.startswith("cuda") else "transformers"


class ServerSettings(Frozen):
    """The OpenAI-compatible server a `served` evaluation starts on the worker, per candidate.

    `auto` values are the evaluation's to decide: `EvalSettings.served()` fills them in."""

    engine: Literal["auto", "vllm", "transformers"] = pydantic.Field(
        "auto", description="auto: vllm when evaluation.device is cuda, else transformers serve."
    )
    host: str = pydantic.Field("127.0.0.1", description="Interface the server listens on.")
    port: int = pydantic.Field(0, ge=0, le=65535, description="Port (0: a free one).")
    dtype: str = pydantic.Field("auto", description="--dtype of the server (auto: evaluation.dtype).")
    device: str = pydantic.Field(
        "auto", description="transformers serve --device (auto: evaluation.device); vllm uses CUDA_VISIBLE_DEVICES."
    )
    startup_timeout: float = pydantic.Field(900.0, gt=0, description="Seconds until the server lists the model.")
    request_timeout: float = pydantic.Field(600.0, gt=0, description="Seconds one generation request may take.")
    num_concurrent: int = pydantic.Field(8, ge=1, le=1024, description="Requests in flight at once.")
    gpu_memory_utilization: float = pydantic.Field(0.9, gt=0, le=1, description="vLLM's share of GPU memory.")
    max_model_len: int | None = pydantic.Field(None, ge=16, description="vLLM's context length (model's default).")
    extra_args: tuple[str, ...] = pydantic.Field((), description="More arguments for the server.")
    command: tuple[str, ...] | None = pydantic.Field(
        None, min_length=1, description="Replaces the engine's executable (a site's wrapper script)."
    )
    stop_timeout: float = pydantic.Field(15.0, ge=0, description="Seconds between SIGTERM and SIGKILL on exit.")

    @property
    def resolved_engine(self) -> str:
        """The engine `auto` stands for on this server's device (see `engine_for`)."""
        return engine_for(self.engine, self.device)

    @pydantic.field_validator("extra_args")
    @classmethod
    def _no_remote_code(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(a.split("=", 1)[0] == "--trust-remote-code" for a in v):
            raise ValueError("--trust-remote-code is never passed: checkpoints are untrusted")
        return v


class EvalSettings(Frozen):
    """What to score candidates on, how to prompt and sample, and how completions are verified
    (explicit batch size and max length: lm-eval's auto sizing is unreliable)."""

    tasks: list[str] = pydantic.Field(
        default_factory=lambda: ["mergeaudit_add2"],
        min_length=1,
        description="Tasks to score: a shipped task (mergeaudit_*) or any lm-eval task name (gsm8k, ...); "
        "unknown names are refused before anything runs.",
        json_schema_extra=lambda schema: schema.update(items=_task_choices()),
    )
    limit: int | None = pydantic.Field(None, ge=1, description="Documents per task (all when empty).")
    batch_size: int = pydantic.Field(16, ge=1, le=4096, description="Prompts per forward pass or request batch.")
    max_length: int = pydantic.Field(256, ge=16, description="Context length: prompt plus generated tokens.")
    device: str = pydantic.Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-7])?|mps)$",
        description="Where the model runs; cuda is the GPU the worker was given (the first of its "
        "CUDA_VISIBLE_DEVICES). auto: cuda in an audit with routing: pools (evaluations run on the GPU pool), "
        "else cpu.",
        json_schema_extra={"enum": list(DEVICES)},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = pydantic.Field(
        "auto", description="Weights' dtype while scoring: auto is bfloat16 on cuda, float32 elsewhere."
    )
    backend: Literal["hf", "served"] = pydantic.Field(
        "hf",
        description="hf: the candidate built in this process; served: an OpenAI-compatible server per "
        "candidate (see server).",
    )
    server: ServerSettings = pydantic.Field(
        default_factory=ServerSettings, description="The model server of backend: served."
    )
    chat_template: bool | None = pydantic.Field(
        None, description="Prompt through the tokenizer's chat template (empty: each task pack's default)."
    )
    system_prompt: str | None = pydantic.Field(None, description="A system turn before each problem (chat mode).")
    instruction: str | None = pydantic.Field(
        None, description="Appended to each problem (empty: the task pack's default in chat mode)."
    )
    fewshot_as_multiturn: bool = pydantic.Field(True, description="Few-shot examples as chat turns (chat mode).")
    think_tags: tuple[str, str] | None = pydantic.Field(
        ("<think>", "</think>"),
        description="Reasoning-trace delimiters: the verifier scores the text after the trace (empty: no trace).",
    )
    num_samples: int = pydantic.Field(1, ge=1, le=1024, description="Completions per prompt (avg@n, pass@k).")
    temperature: float = pydantic.Field(0.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = pydantic.Field(1.0, gt=0, le=1, description="Nucleus sampling: the probability mass sampled from.")
    max_gen_toks: int | None = pydantic.Field(None, ge=1, description="Override the tasks' generation length.")
    pass_k: tuple[int, ...] = pydantic.Field((1,), description="k values of pass@k.")
    seed: int = pydantic.Field(1234, description="Seed of sampling, few-shot choice and lm-eval.")
    bootstrap_iters: int = pydantic.Field(1000, ge=0, le=100_000, description="lm-eval's bootstrap of its stderr.")
    data_files: dict[str, str] = pydantic.Field(
        default_factory=dict, description="Local copies of benchmark data, e.g. {gsm8k: /data/gsm8k_test.jsonl}."
    )
    math_timeout: float = pydantic.Field(10.0, gt=0, description="Hard deadline of one math-verify check (s).")
    code_timeout: float = pydantic.Field(10.0, gt=0, description="Wall-clock limit of one sandboxed program (s).")
    code_isolation: Literal["bwrap", "best_effort"] = pydantic.Field(
        "bwrap",
        description="Minimum isolation for model-generated code: bwrap (default) refuses to score code "
        "unless bubblewrap runs it as an unprivileged user in its own namespaces; best_effort falls back to a "
        "weaker launcher (reported in the isolation it measured).",
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _vllm_backend(cls, data: Any) -> Any:
        """`backend: vllm` (the first round's name) is the served backend with the vllm engine;
        `device: auto` outside an audit (which resolves it by its routing) is cpu."""
        if isinstance(data, dict) and data.get("backend") == "vllm":
            data = {**data, "backend": "served", "server": {**(data.get("server") or {}), "engine": "vllm"}}
        if isinstance(data, dict) and data.get("device", "auto") == "auto":
            data = {**data, "device": "cpu"}
        return data

    @pydantic.model_validator(mode="after")
    def _sampling_ok(self) -> EvalSettings:
        problems = []
        if self.num_samples > 1 and self.temperature == 0:
            problems.append("num_samples > 1 needs temperature > 0 (greedy samples are identical)")
        bad = [k for k in self.pass_k if not 1 <= k <= self.num_samples]
        if bad:
            problems.append(f"pass_k values {bad} must lie in [1, num_samples={self.num_samples}]")
        if self.think_tags is not None and (not all(self.think_tags) or self.think_tags[0] == self.think_tags[1]):
            problems.append("think_tags are two different, non-empty strings: [open, close]")
        if self.max_gen_toks is not None and self.max_gen_toks >= self.max_length:
            problems.append(
                f"max_gen_toks={self.max_gen_toks} leaves no room for the prompt in max_length={self.max_length}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def engine(self) -> str:
        """The server engine a served evaluation starts (on the evaluation's device)."""
        return engine_for(self.server.engine, self.device)

    @property
    def torch_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    @property
    def sandbox(self) -> SandboxLimits:
        """The limits model-generated code runs under."""
        return SandboxLimits(wall_seconds=self.code_timeout, minimum_isolation=self.code_isolation)

    def served(self) -> ServerSettings:
        """The server settings with what `auto` leaves to the evaluation filled in."""
        engine, device = self.engine, self.server.device
        if device == "auto" and engine == "transformers":  # vllm takes its GPU from CUDA_VISIBLE_DEVICES
            device = self.device
        dtype = self.torch_dtype if self.server.dtype == "auto" else self.server.dtype
        return self.server.model_copy(update={"engine": engine, "dtype": dtype, "device": device})
