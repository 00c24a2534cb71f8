"""Score a checkpoint folder through an OpenAI-compatible server started on this worker.

`serve` starts `vllm serve` (GPU workers) or `transformers serve` (CPU, tests) on the folder in
its own session, waits until `/v1/models` lists it, and on exit stops the whole process tree
(SIGTERM, then SIGKILL). The server gets our environment minus credentials, offline.
`served_lm` wraps the endpoint in lm-eval's API models; `evaluate_served` does both around
`run_tasks`, so a served candidate is scored by the same runner and verifiers as an in-process
one. Why a server: one client for vLLM on a GPU and transformers on a CPU, and the engine's
process tree gives its GPU memory back when it exits.

Our API models add to lm-eval's: a distinct, reproducible seed per request, from (seed, prompt,
how often that prompt was sent), since lm-eval sends one seed with every request and vLLM
honours it (n samples of a prompt would be identical); stop sequences cut here too
(transformers serve keeps them in the text); `generation_info` per returned text.

    settings = EvalSettings(limit=20)
    result = evaluate_served("/ckpt", ["mergeaudit_add2"], settings, ServerSettings(engine="vllm"))

    with serve("/ckpt", ServerSettings(device="cpu")) as endpoint:
        lm = served_lm(endpoint, "/ckpt", settings, ServerSettings(device="cpu"))
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeaudit.errors import EvaluationError, ServerStartError
from mergeaudit.evaluation.generation import GenerationInfo
from mergeaudit.evaluation.runner import EvalResult, check_tasks, run_tasks
from mergeaudit.evaluation.settings import EvalSettings, ServerSettings

# Environment variables a served model never needs (matched on the upper-cased name).
SECRET_ENV_PATTERNS = ("AWS_*", "*_SECRET*", "*_TOKEN*", "*PASSWORD*", "*KEY*")
INSTALL_HINTS = {"vllm": "pip install vllm (GPU workers)", "transformers": "pip install 'transformers[serving]'"}
LOG_TAIL_LINES = 20
POLL_S = 0.25


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:PORT/v1
    model: str  # the served model id (the checkpoint's absolute path)
    pid: int
    log_path: str


def server_command(checkpoint_dir: str, settings: ServerSettings, port: int, seed: int) -> list[str]:
    """The server's argv; the served model id is the checkpoint's absolute path."""
    model = os.path.abspath(checkpoint_dir)
    exe = list(settings.command) if settings.command else [executable(settings.resolved_engine)]
    common = ["serve", model, "--host", settings.host, "--port", str(port), "--dtype", settings.dtype]
    if settings.resolved_engine == "vllm":
        args = common + [
            "--served-model-name",
            model,
            "--seed",
            str(seed),
            "--gpu-memory-utilization",
            str(settings.gpu_memory_utilization),
        ]
        if settings.max_model_len:
            args += ["--max-model-len", str(settings.max_model_len)]
        # sampling comes from each request only, never from the model's generation_config.json
        args += ["--generation-config", "vllm"]
    else:
        args = common + ["--device", settings.device, "--default-seed", str(seed), "--log-level", "warning"]
    return exe + args + list(settings.extra_args)


def executable(engine: str) -> str:
    """The engine's CLI next to our interpreter (the venv's) when there is one, else on PATH."""
    local = Path(sys.executable).parent / engine
    return str(local) if local.exists() else (shutil.which(engine) or engine)


def server_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment minus credentials, offline (the checkpoint is a local folder)."""
    env = {
        k: v
        for k, v in (os.environ if environ is None else environ).items()
        if not any(fnmatch.fnmatchcase(k.upper(), p) for p in SECRET_ENV_PATTERNS)
    }
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@contextlib.contextmanager
def serve(checkpoint_dir: str, settings: ServerSettings = ServerSettings(), seed: int = 1234) -> Iterator[Endpoint]:
    """A server on the checkpoint, ready, for the duration of the block; then none, whatever
    happened (its whole process group is stopped and its log folder removed)."""
    model = os.path.abspath(checkpoint_dir)
    if not os.path.isdir(model):
        raise ServerStartError(f"checkpoint folder {model} does not exist")
    port = settings.port or free_port(settings.host)
    argv = server_command(model, settings, port, seed)
    logdir = tempfile.mkdtemp(prefix="mergeaudit-serve-")
    log_path = os.path.join(logdir, "server.log")
    what = f"the {settings.resolved_engine} server for {model}"
    proc = None
    try:
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=server_env(),
                    start_new_session=True,
                )
            except (FileNotFoundError, PermissionError) as exc:
                hint = (
                    f"the configured command {argv[0]!r} cannot be run"
                    if settings.command
                    else f"{argv[0]!r} is not installed here; install it with {INSTALL_HINTS[settings.resolved_engine]}"
                )
                raise ServerStartError(f"cannot start {what}: {hint} ({exc.strerror})") from None
        client_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
        netloc = f"[{client_host}]" if ":" in client_host else client_host
        endpoint = Endpoint(f"http://{netloc}:{port}/v1", model, proc.pid, log_path)
        wait_ready(proc, endpoint, settings.startup_timeout, what)
        try:
            yield endpoint
        except Exception as exc:
            if proc.poll() is not None:  # the server died under the caller: say so, with its log
                raise EvaluationError(
                    f"{what} exited with code {proc.returncode} while in use; last lines "
                    f"of its log:\n{log_tail(log_path)}"
                ) from exc
            raise
    finally:
        if proc is not None:
            stop(proc, settings.stop_timeout)
        shutil.rmtree(logdir, ignore_errors=True)


