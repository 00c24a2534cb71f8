"""S3 credentials are scoped to a context (a flow run and its task runs), never the process."""

from __future__ import annotations

import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from mergeaudit import store
from mergeaudit.errors import StoreError

URI = "s3://creds-bucket/x"


def client_key() -> str | None:
    """The access key of the S3 client the store would use here (None: the AWS environment's)."""
    return store.locate(URI).fs.key


def test_two_threads_each_see_their_own_credentials():
    barrier = threading.Barrier(2, timeout=10)
    seen: dict[str, list] = {}

    def run(name: str) -> None:
        with store.s3_credentials(store.S3Credentials(access_key_id=name, secret_access_key=name + "-secret")):
            barrier.wait()  # both inside their block at once
            seen[name] = [client_key()]
            barrier.wait()
            seen[name].append(client_key())
        seen[name].append(client_key())

    threads = [threading.Thread(target=run, args=(n,)) for n in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"alice": ["alice", "alice", None], "bob": ["bob", "bob", None]}
    assert client_key() is None, "the environment outside any block"


def test_blocks_nest_and_equal_credentials_share_one_client():
    a1, a2 = (store.S3Credentials(access_key_id="a", secret_access_key="s") for _ in range(2))
    with store.s3_credentials(a1):
        fs = store.locate(URI).fs
        with store.s3_credentials(None):
            assert client_key() is None
        with store.s3_credentials(store.S3Credentials(access_key_id="a", secret_access_key="other")):
            assert store.locate(URI).fs is not fs, "another secret is another client"
        assert store.locate(URI).fs is fs
    with store.s3_credentials(a2):
        assert store.locate(URI).fs is fs, "keyed by value, not by the object's id"


def test_library_thread_pools_carry_the_credentials():
    with store.s3_credentials(store.S3Credentials(access_key_id="pool", secret_access_key="s")):
        with store.ContextThreadPool(4) as pool:
            assert set(pool.map(lambda _: client_key(), range(8))) == {"pool"}
        with ThreadPoolExecutor(2) as plain:  # why the library's pools are ContextThreadPools
            assert plain.submit(client_key).result() is None


def test_concurrent_flow_runs_and_their_task_runs_keep_their_own(prefect_harness):
    from prefect import flow, task

    barrier = threading.Barrier(2, timeout=60)

    @task
    def key_in_task(_: int = 0) -> str | None:
        return client_key()

    @task(timeout_seconds=60, retries=1)
    def key_in_task_with_timeout() -> str | None:
        barrier.wait()  # both flow runs are inside their credentials now
        return client_key()

    @flow
    def audit_like(name: str) -> list:
        with store.s3_credentials(store.S3Credentials(access_key_id=name, secret_access_key="s")):
            return [
                key_in_task_with_timeout(),
                key_in_task(),
                key_in_task.submit().result(),
                key_in_task.map([1, 2]).result(),
                client_key(),
            ]

    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(audit_like, name) for name in ("run-a", "run-b")}
        got = {name: f.result(timeout=120) for name, f in runs.items()}
    assert got == {n: [n, n, n, [n, n], n] for n in ("run-a", "run-b")}
    assert client_key() is None


def test_a_flow_with_a_credentials_block_reaches_s3_without_the_environment(
    prefect_harness, s3_bucket, s3_endpoint, monkeypatch, tmp_path
):
    from prefect import flow, task
    from prefect_aws import AwsClientParameters, AwsCredentials

    from mergeaudit import tables
    from mergeaudit.flows.credentials import use_storage_credentials

    AwsCredentials(
        aws_access_key_id="block-key",
        aws_secret_access_key="block-secret",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    ).save("creds-test", overwrite=True)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    results = s3_bucket + "/results"

    @task
    def write_and_read() -> int:
        tables.write_run(
            results, "20261201T000000Z-creds", "2026-12-01", {"runs": [{"audit_name": "creds", "status": "completed"}]}
        )
        return tables.read_table(results, "runs").num_rows  # read by a pool of threads

    @flow
    def with_block() -> tuple:
        storage = types.SimpleNamespace(credentials_block="aws-credentials/creds-test")
        with use_storage_credentials(storage):
            store.write_bytes(s3_bucket + "/in-flow", b"x")
            return client_key(), write_and_read.submit().result(), store.read_bytes(s3_bucket + "/in-flow")

    assert with_block() == ("block-key", 1, b"x")
    with pytest.raises(StoreError, match="no AWS credentials"):  # the block did not outlive the run
        store.read_bytes(s3_bucket + "/in-flow")
