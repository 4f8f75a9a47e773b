"""README's systemd deployment, run as written, in a throwaway systemd container.

The ``sh`` block of README's "## systemd" section (the one starting "# as root, from a
checkout of eventpipe") is read from README.md at test time and each of its commands runs
literally, as root, in a booted ``systemd-nspawn --volatile=yes`` container of the host's root
(see tests/test_systemd.py), from a copy of this checkout. Two things differ from a real
machine, neither by rewriting a command:

- ``pip install .`` has no package index: the environment gives pip a local folder of wheels
  instead (PIP_NO_INDEX, PIP_FIND_LINKS), holding the build backend and eventpipe's
  dependencies repacked from this test run's own virtualenv. pip still builds the checkout
  and installs it and its dependencies into /opt/eventpipe/venv, as README says.
- ``systemctl status`` is run until its Status: line shows an offset, not once.

Then the env file README installs is edited where README says to (log path, handler), the
shipped handler runs under the shipped unit, and a root ``eventpipe append`` that starts a
new segment must leave the log usable by the service user, who appends after it while the
unit keeps consuming.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ._wait import wait_until
from .test_systemd import PROBE, Container, _container, machine_lock, skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK_START = "# as root, from a checkout of eventpipe"
CHECKOUT = "/srv/eventpipe"  # the checkout's copy, in the container: the block's cwd
WHEELHOUSE = "/srv/wheelhouse"  # wheels pip takes instead of an index
UNIT = "eventpipe-consumer@counter"
ENV_FILE = "/etc/eventpipe/counter.env"
LOG = "/var/lib/eventpipe/counter"  # the log path the edit puts in the env file
HANDLER = "counter_consumer:handle"  # the shipped handler, where README installs it
VENV_BIN = "/opt/eventpipe/venv/bin"
ROOT_ENV = ("HOME=/root",)  # a root shell's; no EVENTPIPE_* variables
# The service user, as its units run it (systemd/eventpipe-writer-example.service): user and
# primary group eventpipe, EVENTPIPE_FILE_MODE=0660. (setpriv, not runuser: the container has
# no PAM configuration.)
AS_SERVICE = ("setpriv", "--reuid=eventpipe", "--regid=eventpipe", "--clear-groups", "--",
              "env", "EVENTPIPE_FILE_MODE=0660")
SEGMENT_MAX_BYTES = 16 * 1024 * 1024  # the default: root's append must go past it


# ---------------------------------------------------------------------- README's block


def readme_block() -> list[str]:
    """The commands of README's deployment block: comment-only lines dropped, continuation
    lines joined, each command as written (trailing comments included: sh ignores them)."""
    text = README.read_text()
    section = re.search(r"^## systemd\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, "README has no '## systemd' section"
    blocks = re.findall(r"^```sh\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    chosen = [b for b in blocks if b.startswith(BLOCK_START)]
    assert len(chosen) == 1, f"README's systemd section has no sh block starting {BLOCK_START!r}"
    commands: list[str] = []
    pending = ""
    for line in chosen[0].splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, "README's block ends in a continuation line"
    return commands


def bare(command: str) -> str:
    """The command without its trailing comment (for recognising it; it runs as written)."""
    return re.sub(r"\s+#.*$", "", command).strip()


def test_readme_block_is_what_this_test_expects() -> None:
    """The steps the deployment test treats specially are there, once each (a README that
    drops or renames one fails here, not halfway through a container run)."""
    commands = [bare(c) for c in readme_block()]
    assert sum("pip install ." in c for c in commands) == 1, commands
    assert sum(ENV_FILE in c and c.startswith("install ") for c in commands) == 1, commands
    assert commands[-1] == f"systemctl status {UNIT}", commands
    assert f"systemctl enable --now {UNIT}" in commands, commands
    assert not any("systemctl status" in c for c in commands[:-1]), commands


# ---------------------------------------------------------------------- offline wheels


def _requirements(dist: metadata.Distribution) -> list[str]:
    wanted = []
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            wanted.append(req.name)
    return wanted


def repack_wheel(dist: metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists (scripts, which
    live outside site-packages and which pip regenerates from entry_points.txt, left out)."""
    files = [f for f in dist.files or []
             if not str(f).startswith("..") and "__pycache__" not in f.parts]
    info = next(f.parent for f in files
                if f.name == "METADATA" and f.parent.name.endswith(".dist-info"))
    tag = next(line.split(":", 1)[1].strip()
               for line in (dist.read_text("WHEEL") or "").splitlines()
               if line.startswith("Tag:"))
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    path = out / f"{name}-{dist.version}-{tag}.whl"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for f in files:
            if f.parent == info and f.name in ("RECORD", "INSTALLER", "REQUESTED",
                                               "direct_url.json"):
                continue
            data = Path(str(dist.locate_file(f))).read_bytes()
            wheel.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{f},sha256={digest.decode()},{len(data)}")
        record.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def make_wheelhouse(out: Path) -> None:
    """eventpipe's dependencies (and theirs) and the build backend, as installed here."""
    out.mkdir()
    todo = [*_requirements(metadata.distribution("eventpipe")), "setuptools"]
    seen: set[str] = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        repack_wheel(dist, out)
        todo += _requirements(dist)


