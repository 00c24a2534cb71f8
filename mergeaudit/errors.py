"""One exception hierarchy for mergeaudit.

Every error a user can cause derives from `MergeAuditError`, so the CLI can turn it into a
one-line message and exit status 2 while real bugs still show a traceback. Storage errors keep
their cause (`raise ... from exc`) but never carry credentials in their message. A contract our
own code broke (`SchemaError`: rows that do not fit a declared table schema) is deliberately
outside that hierarchy: it is a bug in mergeaudit, not the user's fault, and shows its traceback.
"""

from __future__ import annotations


class MergeAuditError(Exception):
    """Base class of every error a user can cause (bad config, bad checkpoint, bad store)."""


class ConfigError(MergeAuditError):
    """A configuration or parameter that does not validate."""


class StoreError(MergeAuditError):
    """A store URI that cannot be used: unknown scheme, missing object, denied access."""


class TransientStoreError(StoreError):
    """A storage failure worth retrying: network errors, S3 5xx, throttling."""


class ObjectChangedError(StoreError):
    """An object replaced between its listing and a read pinned to the listed version."""


class CheckpointError(MergeAuditError):
    """A checkpoint that is missing, incomplete, corrupt or unsafe to read."""


class CheckpointChangedError(CheckpointError):
    """A checkpoint whose files changed after it was opened (and fingerprinted).

    Not transient: a retry that reopened the checkpoint would score a different checkpoint
    under the run's recorded fingerprint. The candidate fails; the next run audits the new
    version under its own fingerprint."""


class ShapeMismatchError(CheckpointError):
    """Checkpoints that cannot be combined because tensor names or shapes disagree."""


class UnsafeOutputError(ConfigError):
    """An output URI whose writing would delete or overwrite data mergeaudit did not create, or
    an input of the same job."""


class UnknownMethodError(ConfigError):
    """A merge method name that is not in the registry."""


class NonFiniteError(MergeAuditError):
    """A merge whose output holds NaN or infinite values: the method or the cast to the output
    dtype overflowed, or an input already held them."""


class EvaluationError(MergeAuditError):
    """A task that is unknown or whose data cannot be found."""


class IsolationError(EvaluationError):
    """The configured minimum isolation for model-generated code is not available here."""


class ServerStartError(EvaluationError):
    """A model server that could not be started, exited, or did not become ready in time."""


class SchemaError(Exception):
    """Rows built by mergeaudit that do not fit the declared table schema (an unknown table or
    column, a value of the wrong type): a bug in mergeaudit, never the user's input, so not a
    MergeAuditError (the CLI prints a traceback, and nothing is written)."""
