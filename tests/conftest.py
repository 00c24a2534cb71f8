"""Session fixtures: offline HF, a real S3 endpoint on loopback (moto's server), tiny models.

The environment is set at import, before any boto/s3fs client or HF cache can exist:
dummy AWS credentials, HF_HOME and the checkpoint cache in a temporary folder, every HF offline
switch on, Prefect's telemetry off. Storage tests run on a local folder and on S3 through `store_root`.

Tiers. Every test is `unit` unless it is marked `integration` or `slow` (it may be both):

    integration  starts something outside the test process or a real server: a Prefect API
                 (prefect_harness, a flow run, `prefect server start`), the S3 endpoint (moto's
                 server), bubblewrap, a served model, headless Chromium, or a child Python (the
                 console-script smoke tests, memory-capped children, fresh-interpreter checks)
    slow         runs long (seconds) in this process: a whole flow, the demo, training,
                 lm-eval's full task index, bootstrap coverage checks, and every test that runs
                 mergekit itself to compare with (the parity suites)

`pytest_collection_modifyitems` below marks by fixture (INTEGRATION_FIXTURES, `store_root[s3]`)
and by module (INTEGRATION_MODULES, SLOW_MODULES), so a new test that uses the S3 endpoint or a
Prefect server lands in its tier by itself; a single test elsewhere carries its own decorator.

    pytest                          the unit tier (no -m and no paths given)
    pytest tests/test_flow.py       the named files or tests, whatever their tier
    pytest -m integration           a tier (or any marker expression)
    make test                       every tier: pytest -m "unit or integration or slow"
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

_SESSION_TMP = tempfile.mkdtemp(prefix="mergeaudit-tests-")
os.environ.update(
    HF_HOME=os.path.join(_SESSION_TMP, "hf"),
    MERGEAUDIT_CACHE_DIR=os.path.join(_SESSION_TMP, "checkpoint-cache"),  # audits cache S3 inputs by default
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    AWS_ACCESS_KEY_ID="testing-key-id",
    AWS_SECRET_ACCESS_KEY="testing-secret-key",
    AWS_SESSION_TOKEN="testing-session",
    AWS_DEFAULT_REGION="us-east-1",
)
for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "PREFECT_API_URL"):
    os.environ.pop(var, None)
logging.getLogger("werkzeug").setLevel(logging.ERROR)

BUCKET = "mergeaudit-test"
INTEGRATION_FIXTURES = frozenset({"s3_endpoint", "s3_bucket", "prefect_harness", "bwrap", "console_script", "demo_run"})
INTEGRATION_MODULES = frozenset({"test_flow", "test_prefect_server", "test_prefect_startup", "test_served"})
SLOW_FIXTURES = frozenset({"demo_run"})
SLOW_MODULES = frozenset({"test_mergekit_parity_dtypes"})
TIERS = ("integration", "slow")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
# What the project needs installed to import its tests (pyproject's dependencies and test extra).
NEEDS = ("torch", "fsspec", "pyarrow", "safetensors", "prefect", "lm_eval", "moto")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """`pytest` run by an interpreter without the project's dependencies (the system one) runs
    again in the project's venv, with the same arguments, rather than failing on every import;
    without a venv it stops with the command that makes one."""
    import importlib.util

    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if not missing:
        return
    in_venv = os.path.realpath(sys.prefix) == os.path.realpath(os.path.join(REPO, ".venv"))
    if in_venv or not os.path.exists(VENV_PYTHON):
        pytest.exit(
            f"the tests need the project's dependencies ({', '.join(missing)} missing in {sys.executable}); "
            "run `make venv` (or `make test`), then `pytest` again",
            returncode=4,
        )
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.rmdir(_SESSION_TMP)  # still empty: the venv's run makes its own
    os.chdir(str(config.invocation_params.dir))
    os.execv(VENV_PYTHON, [VENV_PYTHON, "-m", "pytest", *config.invocation_params.args])


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks added here
def pytest_collection_modifyitems(config, items):
    """Mark each test's tier; with neither -m nor paths given, keep the unit tier only."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        module = item.path.stem
        if fixtures & INTEGRATION_FIXTURES or params.get("store_root") == "s3" or module in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
        if fixtures & SLOW_FIXTURES or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)
    if config.getoption("markexpr") or config.args_source == pytest.Config.ArgsSource.ARGS:
        return
    kept = [item for item in items if item.get_closest_marker("unit")]
    config.hook.pytest_deselected(items=[item for item in items if not item.get_closest_marker("unit")])
    items[:] = kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(env: dict, port: int, log_path, timeout: float = 180) -> subprocess.Popen:
    """`prefect server start` on loopback, in a session of its own (stop it with stop_process);
    returns once /api/health answers, or fails with the log's tail when the server exits or is
    not healthy in time."""
    with open(log_path, "wb") as log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1).read() == b"true":
                return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server)
            with open(log_path, "rb") as log:
                pytest.fail("the Prefect server did not become healthy: " + log.read()[-2000:].decode(errors="replace"))
        time.sleep(0.5)


def alive(pid: int) -> bool:
    """Whether process `pid` still runs: an exited one not yet reaped (a zombie) does not."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM to its process group; a Prefect worker only stops at the second one (3.9.1: the
    first is forwarded to itself as SIGINT and it keeps running), so a second follows; SIGKILL to
    the group as a last resort."""
    import signal

    for _ in range(2):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's threaded S3 server on 127.0.0.1, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    yield endpoint
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket: the server is reset before each test."""
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")).read()
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}"


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """The same test on a local folder and on the S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


@pytest.fixture(scope="session")
def toy_family(tmp_path_factory):
    """The default toy family (base, ft_a at 10%, ft_b at 20%) on a local folder."""
    from mergeaudit.toy import build_toy_family

    return build_toy_family(str(tmp_path_factory.mktemp("toy")))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (it costs seconds to start; on a loaded
    2-core machine more than Prefect's default 30 s limit was measured: 45 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def bwrap():
    """Tests that run model-generated code need bubblewrap: skip without it, fail when CI
    (MERGEAUDIT_REQUIRE_BWRAP) says it must be there."""
    from mergeaudit.evaluation import isolation

    if isolation.bwrap_path() is None:
        if os.environ.get("MERGEAUDIT_REQUIRE_BWRAP"):
            pytest.fail("MERGEAUDIT_REQUIRE_BWRAP is set but bubblewrap is not installed")
        pytest.skip("no bubblewrap on this machine (make test installs it where it can)")


@pytest.fixture
def run_cli(capsys):
    """`mergeaudit ARGS` in this process: main()'s exit status and what it printed, as a
    CompletedProcess. tests/test_cli_smoke.py runs the installed console script once per command."""
    from mergeaudit.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refuses bad arguments itself
            code = exc.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["mergeaudit", *args], code, out, err)

    return run


@pytest.fixture(scope="session")
def console_script():
    """Runs the installed `mergeaudit` console script in a child process."""
    script = os.path.join(os.path.dirname(sys.executable), "mergeaudit")

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))

    return run


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, console_script):
    """One `mergeaudit demo` for the whole session (minutes): its workdir and what it printed."""
    workdir = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    out = console_script("demo", "--workdir", str(workdir), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"mergeaudit demo took {time.perf_counter() - t0:.0f} s")
    return workdir, out.stdout
