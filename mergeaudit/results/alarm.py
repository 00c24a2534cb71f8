"""The regression alarm's settings: `alarm:` in an audit's YAML, and what `compare` takes.

AlarmSettings(max_drop=0.02, significance=0.05, metrics="primary")
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pydantic

from mergeaudit.frozen import Frozen


class AlarmSettings(Frozen):
    """The regression alarm: when a score drop against the previous run of this audit counts."""

    enabled: bool = pydantic.Field(True, description="Compare each run with the previous committed run.")
    max_drop: float = pydantic.Field(0.02, ge=0.0, description="Flag drops larger than this (score units)...")
    significance: float = pydantic.Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="...whose one-sided p-value is at most this: McNemar's exact test or a "
        "paired t-test on the prompts both runs share, Welch's z only when the prompts differ (mergeaudit.results).",
    )
    metrics: Literal["primary", "all"] = pydantic.Field(
        "primary", description="primary: each task's ranking metric; all: every metric where higher is better."
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _z_as_significance(cls, data: Any) -> Any:
        """`z` (the first round's alarm: drops beyond z standard errors) still reads, as the
        one-sided level it meant: significance = P(Z > z)."""
        if isinstance(data, dict) and "z" in data:
            data = dict(data)
            z = data.pop("z")
            if "significance" in data:
                raise ValueError("give alarm.significance or the deprecated alarm.z, not both")
            if not isinstance(z, (int, float)) or isinstance(z, bool) or not math.isfinite(z) or not 0 < z < 40:
                raise ValueError(f"alarm.z must be a number in (0, 40), not {z!r}")
            data["significance"] = 0.5 * math.erfc(z / math.sqrt(2))
        return data