def copy_checkout(dest: Path) -> None:
    """The working tree, without what git ignores that matters here (pip builds in it)."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache",
        ".pytest_cache", ".hypothesis", "build", "dist"))


def system_python_version() -> tuple[int, int] | None:
    try:
        out = subprocess.run(["/usr/bin/python3", "-c",
                              "import sys, ensurepip; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    major, minor = map(int, out.split())
    return major, minor


@pytest.fixture
def deploy_box(tmp_path: Path) -> Iterator[tuple[Container, Path, list[str]]]:
    """A booted container with the checkout's copy at CHECKOUT and the wheels at WHEELHOUSE;
    also the host folder bound at its /var/lib/eventpipe and the environment pip runs with."""
    version = system_python_version()
    if version is None or version < (3, 11):
        skip_or_fail("README's deployment needs /usr/bin/python3 3.11+ with its venv module "
                     f"(found {version}; Debian: python3-venv)")
    checkout, wheels = tmp_path / "checkout", tmp_path / "wheels"
    copy_checkout(checkout)
    make_wheelhouse(wheels)
    pip_env = [f"PIP_FIND_LINKS={WHEELHOUSE}", "PIP_DISABLE_PIP_VERSION_CHECK=1"]
    if version == sys.version_info[:2]:
        pip_env.append("PIP_NO_INDEX=1")
    # else the binary wheels repacked here do not fit the system's Python: pip may also use
    # the index (CI reaches PyPI).
    binds = [f"--bind={checkout}:{CHECKOUT}", f"--bind-ro={wheels}:{WHEELHOUSE}"]
    with machine_lock():
        for box, data in _container(tmp_path, binds):
            yield box, data, pip_env


# ---------------------------------------------------------------------- the test


def sh(box: Container, command: str, *env: str, timeout: float = 60,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command line of README's block as root, from the checkout."""
    return box.run("env", *ROOT_ENV, *env, "sh", "-c", f"cd {CHECKOUT} || exit 1\n{command}",
                   timeout=timeout, check=check)


def edit_env_file(box: Container) -> None:
    """What README's comment says to edit in the installed env file: log path and handler."""
    shipped = (ROOT / "systemd" / "example.env").read_text()
    installed = box.run("cat", ENV_FILE).stdout
    assert installed == shipped
    edits = {"EVENTPIPE_LOG_PATH": LOG, "EVENTPIPE_HANDLER": HANDLER}
    lines = installed.splitlines(keepends=True)
    for key, value in edits.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
        assert len(at) == 1, f"example.env should set {key} once: {at}"
        lines[at[0]] = f"{key}={value}\n"
    box.write(ENV_FILE, "".join(lines), mode="0640")
    mode = box.run("stat", "-c", "%a %U %G", ENV_FILE).stdout.split()
    assert mode == ["640", "root", "root"], mode


def deploy(box: Container, pip_env: list[str]) -> str:
    """README's block, command by command; returns the output of its `systemctl status`."""
    commands = readme_block()
    status = ""
    for command in commands:
        if "pip install ." in command:
            # No index in the test: pip finds the backend and dependencies in WHEELHOUSE.
            sh(box, command, *pip_env, timeout=300)
        elif bare(command).startswith("systemctl status"):
            def shows_offset(command: str = command) -> str | None:
                out = sh(box, command, check=False).stdout
                return out if re.search(r'Status: "consumer counter: offset \d+, lag \d+"',
                                        out) else None
            status = wait_until(shows_offset, f"`{bare(command)}` to show an offset", 60, PROBE)
        else:
            sh(box, command, timeout=120)
            if ENV_FILE in command and bare(command).startswith("install "):
                edit_env_file(box)  # "# edit: log path, handler"
    assert status, "README's block has no systemctl status line"
    return status


def append(box: Container, events: list[dict[str, Any]], *prefix: str) -> str:
    """`eventpipe append` (the venv's) of ``events`` into the log; returns its stderr."""
    lines = "".join(json.dumps(e) + "\n" for e in events)
    result = box.run(*prefix, f"{VENV_BIN}/eventpipe", "append", LOG, stdin=lines, timeout=120,
                     check=False)
    assert result.returncode == 0, (prefix, result.stdout, result.stderr)
    assert "Error" not in result.stderr, result.stderr
    return result.stderr


def expected_state(kinds: list[str]) -> dict[str, Any]:
    """What examples/counter_consumer.py makes of events of these types, in this order."""
    by_type: dict[str, int] = {}
    for kind in kinds:
        by_type[kind] = by_type.get(kind, 0) + 1
    return {"events": len(kinds), "by_type": by_type, "last_offset": len(kinds) - 1}