def wait_ready(proc: subprocess.Popen, endpoint: Endpoint, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{what} exited with code {proc.returncode} before it was ready; last lines "
                f"of its log:\n{log_tail(endpoint.log_path)}"
            )
        if lists_model(endpoint, min(2.0, max(0.1, deadline - time.monotonic()))):
            return
        if time.monotonic() >= deadline:
            raise ServerStartError(
                f"{what} did not become ready within {timeout:g} s; last lines of its "
                f"log:\n{log_tail(endpoint.log_path)}"
            )
        time.sleep(POLL_S)


def lists_model(endpoint: Endpoint, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint.base_url}/models", timeout=timeout) as response:
            listed = json.load(response).get("data") or []
    except (OSError, ValueError, AttributeError):  # not listening yet, not JSON yet, not a mapping
        return False
    return any(isinstance(m, dict) and m.get("id") == endpoint.model for m in listed)


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the server's process group, up to `grace` s for it to exit, then SIGKILL to
    whatever is left of the group (workers included), so nothing outlives the block."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # start_new_session: the server leads its own group
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def request_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of the `index`-th request of a prompt: distinct per repeat, the same in every
    run, below 2**31 (every server takes it)."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


@functools.cache
def served_lm_classes() -> tuple[type, type]:
    """lm-eval's completions and chat API models with our seeds, stop handling and
    `generation_info` (built lazily: lm-eval's import costs seconds)."""
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI
    from lm_eval.models.utils import postprocess_generated_text

    class Served:
        def __init__(self, *args: Any, engine: str, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.engine = engine
            self.generation_info: dict[str, GenerationInfo] = {}
            self.sent: collections.Counter[str] = collections.Counter()

        @property
        def api_key(self) -> str:
            return ""  # lm-eval would send $OPENAI_API_KEY to our local server

        def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kwargs):
            payload = super()._create_payload(
                messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos, **kwargs
            )
            if generate:
                prompt = messages if isinstance(messages, str) else json.dumps(messages, sort_keys=True)
                payload["seed"] = request_seed(self._seed, prompt, self.sent[prompt])
                self.sent[prompt] += 1
                if not payload.get("stop"):
                    payload.pop("stop", None)  # transformers serve answers 500 to an empty list
                if self.engine == "transformers" and payload.get("temperature"):
                    # transformers serve samples only if the model's generation config says so;
                    # top_k 0 as vLLM's default (HF's default is 50)
                    payload["generation_config"] = json.dumps({"do_sample": True, "top_k": 0})
            return payload

        def parse_generations(self, outputs, **kwargs) -> list[str]:
            texts = super().parse_generations(outputs=outputs, **kwargs)
            pos = 0
            for out in outputs if isinstance(outputs, list) else [outputs]:
                choices = sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))
                tokens = (out.get("usage") or {}).get("completion_tokens") if len(choices) == 1 else None
                for choice in choices:
                    if pos < len(texts) and texts[pos] is not None:
                        self.generation_info[texts[pos]] = GenerationInfo(
                            truncated=choice.get("finish_reason") == "length", tokens=tokens
                        )
                    pos += 1
            return texts

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            texts = super().generate_until(requests, disable_tqdm=disable_tqdm)
            out = []
            for request, text in zip(requests, texts, strict=True):
                cut = postprocess_generated_text(text, (request.args[1] or {}).get("until"), None)
                if cut != text:  # the server kept a stop sequence, so it stopped there
                    info = self.generation_info.get(text)
                    self.generation_info[cut] = GenerationInfo(truncated=False, tokens=info.tokens if info else None)
                out.append(cut)
            return out

    class ServedChat(Served, LocalChatCompletion):
        """Messages on /v1/chat/completions; the server applies the model's chat template."""

    class ServedCompletions(Served, LocalCompletionsAPI):
        """Plain prompts on /v1/completions. Chat prompts (a JsonChatStr: lm-eval's API models
        leave templating to the server), from tasks whose pack prompts with a chat template,
        go to `self.chat`, a ServedChat on the same server."""

        chat: ServedChat | None = None

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            is_chat = [isinstance(r.args[0], JsonChatStr) for r in requests]
            if not any(is_chat) or self.chat is None:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            chats = iter(self.chat.generate_until([r for r, c in zip(requests, is_chat) if c], disable_tqdm))
            plain = [r for r, c in zip(requests, is_chat) if not c]
            plains = iter(super().generate_until(plain, disable_tqdm=disable_tqdm) if plain else [])
            self.generation_info.update(self.chat.generation_info)
            return [next(chats) if c else next(plains) for c in is_chat]

    return ServedCompletions, ServedChat


