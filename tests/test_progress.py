"""The one progress display: stage, candidates done of total, elapsed and remaining time; no
third-party progress bars while it runs."""

from __future__ import annotations

import io
import logging

from mergeaudit.progress import AuditProgress, duration, quiet_progress_bars


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_line_counts_and_remaining_time(caplog):
    clock, seen = Clock(), []
    progress = AuditProgress(
        ["resolve", "geometry", "evaluate", "tables"],
        stream=io.StringIO(),
        clock=clock,
        on_change=lambda p: seen.append(p.fraction),
    )
    with caplog.at_level(logging.INFO, logger="mergeaudit.progress"):
        progress.stage("resolve")
        clock.now = 30
        progress.stage("evaluate", candidates=4)
        clock.now = 90
        progress.finished("ties-d0.3")
        clock.now = 150
        progress.finished("dare", ok=False)
    assert caplog.messages[-1] == (
        "[3/4 evaluate] 2/4 candidates (1 failed), 2m30s elapsed, about 2m00s left (last: dare)"
    )
    assert seen == [0.0, 0.5, 0.5625, 0.625]
    progress.stage("tables")
    assert progress.remaining() is None and progress.fraction == 0.75
    clock.now = 200
    progress.close()
    assert progress.fraction == 1.0 and seen[-1] == 1.0
    assert progress.line() == "[4/4 tables] 2/4 candidates (1 failed), done in 3m20s (last: dare)"


def test_terminal_rewrites_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    progress = AuditProgress(["evaluate"], stream=out, clock=Clock())
    progress.stage("evaluate", candidates=2)
    progress.finished("a")
    progress.close()
    assert out.getvalue().count("\r\033[K") == 3 and out.getvalue().endswith("done in 0s (last: a)\n")


def test_quiet_progress_bars_silences_tqdm_and_restores():
    from tqdm import tqdm

    with quiet_progress_bars():
        with quiet_progress_bars():
            assert tqdm(total=3, file=io.StringIO()).disable
        assert tqdm(total=3, file=io.StringIO()).disable
    assert not tqdm(total=3, file=io.StringIO()).disable


def test_duration():
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