def consumer_show(box: Container) -> dict[str, Any]:
    out = box.run(f"{VENV_BIN}/eventpipe", "consumer", "show", LOG, "counter", "--json").stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def wait_for_state(box: Container, kinds: list[str]) -> dict[str, Any]:
    """The consumer's checkpoint, once it holds everything appended so far (as root sees it
    with `eventpipe consumer show`), which must be what the handler makes of the events."""
    def caught_up() -> dict[str, Any] | None:
        doc = consumer_show(box)
        return doc if doc["offset"] == len(kinds) == doc["head"] else None

    doc: dict[str, Any] = wait_until(caught_up, f"the consumer's checkpoint at offset "
                                     f"{len(kinds)}", 60, PROBE)
    assert doc["state"] == expected_state(kinds)
    assert doc["error"] is None and len(doc["running_pids"]) == 1, doc
    return doc


def files_in_log(box: Container) -> dict[str, tuple[str, str, int]]:
    """Every path in the log: (owner, group, mode)."""
    out = box.run("find", LOG, "-printf", r"%p %u %g %m\n").stdout
    found = {}
    for line in out.splitlines():
        path, user, group, mode = line.rsplit(" ", 3)
        found[path] = (user, group, int(mode, 8))
    return found


def service_can_write(owner: str, group: str, mode: int) -> bool:
    return (owner == "eventpipe" and mode & 0o200 != 0) or (group == "eventpipe"
                                                            and mode & 0o020 != 0)


def unit_is_healthy(box: Container) -> None:
    props = box.show(UNIT, "ActiveState", "SubState", "NRestarts")
    assert props == {"ActiveState": "active", "SubState": "running", "NRestarts": "0"}, props


def test_readme_systemd_deployment(deploy_box: tuple[Container, Path, list[str]]) -> None:
    box, _data, pip_env = deploy_box
    try:
        check_deployment(box, pip_env)
    except BaseException:
        print(box.run("systemctl", "status", "--no-pager", "--full", UNIT, check=False).stdout)
        print(box.run("journalctl", "--unit", UNIT, "--no-pager", "-n", "60",
                      check=False).stdout)
        raise


def check_deployment(box: Container, pip_env: list[str]) -> None:
    status = deploy(box, pip_env)
    # The unit runs the venv README made (not this test's), with the shipped sandbox.
    assert "Active: active (running)" in status, status
    assert f"{VENV_BIN}/eventpipe consume --create" in status, status
    where = box.run(f"{VENV_BIN}/python", "-I", "-c",
                    "import eventpipe; print(eventpipe.__file__)").stdout.strip()
    assert where.startswith("/opt/eventpipe/venv/lib/"), where  # installed, not a link back
    unit_is_healthy(box)
    # Made by the unit (--create): its user, EVENTPIPE_FILE_MODE's folder mode (and the
    # setgid bit a folder made in /var/lib/eventpipe inherits).
    owner, group, mode = box.run("stat", "-c", "%U %G %a", LOG).stdout.split()
    assert (owner, group, int(mode, 8) & 0o777) == ("eventpipe", "eventpipe", 0o770), mode

    # The service user appends (as a writer unit would); the shipped handler counts.
    kinds = [("click", "view", "buy")[i % 3] for i in range(300)]
    append(box, [{"type": k, "n": i} for i, k in enumerate(kinds)], *AS_SERVICE)
    wait_for_state(box, kinds)

    # Root appends past a segment's size: the command becomes the log's owner, and every
    # file it makes (a new segment, the sealed one's .sum and .gz...) stays the service's.
    before = files_in_log(box)
    pad = "x" * 1000
    bulk = [{"type": "bulk", "pad": pad} for _ in range(SEGMENT_MAX_BYTES // len(pad) + 500)]
    stderr = append(box, bulk)
    assert "running as eventpipe (uid" in stderr, stderr  # it says whom it runs as
    kinds += ["bulk"] * len(bulk)
    after = files_in_log(box)
    new = sorted(set(after) - set(before))
    assert any(re.fullmatch(rf"{LOG}/segments/\d{{20}}\.jsonl", p) for p in new), new
    cannot = {p: a for p, a in after.items() if not service_can_write(*a)}
    assert not cannot, f"files the service user cannot write after root's append: {cannot}"
    wait_for_state(box, kinds)
    unit_is_healthy(box)

    # The service user goes on appending to what root's append left (its active segment,
    # head, locks), and the unit goes on consuming it.
    more = [("view", "refund")[i % 2] for i in range(200)]
    append(box, [{"type": k} for k in more], *AS_SERVICE)
    kinds += more
    wait_for_state(box, kinds)
    unit_is_healthy(box)
    cannot = {p: a for p, a in files_in_log(box).items() if not service_can_write(*a)}
    assert not cannot, cannot
    wait_until(lambda: box.show(UNIT, "StatusText")["StatusText"]
               == f"consumer counter: offset {len(kinds)}, lag 0",
               "the unit's Status to show the head", 30, PROBE)
    # And the log checks out as README's group-shared deployment says to check it.
    verify = box.run("env", "EVENTPIPE_FILE_MODE=0660", f"{VENV_BIN}/eventpipe", "verify", LOG,
                     check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
