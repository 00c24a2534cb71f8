"""A flow run a worker started ends when that worker does.

Prefect 3.9.1's process worker runs each flow run in a child process and leaves it running when
the worker process itself is killed (a second SIGTERM makes it SIGKILL itself; so do kill -9
and the OOM killer). Measured on the real-server test: an evaluation went on computing for 3
minutes after its worker was killed, still holding its GPU and renewing its `gpu` slot, and was
then marked Crashed anyway, when it next wrote to the dead worker's pipe; its work was lost and
the audit waited on it the whole time. So a run started
by a worker (the process Prefect launched for this very flow run) watches its parent process
and, once that is gone, stops itself the way Prefect stops a run (SIGTERM: the engine marks it
Crashed), and exits outright if that has not ended it within a grace period. The parent is the
one the process had when the flow's module was imported (before the run turned Running), so a
worker that dies between then and the flow's first line is seen too.

A worker that shuts down instead (one SIGTERM sometimes suffices) cancels its runs, and anyio
closes their processes with SIGKILL: they cannot report, and the zombie automation
(deployments/setup.py) marks them Crashed once their heartbeats stop. Nothing here can help that.

Runs in other processes (`mergeaudit audit`, the demo, a subflow) are left alone: a shell that
goes away must not stop an audit started with nohup.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

LOG = logging.getLogger(__name__)
POLL_SECONDS = 2.0
GRACE_SECONDS = 30.0
EXIT_CODE = 70  # after the grace period: the worker is gone and SIGTERM did not end the run
_watching: list[threading.Thread] = []


# the worker that launched this process, while it is still there to be seen (see the module doc)
_LAUNCHED_BY = os.getppid() if os.environ.get("PREFECT__FLOW_RUN_ID") else None


def watch_parent(
    on_orphaned: Callable[[int], None], poll: float = POLL_SECONDS, parent: int | None = None
) -> threading.Thread | None:
    """Call `on_orphaned(old_parent_pid)` from a daemon thread once this process's parent
    (`parent`: the current one by default) has exited, at once if it already has (the process
    was re-parented); nothing to watch when that parent is init."""
    parent = os.getppid() if parent is None else parent
    if parent <= 1:
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        on_orphaned(parent)

    thread = threading.Thread(target=watch, name="mergeaudit-worker-watch", daemon=True)
    thread.start()
    return thread


def stop_run(
    worker_pid: int, grace: float = GRACE_SECONDS, logger: logging.Logger | logging.LoggerAdapter = LOG
) -> None:
    """SIGTERM this process (Prefect's engine ends the run Crashed), then exit after `grace` s."""
    # The dead worker's pipe breaks the console handler: rich raises SystemExit on a broken pipe,
    # which would end this thread here and stop nothing. The run logger's own handler (the API's:
    # the run's log in the UI) has the line by then; the console handler is its parent's.
    try:
        logger.error("the worker that started this run (pid %d) is gone: stopping the run", worker_pid)
    except BaseException:  # noqa: BLE001 - stopping matters more than the line
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(EXIT_CODE)


def end_with_worker(flow_run_id: str | None) -> None:
    """Stop this process when the worker that launched it for `flow_run_id` exits; a no-op in a
    process Prefect did not launch for this flow run, and when already watching. Call it in the
    flow's own run: the line goes to the run's log."""
    if _watching or not flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID") != str(flow_run_id):
        return
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        logger = get_run_logger()  # carries the run's id: the watcher thread has no run context
    except MissingContextError:
        logger = LOG
    thread = watch_parent(lambda worker_pid: stop_run(worker_pid, logger=logger), parent=_LAUNCHED_BY)
    if thread is not None:
        _watching.append(thread)
