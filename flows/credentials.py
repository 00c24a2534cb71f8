"""S3 credentials from a Prefect block named in the AuditConfig.

`storage.credentials_block: aws-credentials/NAME` (or `minio-credentials/NAME`, both from
prefect-aws) is loaded from the Prefect API and handed to the library's store for one flow run:

    with use_storage_credentials(config.storage):
        ...  # the flow's stages

Only the block's name ever appears in configs, logs and tables; the secret values stay inside
the block and the store's client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import prefect_aws  # noqa: F401 - registers the aws-credentials and minio-credentials block types
from prefect.blocks.core import Block

from mergeaudit import store
from mergeaudit.checkpoint.settings import StorageSettings
from mergeaudit.errors import ConfigError


def s3_credentials_from_block(slug: str) -> store.S3Credentials:
    """Load `aws-credentials/NAME` or `minio-credentials/NAME` as explicit S3 credentials."""
    try:
        block = Block.load(slug)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"credentials block {slug!r} cannot be loaded: {type(exc).__name__}") from None
    params = getattr(block, "aws_client_parameters", None)
    endpoint = getattr(params, "endpoint_url", None) if params is not None else None

    def secret(value) -> str | None:
        return value.get_secret_value() if value is not None and hasattr(value, "get_secret_value") else value

    if hasattr(block, "minio_root_user"):
        return store.S3Credentials(
            access_key_id=block.minio_root_user,
            secret_access_key=secret(block.minio_root_password),
            region=block.region_name,
            endpoint_url=endpoint,
        )
    return store.S3Credentials(
        access_key_id=block.aws_access_key_id,
        secret_access_key=secret(block.aws_secret_access_key),
        session_token=block.aws_session_token,
        profile=block.profile_name,
        region=block.region_name,
        endpoint_url=endpoint,
    )


@contextlib.contextmanager
def use_storage_credentials(storage: StorageSettings) -> Iterator[None]:
    """Inside the block, the store reads S3 with the configured block's credentials (the AWS
    environment without one): in this flow run and the task runs it starts, not in other flow
    runs of the process."""
    creds = s3_credentials_from_block(storage.credentials_block) if storage.credentials_block else None
    with store.s3_credentials(creds):
        yield
