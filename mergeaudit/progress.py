"""One progress display for a long audit: the stage, candidates done of total, elapsed and
remaining time, instead of the progress bars lm-eval and transformers draw for every candidate.

`AuditProgress` keeps the counts; each change is one line,
`[4/6 evaluate] 3/7 candidates, 1m20s elapsed, about 1m47s left (last: ties-d0.3)`, rewritten in
place on a terminal and logged as a line elsewhere (Prefect's logs, CI). The remaining time is
the evaluation stage's mean time per finished candidate times the candidates left. Its `line`
is also what the flow puts in a Prefect progress artifact.

`quiet_progress_bars()` turns the third-party bars off in this process (tqdm's, which lm-eval
uses, and transformers'); the logs keep the detail.

    progress = AuditProgress(["resolve", "fisher", "geometry", "plan", "evaluate", "tables"])
    progress.stage("evaluate", candidates=7)
    progress.finished("ties-d0.3")
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

log = logging.getLogger("mergeaudit.progress")
_QUIET = [0]


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class AuditProgress:
    def __init__(
        self,
        stages: list[str],
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[AuditProgress], None] | None = None,
        emit: Callable[[str], None] | None = None,
    ):
        self.stages = list(stages)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.on_change = on_change
        self.emit = emit or log.info  # where the line goes off a terminal (a flow run's logger, say)
        self.started = clock()
        self.current: str | None = None
        self.total = 0
        self.done = 0
        self.failed = 0
        self.last: str | None = None
        self.closed = False
        self._eval_started: float | None = None

    def stage(self, name: str, candidates: int | None = None) -> None:
        self.current = name
        if candidates is not None:
            self.total, self.done, self.failed = candidates, 0, 0
            self._eval_started = self.clock()
        else:
            self._eval_started = None  # the counts stay on display; nothing is left to estimate
        self._show()

    def finished(self, candidate: str, ok: bool = True) -> None:
        self.done += 1
        self.failed += not ok
        self.last = candidate
        self._show()

    @property
    def fraction(self) -> float:
        """Stages done plus the evaluated share of the current stage, over all stages."""
        if self.closed:
            return 1.0
        if self.current not in self.stages:
            return 0.0
        i = self.stages.index(self.current)
        inner = self.done / self.total if self.total and self._eval_started is not None else 0.0
        return min(1.0, (i + inner) / len(self.stages))

    def remaining(self) -> float | None:
        if not self.done or self._eval_started is None or self.done >= self.total:
            return None
        per = (self.clock() - self._eval_started) / self.done
        return per * (self.total - self.done)

    def line(self) -> str:
        pos = self.stages.index(self.current) + 1 if self.current in self.stages else 0
        parts = [f"[{pos}/{len(self.stages)} {self.current}]"]
        if self.total:
            failed = f" ({self.failed} failed)" if self.failed else ""
            parts.append(f"{self.done}/{self.total} candidates{failed}")
        parts.append(
            f"done in {duration(self.clock() - self.started)}"
            if self.closed
            else f"{duration(self.clock() - self.started)} elapsed"
        )
        left = self.remaining()
        if left is not None:
            parts.append(f"about {duration(left)} left")
        text = ", ".join(parts[1:])
        return f"{parts[0]} {text}" + (f" (last: {self.last})" if self.last else "")

    def _show(self) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        else:
            self.emit(text)
        if self.on_change is not None:
            self.on_change(self)

    def close(self) -> None:
        """The run is over: the last line says so and the fraction is 1."""
        self.closed = True
        self._eval_started = None
        self._show()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No tqdm or transformers progress bars while inside (nested uses are fine)."""
    import tqdm.std
    from transformers.utils import logging as hf_logging

    if not getattr(tqdm.std.tqdm.__init__, "_mergeaudit_quiet", False):
        original = tqdm.std.tqdm.__init__

        def init(self, *args, **kwargs):
            if _QUIET[0]:
                kwargs["disable"] = True
            original(self, *args, **kwargs)

        init._mergeaudit_quiet = True
        tqdm.std.tqdm.__init__ = init
    was_enabled = hf_logging.is_progress_bar_enabled()
    _QUIET[0] += 1
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        _QUIET[0] -= 1
        if was_enabled and not _QUIET[0]:
            hf_logging.enable_progress_bar()
