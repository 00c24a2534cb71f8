"""Session fixtures: offline HF, a real S3 endpoint on loopback (moto's server), tiny models.

The environment is set at import, before any boto/s3fs client or HF cache can exist:
dummy AWS credentials, HF_HOME and the checkpoint cache in a temporary folder, every HF offline
switch on, Prefect's telemetry off. Storage tests run on a local folder and on S3 through `store_root`.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """One temporary Prefect API for the whole session (it costs seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
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
