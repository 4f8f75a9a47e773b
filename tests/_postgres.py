"""A throwaway PostgreSQL cluster for the database-consumer tests (issue 13).

``initdb`` and ``pg_ctl`` of the installed PostgreSQL (``/usr/lib/postgresql/*/bin``, else
PATH) make a cluster in a temp folder, listening on a Unix socket there only (no TCP), run as
an unprivileged user (uid 65534) when the tests run as root; it is stopped and removed at the
end of the session. Each test gets a database of its own (``pg_dsn``). Without the binaries or
psycopg the tests skip, unless ``CI`` or ``EVENTPIPE_REQUIRE_POSTGRES`` is set: then they fail
saying what is missing (``.ci/install-postgres.sh`` installs them).

Use the fixtures by importing them into a test module::

    from ._postgres import pg_dsn, postgres_cluster  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["bin_dir", "pg_dsn", "postgres_cluster"]

NOBODY = 65534
_counter = itertools.count()


def bin_dir() -> str | None:
    """The folder of the newest installed initdb and pg_ctl, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _require() -> str:
    where = bin_dir()
    missing = []
    if where is None:
        missing.append("PostgreSQL server binaries (initdb, pg_ctl: apt-get install postgresql)")
    if importlib.util.find_spec("psycopg") is None:
        missing.append("psycopg 3 (pip install 'eventpipe[postgres]')")
    if missing:
        text = "missing " + " and ".join(missing)
        if os.environ.get("CI") or os.environ.get("EVENTPIPE_REQUIRE_POSTGRES"):
            pytest.fail(text)
        pytest.skip(text)
    assert where is not None
    return where


def _as_owner() -> None:
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, preexec_fn=_as_owner, capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[str]:
    """A running cluster; yields the DSN of its ``postgres`` database (superuser postgres)."""
    where = _require()
    top = tempfile.mkdtemp(prefix="eventpipe-pg-")
    os.chmod(top, 0o755)
    if os.geteuid() == 0:
        os.chown(top, NOBODY, NOBODY)
    data = os.path.join(top, "data")
    _run([f"{where}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
          "--no-sync"])
    opts = f"-k {top} -c listen_addresses='' -c max_connections=60"
    try:
        _run([f"{where}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(top, "log"), "-w",
              "-t", "60", "start"])
        yield f"host={top} dbname=postgres user=postgres"
    finally:
        subprocess.run([f"{where}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                       preexec_fn=_as_owner, capture_output=True, timeout=60, check=False)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def pg_dsn(postgres_cluster: str) -> Iterator[str]:
    """A fresh database in the session's cluster, dropped afterwards."""
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(postgres_cluster, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = postgres_cluster.replace("dbname=postgres", f"dbname={name}")
    yield dsn
    with psycopg.connect(postgres_cluster, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql, params).fetchall())
