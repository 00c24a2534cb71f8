"""A flow run a worker launched ends when its worker does (flows/lifetime.py): real process
trees, the parent killed with SIGKILL as a dying worker is."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import alive

pytestmark = pytest.mark.integration  # child Pythons

# the "worker": starts the run process, prints its pid, then waits to be killed
WORKER = textwrap.dedent(
    """
    import subprocess, sys, time
    run = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
    print(run.pid, flush=True)
    time.sleep(600)
    """
)


def start_tree(run_code: str) -> tuple[subprocess.Popen, int]:
    worker = subprocess.Popen([sys.executable, "-c", WORKER, run_code], stdout=subprocess.PIPE, text=True)
    return worker, int(worker.stdout.readline())


def wait_gone(pid: int, seconds: float) -> float:
    start = time.time()
    while alive(pid) and time.time() - start < seconds:
        time.sleep(0.1)
    return time.time() - start


def test_the_watcher_fires_once_the_parent_dies_and_not_before(tmp_path):
    marker = tmp_path / "orphaned"
    run = textwrap.dedent(
        f"""
        import os, time
        from mergeaudit.flows.lifetime import watch_parent
        parent = os.getppid()
        watch_parent(lambda old: (open({str(marker)!r}, "w").write(f"{{old}} {{parent}}"), os._exit(3)), poll=0.2)
        time.sleep(600)
        """
    )
    worker, pid = start_tree(run)
    time.sleep(2)
    assert alive(pid) and not marker.exists()  # the worker lives: nothing happens
    worker.kill()
    worker.wait()
    assert wait_gone(pid, 10) < 10
    old, seen = marker.read_text().split()
    assert old == seen == str(worker.pid)  # called with the pid of the parent that died


def test_a_run_that_ignores_sigterm_still_exits_after_the_grace(tmp_path):
    run = textwrap.dedent(
        """
        import os, signal, time
        from mergeaudit.flows import lifetime
        signal.signal(signal.SIGTERM, lambda *a: None)   # a run stuck where SIGTERM does not end it
        lifetime.watch_parent(lambda old: lifetime.stop_run(old, grace=1.0), poll=0.2)
        time.sleep(600)
        """
    )
    worker, pid = start_tree(run)
    time.sleep(1)
    worker.kill()
    worker.wait()
    assert wait_gone(pid, 15) < 15


def test_stop_run_sigterms_the_process_even_when_its_log_line_raises_systemexit():
    code = textwrap.dedent(
        """
        import logging, sys, threading, time
        from mergeaudit.flows.lifetime import stop_run

        class DeadPipe(logging.Handler):  # rich's console handler on the dead worker's pipe
            def emit(self, record):
                raise SystemExit(1)

        class Api(logging.Handler):  # the run logger's own handler, before its parents'
            def emit(self, record):
                sys.stderr.write(record.getMessage() + "\\n")

        logging.getLogger("prefect").addHandler(DeadPipe())
        log = logging.getLogger("prefect.flow_runs")
        log.addHandler(Api())
        threading.Thread(target=stop_run, args=(1,), kwargs={"grace": 30, "logger": log}, daemon=True).start()
        time.sleep(60)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM
    assert done.stderr.count("the worker that started this run (pid 1) is gone") == 1


def test_processes_prefect_did_not_launch_for_the_run_are_left_alone(monkeypatch):
    from mergeaudit.flows import lifetime

    started = []
    monkeypatch.setattr(lifetime, "watch_parent", lambda *a, **k: started.append(a))
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    lifetime.end_with_worker("r1")  # `mergeaudit audit`, the demo: no worker launched it
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "r0")
    lifetime.end_with_worker("r1")  # a subflow of the run the worker launched
    lifetime.end_with_worker(None)
    assert started == []
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "r1")
    monkeypatch.setattr(lifetime, "_watching", [])
    lifetime.end_with_worker("r1")
    assert len(started) == 1


def test_a_worker_gone_before_the_flows_first_line_is_seen(tmp_path):
    """The parent is the one at import (the flow's module loads before the run turns Running):
    a worker that dies before `end_with_worker` runs still stops the run."""
    marker = tmp_path / "stopped"
    run = textwrap.dedent(
        f"""
        import os, time
        os.environ["PREFECT__FLOW_RUN_ID"] = "r1"
        from mergeaudit.flows import lifetime
        parent = os.getppid()
        while os.getppid() == parent:  # the worker dies before the flow's first line
            time.sleep(0.05)
        lifetime.stop_run = lambda pid, **kw: (open({str(marker)!r}, "w").write(str(pid)), os._exit(3))
        lifetime.end_with_worker("r1")
        time.sleep(600)
        """
    )
    worker, pid = start_tree(run)
    time.sleep(8)  # the run has imported lifetime (and prefect)
    worker.kill()
    worker.wait()
    assert wait_gone(pid, 20) < 20
    assert marker.read_text() == str(worker.pid)
