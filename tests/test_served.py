"""The served backend against a real `transformers serve` on the toy base (one server for the
module), plus process-lifecycle checks with small real processes (a sleeping shell, a
ten-line HTTP server) where a model would only make them slow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import textwrap
import time
import urllib.request
from collections import defaultdict

import psutil
import pydantic
import pytest
import torch

from mergeaudit.errors import EvaluationError, ServerStartError
from mergeaudit.evaluation import EvalSettings, evaluate_lm, evaluate_model
from mergeaudit.evaluation.generation import GenerationInfo
from mergeaudit.evaluation.served import (
    ServerSettings,
    evaluate_served,
    request_seed,
    serve,
    served_lm,
    server_command,
    server_env,
)

TASK = "mergeaudit_add2"
CPU = ServerSettings(device="cpu", dtype="float32", num_concurrent=2, startup_timeout=300)

# Answers /v1/models with the model it was given; with --ignore-sigterm it needs a SIGKILL.
FAKE_SERVER = textwrap.dedent("""
    import json, signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    args = sys.argv[1:]  # serve MODEL --host H --port P ...
    model, port = args[1], int(args[args.index("--port") + 1])
    if "--ignore-sigterm" in args:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class Models(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": model}]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    HTTPServer(("127.0.0.1", port), Models).serve_forever()
""")


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie nobody reaps (this container's init does not)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def port_free(port: int) -> bool:
    """Nothing listens there: a server (which sets SO_REUSEADDR, as uvicorn does) can bind it;
    connections in TIME_WAIT on it do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def completions(result) -> dict[int, list[str]]:
    out = defaultdict(list)
    for row in sorted(result.samples, key=lambda r: (r["doc_id"], r["sample"])):
        out[row["doc_id"]].append(row["completion"])
    return dict(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mergeaudit.toy.models import build_base

    base = build_base(str(tmp_path_factory.mktemp("served")))
    # the toy tokenizer has no chat template; a plain one lets the chat path run too
    config = os.path.join(base, "tokenizer_config.json")
    with open(config) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with open(config, "w") as f:
        json.dump(tokenizer_config, f)
    with serve(base, CPU) as endpoint:
        yield base, endpoint


@pytest.mark.parametrize("chat", [None, True], ids=["completions", "chat"])
def test_served_greedy_equals_in_process(served, chat):
    from transformers import AutoModelForCausalLM

    from mergeaudit.modeling import load_tokenizer

    base, endpoint = served
    settings = EvalSettings(limit=8 if chat is None else 4, batch_size=8, chat_template=chat)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    local = completions(evaluate_model(model, load_tokenizer(base), [TASK], settings))
    remote = completions(evaluate_lm(served_lm(endpoint, base, settings, CPU), [TASK], settings))
    assert len(local) == settings.limit
    assert remote == local


def test_generation_info_records_truncation_and_tokens(served):
    base, endpoint = served
    settings = EvalSettings(limit=4, max_gen_toks=3)
    lm = served_lm(endpoint, base, settings, CPU)
    result = evaluate_lm(lm, [TASK], settings)
    texts = [row["completion"] for row in result.samples]
    # one character per token: 3 characters ran out of budget; fewer stopped at "\n" or "="
    # (cut off here, its token counted by the server)
    assert sum(len(t) == 3 for t in texts) >= 2
    assert all(
        lm.generation_info[t] == GenerationInfo(truncated=len(t) == 3, tokens=min(3, len(t) + 1)) for t in texts
    ), (texts, lm.generation_info)


def test_stop_sequence_on_the_last_token_is_cut_and_not_truncated(served):
    """transformers serve keeps the stop string in the text, and says "length" when it falls on
    the last allowed token; we cut it and record a stop."""
    from lm_eval.api.instance import Instance

    base, endpoint = served
    lm = served_lm(endpoint, base, EvalSettings(), CPU)

    def generate(until: list[str], max_gen_toks: int) -> str:
        args = ("60+54=", {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False})
        return lm.generate_until([Instance("generate_until", {}, args, 0)])[0]

    free = generate([], 8)
    i = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # first new character
    cut = generate([free[i]], i + 1)
    assert cut == free[:i]
    assert lm.generation_info[cut] == GenerationInfo(truncated=False, tokens=i + 1)


def test_chat_prompts_of_a_plain_run_go_to_chat_completions(served):
    """Without `chat_template`, a pack may still ask for a chat template: lm-eval then hands the
    API model messages, which our completions model sends to /v1/chat/completions, in order."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr

    base, endpoint = served
    lm = served_lm(endpoint, base, EvalSettings(max_gen_toks=4), CPU)
    gen = {"until": ["\n"], "do_sample": False}
    messages = JsonChatStr(json.dumps([{"role": "user", "content": "66+68="}]))
    prompts = ["60+54=", messages, "66+68="]
    out = lm.generate_until([Instance("generate_until", {}, (p, dict(gen)), i) for i, p in enumerate(prompts)])
    assert out[1] == out[2] != out[0]  # the fixture's chat template renders the content as is
    assert sum(lm.chat.sent.values()) == 1 and set(lm.sent) == {"60+54=", "66+68="}
    assert set(out) <= set(lm.generation_info)


def test_samples_differ_per_repeat_and_reproduce(served):
    base, endpoint = served
    settings = EvalSettings(limit=4, num_samples=4, temperature=1.0, max_gen_toks=4)
    runs = []
    for _ in range(2):
        lm = served_lm(endpoint, base, settings, CPU)
        runs.append(completions(evaluate_lm(lm, [TASK], settings)))
        assert sorted(lm.sent.values()) == [4, 4, 4, 4]  # each prompt sent 4 times, 4 seeds
    first, second = runs
    assert len(first) == 4 and all(len(samples) == 4 for samples in first.values())
    assert sum(len(set(samples)) > 1 for samples in first.values()) >= 3
    assert first == second


def test_request_seeds_distinct_per_repeat_and_stable():
    seeds = [request_seed(1234, "60+54=", k) for k in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**31 for s in seeds)
    assert seeds == [request_seed(1234, "60+54=", k) for k in range(8)]
    assert request_seed(1234, "66+68=", 0) != seeds[0] and request_seed(1, "60+54=", 0) != seeds[0]


def test_server_environment_has_no_credentials(served):
    environ = psutil.Process(served[1].pid).environ()
    assert environ["HF_HUB_OFFLINE"] == "1"
    assert not any(k.startswith("AWS_") for k in environ)  # conftest sets AWS credentials
    env = server_env(
        {
            "PATH": "/bin",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_TOKEN": "t",
            "DB_PASSWORD": "p",
            "OPENAI_API_KEY": "k",
            "MY_SECRET_X": "s",
            "aws_region": "r",
        }
    )
    assert env == {"PATH": "/bin", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_server_commands():
    vllm = server_command(
        "/m",
        ServerSettings(engine="vllm", max_model_len=4096, extra_args=("--enforce-eager",), command=("wrap", "vllm")),
        8001,
        7,
    )
    assert vllm == [
        "wrap",
        "vllm",
        "serve",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--dtype",
        "auto",
        "--served-model-name",
        "/m",
        "--seed",
        "7",
        "--gpu-memory-utilization",
        "0.9",
        "--max-model-len",
        "4096",
        "--generation-config",
        "vllm",
        "--enforce-eager",
    ]
    hf = server_command("/m", ServerSettings(device="cpu", dtype="float32"), 8002, 3)
    assert hf[1:] == [
        "serve",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "8002",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--default-seed",
        "3",
        "--log-level",
        "warning",
    ]
    assert os.path.basename(hf[0]) == "transformers"
    assert not any("trust-remote-code" in a for a in vllm + hf)
    with pytest.raises(pydantic.ValidationError) as err:  # every problem at once, as every settings model
        ServerSettings(extra_args=("--trust-remote-code",), num_concurrent=0)
    assert "trust-remote-code" in str(err.value) and "num_concurrent" in str(err.value)


def test_checkpoint_that_is_not_a_model_fails_with_the_log_tail(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    start = time.monotonic()
    with pytest.raises(ServerStartError, match="exited with code 1 before it was ready") as err:
        with serve(str(tmp_path), CPU):
            pass
    assert time.monotonic() - start < 120
    assert "Error" in str(err.value).split("log:", 1)[1]  # the server's own traceback


def test_server_never_ready_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "sleep.pid"
    never = ServerSettings(command=("sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait", "sh"), startup_timeout=2)
    start = time.monotonic()
    with pytest.raises(ServerStartError, match="did not become ready within 2 s"):
        with serve(str(tmp_path), never):
            pass
    assert time.monotonic() - start < 10
    assert gone(int(pidfile.read_text()))


def test_missing_executables_say_how_to_install(tmp_path):
    with pytest.raises(ServerStartError, match="cannot be run"):
        with serve(str(tmp_path), ServerSettings(command=(str(tmp_path / "no-such-wrapper"),))):
            pass
    if shutil.which("vllm") or os.path.exists(os.path.join(os.path.dirname(sys.executable), "vllm")):
        return  # a real vLLM would start here
    with pytest.raises(ServerStartError, match="pip install vllm"):
        with serve(str(tmp_path), ServerSettings(engine="vllm")):
            pass


def test_exit_on_error_kills_a_server_that_ignores_sigterm(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    stubborn = ServerSettings(
        command=(sys.executable, str(script)), extra_args=("--ignore-sigterm",), stop_timeout=1, startup_timeout=30
    )
    with pytest.raises(RuntimeError, match="boom"):
        with serve(str(tmp_path), stubborn) as endpoint:
            with urllib.request.urlopen(f"{endpoint.base_url}/models", timeout=5) as response:
                assert json.load(response)["data"][0]["id"] == str(tmp_path)
            start = time.monotonic()
            raise RuntimeError("boom")
    assert 1 <= time.monotonic() - start < 10  # waited for SIGTERM, then killed
    assert gone(endpoint.pid)
    assert port_free(int(endpoint.base_url.rsplit(":", 1)[1].split("/")[0]))
    assert not os.path.exists(endpoint.log_path)


def test_server_dying_in_use_is_reported_with_its_exit_code(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    with pytest.raises(EvaluationError, match=f"exited with code -{signal.SIGKILL} while in use"):
        with serve(str(tmp_path), ServerSettings(command=(sys.executable, str(script)))) as endpoint:
            os.kill(endpoint.pid, signal.SIGKILL)
            time.sleep(0.5)
            raise ConnectionError("server went away")


def test_evaluate_served_leaves_no_process_and_frees_the_port(served, tmp_path):
    base = shutil.copytree(served[0], tmp_path / "candidate")  # its own path, to find its processes
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    result = evaluate_served(
        str(base),
        [TASK],
        EvalSettings(limit=2),
        ServerSettings(device="cpu", dtype="float32", port=number, startup_timeout=300),
    )
    assert len(result.samples) == 2
    assert port_free(number)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(base) in " ".join(p.info["cmdline"] or [])]
    assert all(gone(p.pid) for p in left)
