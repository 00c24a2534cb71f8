"""Integration: `prefect server start` on a real PostgreSQL, the production database (the embedded
path and a bare server use SQLite). The test starts its own PostgreSQL from Debian's package
(`apt-get install postgresql`: /usr/lib/postgresql/VERSION/bin) on a free loopback port, runs
`mergeaudit audit` through the server, and finds the flow run both through Prefect's API and in
PostgreSQL's `flow_run` table. Without the binaries (or, as root, without the `postgres` user
that initdb and postgres insist on) it skips, saying why.

    pytest tests/test_prefect_postgres.py
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from mergeaudit.toy import build_toy_family
from tests.conftest import free_port, start_prefect_server, stop_process

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's layout, one folder per major version
PG_DB = "prefect"
PREFECT = [sys.executable, "-m", "prefect"]
MERGEAUDIT = os.path.join(os.path.dirname(sys.executable), "mergeaudit")
pytestmark = pytest.mark.integration

# Run in a child process: the test session may hold an ephemeral Prefect API of its own.
READ_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["merge-audit"])))
        print(json.dumps([{"id": str(r.id), "state": r.state.type.value if r.state else None} for r in runs]))

asyncio.run(main())
"""


def pg_bin() -> Path:
    """The newest PostgreSQL server binaries of Debian's package, or skip."""
    found = [Path(d) for d in glob.glob(PG_BIN_GLOB) if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists()]
    if not found:
        pytest.skip(f"no PostgreSQL server binaries (Debian package postgresql) under {PG_BIN_GLOB}")
    return max(found, key=lambda d: tuple(int(p) for p in d.parent.name.split(".") if p.isdigit()))


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else f"({path} not written)"


@contextlib.contextmanager
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 (trust auth, loopback only) with a database for Prefect.

    Its folder is not under pytest's tmp_path: as root the server runs as `postgres`, which
    cannot enter /tmp/pytest-of-root (mode 0700)."""
    bindir = pg_bin()
    as_pg: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and there is no runuser to run PostgreSQL as `postgres`")
        as_pg = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="mergeaudit-pg-"))
    data, sock, log = root / "data", root / "sock", root / "postgres.log"
    sock.mkdir()
    if as_pg:
        for path in (root, sock):
            os.chown(path, user.pw_uid, user.pw_gid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    port = free_port()

    def pg(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=env, cwd=root, capture_output=True, text=True, timeout=timeout)

    pg_ctl = [*as_pg, str(bindir / "pg_ctl"), "-D", str(data)]
    started = False
    try:
        # trust: no passwords on a throwaway server that listens on 127.0.0.1 and its own socket only
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        init = pg(*as_pg, *initdb, "--locale=C", "--no-sync")
        assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
        options = f"-h 127.0.0.1 -p {port} -k {sock} -F"  # -F: no fsync, a throwaway database
        started = True  # from here on, stop it whatever happens
        start = pg(*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", "90", "start")
        assert start.returncode == 0, start.stderr[-2000:] + _tail(log)
        client = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        made = pg(str(bindir / "createdb"), *client, PG_DB)
        assert made.returncode == 0, made.stderr[-2000:]

        def psql(sql: str) -> str:
            out = pg(str(bindir / "psql"), *client, "-d", PG_DB, "-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql)
            assert out.returncode == 0, out.stderr[-2000:]
            return out.stdout.strip()

        yield {"url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{PG_DB}", "psql": psql}
    finally:
        if started:
            stop = pg(*pg_ctl, "stop", "-m", "fast", "-w", "-t", "60")
            if stop.returncode != 0 and (data / "postmaster.pid").exists():
                pg(*pg_ctl, "stop", "-m", "immediate", "-w", "-t", "60")
        shutil.rmtree(root, ignore_errors=True)


def audit_config(tmp: Path) -> Path:
    """The smallest real audit: the toy base, one fine-tune, one merge, four evaluation items."""
    family = build_toy_family(str(tmp / "ckpts"), variants={"ft_a": 0.1})
    config = {
        "name": "pg-itest",
        "base": {"name": "base", "uri": family.base},
        "models": [{"name": "ft_a", "uri": family.variants["ft_a"], "kind": "rlvr"}],
        "strategies": [{"method": "task_arithmetic"}],
        "evaluation": {"limit": 4, "batch_size": 4},
        "results_uri": str(tmp / "results"),
    }
    (tmp / "audit.yaml").write_text(yaml.safe_dump(config))
    return tmp / "audit.yaml"


def test_server_on_postgresql_records_an_audit(tmp_path):
    with postgres() as pg:
        config = audit_config(tmp_path)
        port = free_port()
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        client_env.update(
            PREFECT_HOME=str(tmp_path / "home"),
            PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        )
        # clients know the API only; the database URL is the server's
        server_env = {**client_env, "PREFECT_API_DATABASE_CONNECTION_URL": pg["url"]}
        server = start_prefect_server(server_env, port, tmp_path / "server.log")
        try:
            audit = subprocess.run(
                [MERGEAUDIT, "audit", str(config)],
                env=client_env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-3000:]

            listed = subprocess.run(
                [sys.executable, "-c", READ_RUNS], env=client_env, capture_output=True, text=True, timeout=120
            )
            assert listed.returncode == 0, listed.stderr[-3000:]
            (run,) = json.loads(listed.stdout.strip().splitlines()[-1])
            assert run["state"] == "COMPLETED", run
            # the same run, in PostgreSQL's own table: the server kept it there, not in SQLite
            rows = pg["psql"](
                "SELECT r.id, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id WHERE f.name = 'merge-audit'"
            )
            assert rows == f"{run['id']}|COMPLETED"
            assert not list((tmp_path / "home").glob("*.db")), "the server wrote a SQLite database"
        finally:
            stop_process(server)  # the server before the database it holds connections to
