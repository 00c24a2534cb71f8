"""The base of every settings model: frozen, unknown keys refused, every float finite and bounded.

Each subsystem declares its settings on this base (`mergeaudit.evaluation.settings.EvalSettings`, ...)
and `mergeaudit.config.AuditConfig` composes them.

    class MySpec(Frozen):
        limit: int = 3
"""

from __future__ import annotations

from typing import Any

import pydantic

# No float in a config is infinite, NaN or beyond this (probe lambdas, scales, timeouts...);
# merge parameters have the same bound (merging.registry.MAX_PARAM_MAGNITUDE).
MAX_MAGNITUDE = 1e6


class Frozen(pydantic.BaseModel):
    """Frozen, unknown keys refused, every float finite and within +-MAX_MAGNITUDE."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @pydantic.field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        values = v if isinstance(v, list) else [v]
        bad = [x for x in values if isinstance(x, float) and not abs(x) <= MAX_MAGNITUDE]
        if bad:
            raise ValueError(f"{bad[0]!r} lies beyond +-{MAX_MAGNITUDE:g}")
        return v
