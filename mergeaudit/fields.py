"""Reusable annotated types for settings models: names and store URIs, validated where declared.

    class CheckpointSpec(Frozen):
        name: Name
        uri: StoreURI

A `Name` is what tables, reports and Prefect artifact keys show; a `StoreURI` is a path or a
URI of a scheme the store serves (file://, s3://, memory://), normalised by `store.check_uri`;
a `LocalPath` is a folder on this machine (a cache), made absolute.
"""

from __future__ import annotations

import re
from typing import Annotated

import pydantic

from mergeaudit import store
from mergeaudit.errors import MergeAuditError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError(f"name {v!r} must be 1-64 characters of letters, digits, '_', '-', '.'")
    return v


def check_store_uri(v: str) -> str:
    try:
        return store.check_uri(v)
    except MergeAuditError as exc:
        raise ValueError(str(exc)) from None


def check_local_path(v: str) -> str:
    uri = check_store_uri(v)
    if "://" in uri:
        raise ValueError(f"{v!r} must be a local folder, not a store URI")
    return uri


Name = Annotated[str, pydantic.AfterValidator(check_name)]
StoreURI = Annotated[str, pydantic.AfterValidator(check_store_uri)]
LocalPath = Annotated[str, pydantic.AfterValidator(check_local_path)]