def served_lm(endpoint: Endpoint, tokenizer_dir: str, settings: EvalSettings, server: ServerSettings):
    """An lm-eval LM on the endpoint: chat completions when `settings.chat_template`, else
    completions (with chat completions for tasks whose pack asks for a chat template). Prompts go
    as text, one per request (transformers serve takes nothing else), `num_concurrent` at a time."""
    completions, chat = served_lm_classes()
    sampling = settings.num_samples > 1 or settings.temperature > 0
    # transformers serve seeds its process-wide torch RNG when a request arrives and generates
    # on one thread: concurrent sampled requests would draw from each other's seeds
    concurrent = 1 if server.resolved_engine == "transformers" and sampling else server.num_concurrent
    kwargs: dict[str, Any] = {"max_gen_toks": settings.max_gen_toks} if settings.max_gen_toks else {}
    kwargs.update(
        engine=server.resolved_engine,
        model=endpoint.model,
        tokenizer_backend="huggingface",
        tokenizer=tokenizer_dir,
        tokenized_requests=False,
        batch_size=1,
        num_concurrent=concurrent,
        max_length=settings.max_length,
        timeout=max(1, math.ceil(server.request_timeout)),
        seed=settings.seed,
    )
    chat_lm = chat(base_url=f"{endpoint.base_url}/chat/completions", **kwargs)
    if settings.chat_template:
        return chat_lm
    lm = completions(base_url=f"{endpoint.base_url}/completions", **kwargs)
    lm.chat = chat_lm
    return lm


def evaluate_served(
    checkpoint_dir: str, task_names: list[str], settings: EvalSettings, server: ServerSettings
) -> EvalResult:
    """Score a checkpoint folder on the named tasks through a server started for it."""
    tasks = check_tasks(task_names, settings.data_files)  # before a server takes minutes to start
    with serve(checkpoint_dir, server, seed=settings.seed) as endpoint:
        return run_tasks(served_lm(endpoint, checkpoint_dir, settings, server), tasks, settings)
