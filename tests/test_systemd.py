"""The systemd units in systemd/: static checks, then a consumer run by a real systemd.

The static part runs ``systemd-analyze verify`` and ``security`` on the unit files, in a
scratch root so that neither the host's units nor the absence of /opt/eventpipe matter.

The integration part boots the host's own root as a throwaway container (``systemd-nspawn
--volatile=yes``: a tmpfs root with the host's /usr, nothing persists), installs the shipped
sysusers, tmpfiles and unit files into it, and runs ``eventpipe-consumer@counter.service``
on a log folder bound in from the host, which the test appends to from outside. It needs
root and systemd-nspawn (``.ci/install-systemd.sh``); without them it skips, unless
``EVENTPIPE_REQUIRE_NSPAWN=1`` (set in CI) turns the skip into a failure.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventpipe import EventLog

from ._wait import wait_until

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
CONSUMER_TEMPLATE = "eventpipe-consumer@.service"
# Every unit file shipped in systemd/, so a new one cannot escape verification.
UNIT_SUFFIXES = (".service", ".path", ".socket", ".timer", ".target", ".mount")
# The overall exposure ``systemd-analyze security`` may report (0 best, 10 worst). The units
# score 0.5 today; anything above this means hardening was lost.
MAX_EXPOSURE = 1.5
PROBE = 0.1  # seconds between polls of a container (each runs systemctl or journalctl in it)

PATH_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS.iterdir() if p.suffix in UNIT_SUFFIXES)


def instance_name(unit: Path) -> str:
    """The name to verify a unit under: templates need an instance."""
    return unit.name.replace("@.", "@demo.")


# ------------------------------------------------------------------------- static checks


def _exec_paths(unit_text: str) -> set[str]:
    """Absolute programs the Exec*= lines of a unit run (prefixes such as - @ + ! stripped)."""
    joined = re.sub(r"\\\n", " ", unit_text)
    paths = set()
    for m in re.finditer(r"^Exec\w+=\s*[-@:+!|]*(\S+)", joined, re.MULTILINE):
        if m.group(1).startswith("/"):
            paths.add(m.group(1))
    return paths


def make_scratch_root(root: Path, units: list[Path]) -> None:
    """A root for ``systemd-analyze --root``: the host's stock units, ours in /etc, and stub
    executables at the paths our units run, so the check needs nothing from the host's
    /etc or /opt and sees exactly what a fresh deployment would."""
    for name in ("bin", "sbin", "lib", "lib64"):
        host = Path("/") / name
        if host.is_symlink():  # merged /usr: keep the same layout
            target = os.readlink(host)
            (root / name).symlink_to(target)
            (root / name).resolve().mkdir(parents=True, exist_ok=True)
    # The stock units (sysinit.target, paths.target...) our units are ordered against.
    for folder in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if not folder.is_dir():
            continue
        dest = root / folder.resolve().relative_to("/")
        if not dest.exists():
            shutil.copytree(folder, dest, symlinks=True)
    etc = root / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, etc / unit.name)
        if instance_name(unit) != unit.name:
            (etc / instance_name(unit)).symlink_to(unit.name)
        for program in _exec_paths(unit.read_text()):
            stub = root / program.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            if not stub.exists():
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
    (root / "etc" / "eventpipe").mkdir()
    shutil.copy(UNITS / "example.env", root / "etc" / "eventpipe" / "demo.env")


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", f"--root={root}", *args],
        capture_output=True, text=True, timeout=60, env=PATH_ENV, cwd=root, check=False)


def verify_problems(root: Path, names: list[str]) -> list[str]:
    """Everything ``systemd-analyze verify`` says about the units (it exits 0 on warnings,
    such as unknown keys or unparsable values, so any output at all counts as a problem).
    No output is filtered: the scratch root provides everything the units refer to."""
    result = analyze(root, "verify", *names)
    problems = (result.stdout + result.stderr).splitlines()
    if result.returncode != 0:
        problems.append(f"systemd-analyze verify exited with status {result.returncode}")
    return problems


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (package systemd)")


def test_every_unit_is_listed() -> None:
    names = [u.name for u in unit_files()]
    assert CONSUMER_TEMPLATE in names
    assert "eventpipe-writer-example.service" in names


@needs_analyze
def test_units_verify_without_warnings(tmp_path: Path) -> None:
    units = unit_files()
    make_scratch_root(tmp_path, units)
    problems = verify_problems(tmp_path, [instance_name(u) for u in units])
    assert problems == [], "\n".join(problems)


@needs_analyze
def test_verify_check_catches_a_bad_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key and a bad value are reported."""
    template = UNITS / CONSUMER_TEMPLATE
    broken = tmp_path / "src" / CONSUMER_TEMPLATE
    broken.parent.mkdir()
    broken.write_text(template.read_text().replace(
        "NotifyAccess=main", "NotifyAccess=main\nNotifyAcess=main\nRestartSec=soon", 1))
    root = tmp_path / "root"
    root.mkdir()
    make_scratch_root(root, [broken])
    problems = verify_problems(root, [instance_name(broken)])
    assert any("Unknown key 'NotifyAcess'" in p for p in problems), problems
    assert any("soon" in p for p in problems), problems


@needs_analyze
@pytest.mark.parametrize("unit", [u.name for u in unit_files() if u.suffix == ".service"])
def test_service_sandbox_exposure(tmp_path: Path, unit: str) -> None:
    make_scratch_root(tmp_path, unit_files())
    name = unit.replace("@.", "@demo.")
    result = analyze(tmp_path, "security", "--offline=yes", "--no-pager", name)
    assert result.returncode == 0, result.stdout + result.stderr
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert m, result.stdout
    assert float(m.group(1)) <= MAX_EXPOSURE, result.stdout


def _env_file_keys(text: str) -> dict[str, str]:
    pairs = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            pairs[key] = value
    return pairs


def test_example_env_names_only_real_options() -> None:
    """eventpipe ignores unknown EVENTPIPE_* variables, so a typo would pass silently."""
    from eventpipe._config import LOG_OPTIONS
    from eventpipe._consumer import CONSUMER_OPTIONS

    known = {o.env_name for o in (*LOG_OPTIONS, *CONSUMER_OPTIONS)}
    known |= {"EVENTPIPE_LOG_PATH", "EVENTPIPE_HANDLER", "EVENTPIPE_INITIAL_STATE",
              "EVENTPIPE_CONSUMER_NAME"}
    text = UNITS / "example.env"
    pairs = _env_file_keys(text.read_text())
    commented = re.findall(r"^#(EVENTPIPE_\w+)=", text.read_text(), re.MULTILINE)
    for key in [*pairs, *commented]:
        if key.startswith("EVENTPIPE_"):
            assert key in known, f"example.env sets {key}, which is no eventpipe option"
    assert {"EVENTPIPE_LOG_PATH", "EVENTPIPE_HANDLER"} <= pairs.keys()


def test_example_env_and_the_shipped_handler_work_together(tmp_path: Path) -> None:
    """The pair shipped to be deployed together must work together: once the env file set an
    initial state the shipped handler could not use (KeyError on the first event)."""
    text = (UNITS / "example.env").read_text()
    pairs = _env_file_keys(text)
    module = pairs["EVENTPIPE_HANDLER"].split(":")[0]
    assert (ROOT / "examples" / f"{module}.py").exists()
    initial = pairs.get("EVENTPIPE_INITIAL_STATE", "null").strip("'")
    log = tmp_path / "log"
    with EventLog(log) as opened:
        opened.append_many([{"type": "order", "n": i} for i in range(5)])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples") + os.pathsep + str(ROOT),
           "EVENTPIPE_INITIAL_STATE": initial}
    proc = subprocess.run([sys.executable, "-m", "eventpipe", "consume", str(log), "--name",
                           "counter", "--handler", pairs["EVENTPIPE_HANDLER"], "--catch-up",
                           "--print-state"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["events"] == 5


# ---------------------------------------------------------------------- the container


def skip_or_fail(reason: str) -> None:
    if os.environ.get("EVENTPIPE_REQUIRE_NSPAWN") == "1":
        pytest.fail(f"{reason} (EVENTPIPE_REQUIRE_NSPAWN=1: not skipping)")
    pytest.skip(reason)




def under(path: Path, *parents: str) -> bool:
    return any(path == Path(p) or Path(p) in path.parents for p in parents)


class Container:
    """A booted ``systemd-nspawn`` container of the host's root; commands run via nsenter."""

    def __init__(self, nspawn: subprocess.Popen[bytes], console: Path) -> None:
        self.nspawn = nspawn
        self.console = console
        self.pid1 = 0

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def find_pid1(self) -> int:
        """The container's init: the nspawn process's child that is pid 1 in its namespace."""
        pid = self.nspawn.pid
        kids: list[str] = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                kids += (task / "children").read_text().split()
            except OSError:
                continue
        for kid in kids:
            try:
                status = Path(f"/proc/{kid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^NSpid:\s*(.*)$", status, re.MULTILINE)
            if m and m.group(1).split()[-1] == "1" and len(m.group(1).split()) > 1:
                return int(kid)
        return 0

    def run(self, *cmd: str, stdin: str | None = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *cmd], input=stdin, capture_output=True,
            text=True, timeout=timeout, env=PATH_ENV, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"in the container, {' '.join(cmd)} exited {result.returncode}:\n"
                        f"{result.stdout}{result.stderr}")
        return result

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                 "sh", path, mode, stdin=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def system_state(self) -> str:
        result = self.run("systemctl", "is-system-running", check=False, timeout=10)
        return result.stdout.strip()

    def close(self) -> None:
        """Power the container off (SIGTERM to nspawn); kill it if that takes too long.

        Killing the container's pid 1 kills every process in its pid namespace, so nothing
        started inside can outlive the test.
        """
        proc = self.nspawn
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                if self.pid1:
                    with suppress(ProcessLookupError):
                        os.kill(self.pid1, signal.SIGKILL)
                proc.kill()
                proc.wait(timeout=20)


def nspawn_binds(data: Path, handlers: Path) -> list[str]:
    """Bind mounts: the checkout (read-only, at its own path, since the venv's scripts and
    the editable install name it), the venv again at /opt/eventpipe/venv where the unit looks,
    the base Python the venv links to unless /usr already provides it, the log folder and the
    test handler. With --volatile=yes only /usr comes from the host; everything else is here."""
    venv = Path(sys.prefix)
    base = Path(sys.base_prefix).resolve()
    binds = [f"--bind-ro={ROOT}"]
    if not under(venv, str(ROOT)):
        binds.append(f"--bind-ro={venv}")
    binds.append(f"--bind-ro={venv}:/opt/eventpipe/venv")
    if not under(base, "/usr", str(ROOT), str(venv)):
        binds.append(f"--bind-ro={base}")
    binds += [f"--bind={data}:/var/lib/eventpipe", f"--bind-ro={handlers}:/opt/eventpipe-test"]
    return binds


@contextmanager
def machine_lock(timeout: float = 180) -> Iterator[None]:
    """One test container at a time on this machine, whichever test session runs it.

    With --keep-unit every container's systemd manages the cgroup tree below the one it was
    started in, so two containers started from the same cgroup create the same
    system.slice/... cgroups and break each other's units (status=219/CGROUP).
    """
    folder = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
    with open(folder / "eventpipe-test-nspawn.lock", "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    skip_or_fail(f"another test kept {f.name} locked for {timeout} s")
                time.sleep(0.2)
        yield  # closing the file releases the lock


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[Container, Path]]:
    """A booted container, and the host folder bound at its /var/lib/eventpipe."""
    with machine_lock():
        yield from _container(tmp_path)


def _container(tmp_path: Path, binds: list[str] | None = None
               ) -> Iterator[tuple[Container, Path]]:
    """Boot the container; ``binds`` (nspawn options) replace nspawn_binds' checkout, venv and
    handler binds (the folder bound at /var/lib/eventpipe is always there)."""
    if os.geteuid() != 0:
        skip_or_fail("booting a systemd-nspawn container needs root")
    for tool in ("systemd-nspawn", "nsenter", "systemctl"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed (run .ci/install-systemd.sh)")
    if binds is None and sys.prefix == sys.base_prefix:
        skip_or_fail("the tests must run from a virtualenv (it is bound into the container)")
    data = tmp_path / "var-lib-eventpipe"
    handlers = tmp_path / "handlers"
    for folder in (data, handlers):
        folder.mkdir()
        folder.chmod(0o755)
    (handlers / "counter_handler.py").write_text(HANDLER)
    (handlers / "counter_handler.py").chmod(0o644)
    console = tmp_path / "console.txt"
    cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "--volatile=yes", "-D", "/",
           f"--machine=eventpipe-test-{os.getpid()}",
           *(nspawn_binds(data, handlers) if binds is None
             else [*binds, f"--bind={data}:/var/lib/eventpipe"]),
           "-b", "--", "systemd.mask=systemd-firstboot.service"]
    with open(console, "wb") as out:
        nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, env=PATH_ENV)
    box = Container(nspawn, console)
    try:
        deadline = time.monotonic() + 60
        state = ""
        while state not in ("running", "degraded"):
            if nspawn.poll() is not None:
                skip_or_fail(f"the container did not boot: systemd-nspawn exited with status "
                             f"{nspawn.returncode}:\n{box.console_tail()}")
            if time.monotonic() > deadline:
                skip_or_fail(f"the container did not boot within 60 s (system state "
                             f"{state!r}):\n{box.console_tail()}")
            if not box.pid1:
                box.pid1 = box.find_pid1()
            if box.pid1:
                state = box.system_state()
            if state not in ("running", "degraded"):
                time.sleep(0.1)
        yield box, data
    finally:
        box.close()


# ------------------------------------------------------------------- the consumer unit

HANDLER = '''\
"""Test handler: counts events and sums their "v", refusing any replay or gap."""


def count(state, event, offset):
    if offset != state["count"] or event["i"] != offset:
        raise RuntimeError(
            f"event {event} at offset {offset} after {state['count']} events: "
            "an event was replayed or skipped")
    return {"count": state["count"] + 1, "sum": state["sum"] + event["v"]}
'''


def value(i: int) -> int:
    return (i * 7919) % 1000


# Appends events {"i": offset, "v": value(offset)} to the log, from outside the container:
# COUNT of them, or with COUNT -1 batches of 50 every 20 ms until a line arrives on stdin.
# Prints how many it appended.
WRITER = '''\
import select, sys
from eventpipe import EventLog
path, count = sys.argv[1], int(sys.argv[2])
done = 0
with EventLog(path, segment_max_events=1000, file_mode=0o660, trust_owner=True) as log:
    while count < 0 or done < count:
        n = log.head
        k = 50 if count < 0 else min(500, count - done)
        got = log.append_many([{"i": i, "v": (i * 7919) % 1000} for i in range(n, n + k)])
        assert got.start == n, (got, n)  # the only writer: offsets are contiguous
        done += k
        if count < 0 and select.select([sys.stdin], [], [], 0.02)[0]:
            break
print(done, flush=True)
'''

UNIT = "eventpipe-consumer@counter.service"
LOG_IN_CONTAINER = "/var/lib/eventpipe/counter"


def writer_cmd(log: Path, count: int) -> list[str]:
    return [sys.executable, "-c", WRITER, str(log), str(count)]


def writer_env() -> dict[str, str]:
    # The same file mode as the units, so the consumer (same group) can use what it creates.
    return {**PATH_ENV, "PYTHONPATH": str(ROOT), "EVENTPIPE_FILE_MODE": "0660"}


def read_checkpoint(log: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = orjson.loads((log / "consumers" / "counter.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return doc


def log_head(log: Path) -> int:
    with EventLog(log, file_mode=0o660, trust_owner=True) as opened:
        return opened.head


def install_basics(box: Container) -> int:
    """Deployment step 2 of the units' headers, with the shipped files; returns the gid."""
    box.write("/etc/sysusers.d/eventpipe.conf", (UNITS / "eventpipe.sysusers").read_text())
    box.run("systemd-sysusers")
    box.write("/etc/tmpfiles.d/eventpipe.conf", (UNITS / "eventpipe.tmpfiles").read_text())
    box.run("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/eventpipe.conf")
    return int(box.run("id", "-g", "eventpipe").stdout)


def install_unit(box: Container, name: str, instance: str | None = None, *,
                 log_exit: bool = True) -> None:
    """Copy systemd/NAME into the container's /etc/systemd/system, plus test drop-ins."""
    box.write(f"/etc/systemd/system/{name}", (UNITS / name).read_text())
    if not name.endswith(".service"):
        return
    unit = instance or name
    hidden = {p for p in (ROOT, Path(sys.prefix), Path(sys.base_prefix).resolve())
              if under(p, "/home", "/root", "/run/user")}
    hidden = {p for p in hidden if not any(q in p.parents for q in hidden)}
    if hidden:
        # This machine's Python or checkout lives where ProtectHome=yes hides it: the drop-in
        # the consumer unit's header recommends for that case (real installs use /opt, /usr).
        box.write(f"/etc/systemd/system/{unit}.d/50-python-in-home.conf", "[Service]\n"
                  "ProtectHome=tmpfs\n"
                  f"BindReadOnlyPaths={' '.join(sorted(map(str, hidden)))}\n")
    if any(under(p, "/tmp", "/var/tmp") for p in (ROOT, Path(sys.prefix))):
        # A checkout (CI's clone) under /tmp: PrivateTmp=yes would hide it from the service.
        box.write(f"/etc/systemd/system/{unit}.d/51-checkout-in-tmp.conf", "[Service]\n"
                  "PrivateTmp=no\n")
    if not log_exit:
        return
    # Test only: log how each run ended (systemd passes these variables to ExecStopPost=).
    box.write(f"/etc/systemd/system/{unit}.d/60-log-exit-status.conf", "[Service]\n"
              "ExecStopPost=/bin/sh -c 'echo stop-post: result=$$SERVICE_RESULT "
              "code=$$EXIT_CODE status=$$EXIT_STATUS'\n")


def install_consumer(box: Container) -> int:
    """Deployment steps 2-4 of the consumer unit's header; returns the eventpipe gid."""
    gid = install_basics(box)
    box.write("/etc/eventpipe/counter.env", textwrap.dedent(f"""\
        EVENTPIPE_LOG_PATH={LOG_IN_CONTAINER}
        EVENTPIPE_HANDLER=counter_handler:count
        PYTHONPATH=/opt/eventpipe-test
        EVENTPIPE_INITIAL_STATE='{{"count": 0, "sum": 0}}'
        EVENTPIPE_CHECKPOINT_EVERY=100
        """), mode="0640")
    install_unit(box, CONSUMER_TEMPLATE, UNIT)
    box.run("systemctl", "daemon-reload")
    return gid


@contextmanager
def background_writer(log: Path, gid: int) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """A writer appending from outside the container until the block ends; then the list
    holds how many events it appended."""
    appended: list[int] = []
    writer = subprocess.Popen(writer_cmd(log, -1), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=writer_env(), group=gid, extra_groups=[])
    try:
        yield writer, appended
    finally:
        try:
            out, err = writer.communicate("stop\n", timeout=30)
        except subprocess.TimeoutExpired:
            writer.kill()
            out, err = writer.communicate()
    assert writer.returncode == 0, err
    appended.append(int(out))


def test_consumer_unit_under_systemd(container: tuple[Container, Path]) -> None:
    box, data = container
    log = data / "counter"
    gid = install_consumer(box)
    assert data.stat().st_gid == gid and data.stat().st_mode & 0o7777 == 0o2770

    # Events written before the consumer starts, from outside the container.
    first = subprocess.run(writer_cmd(log, 1000), capture_output=True, text=True, timeout=60,
                           env=writer_env(), group=gid, extra_groups=[], check=False)
    assert first.returncode == 0, first.stderr
    assert log_head(log) == 1000

    try:
        check_consumer_unit(box, log)
    except BaseException:
        print(box.run("systemctl", "status", "--no-pager", "--full", UNIT, check=False).stdout)
        print(box.run("journalctl", "--unit", UNIT, "--no-pager", "-n", "60",
                      check=False).stdout)
        raise
    # Writer (outside, root in group eventpipe) and consumer (inside, user eventpipe) each
    # created files in the log; all of them must stay usable by the other side.
    for path in [log, *log.rglob("*")]:
        st = path.stat()
        assert st.st_gid == gid and st.st_mode & 0o060 == 0o060, (path, oct(st.st_mode))


def check_consumer_unit(box: Container, log: Path) -> None:
    # (ii) `systemctl start` returns once the consumer has caught up and sent READY=1.
    box.run("systemctl", "start", UNIT, timeout=90)
    props = box.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "WatchdogUSec")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["WatchdogUSec"] == "30s" and props["NRestarts"] == "0", props
    checkpoint = read_checkpoint(log)
    assert checkpoint is not None and checkpoint["offset"] == 1000
    assert checkpoint["state"] == {"count": 1000, "sum": sum(map(value, range(1000)))}
    wait_until(lambda: box.show(UNIT, "StatusText")["StatusText"]
               == "consumer counter: offset 1000, lag 0",
               "STATUS= with the caught-up offset", 10, PROBE)

    # The sandbox really applies to the process, and it was given the watchdog settings.
    main_pid = props["MainPID"]
    status = box.run("cat", f"/proc/{main_pid}/status").stdout
    for field in (r"NoNewPrivs:\s*1", r"Seccomp:\s*2", r"CapEff:\s*0+", r"Uid:\s*[1-9]"):
        assert re.search(f"^{field}", status, re.MULTILINE), (field, status)
    environ = box.run("cat", f"/proc/{main_pid}/environ").stdout.split("\0")
    assert {"WATCHDOG_USEC=30000000", f"WATCHDOG_PID={main_pid}"} <= set(environ)

    # (i) + (iii): a writer outside keeps appending while the consumer is killed twice.
    gid = log.stat().st_gid
    with background_writer(log, gid) as (writer, appended):
        for kill in (1, 2):
            kill_and_wait_for_restart(box, log, writer, kill)
    head = log_head(log)
    assert head == 1000 + appended[0], (head, appended)

    def at_head() -> dict[str, Any] | None:
        cp = read_checkpoint(log)
        return cp if cp is not None and cp["offset"] == head else None

    checkpoint = wait_until(at_head, "the checkpoint to reach the head", 30, PROBE)
    # Exactly once: a replayed or skipped event would have made the handler raise (and the
    # unit restart once more); a lost or doubled one would show in the count and the sum.
    assert checkpoint["state"] == {"count": head, "sum": sum(map(value, range(head)))}
    assert box.show(UNIT, "NRestarts")["NRestarts"] == "2"

    # (iv) a graceful stop: SIGTERM, final checkpoint, exit status 0.
    box.run("systemctl", "stop", UNIT, timeout=60)
    props = box.show(UNIT, "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, props
    checkpoint = read_checkpoint(log)
    assert checkpoint is not None and checkpoint["offset"] == head

    # systemd drops an inactive unit from memory, so `systemctl show` no longer has its exit
    # status (and would count a death by SIGTERM as success too): the ExecStopPost= line
    # logged it, as it did after each kill.
    def journal_complete() -> str | None:
        text = box.run("journalctl", "--unit", UNIT, "--no-pager", "--output=cat").stdout
        done = (f"consumer counter: stopped at offset {head}" in text
                and "stop-post: result=success" in text)
        return text if done else None

    journal: str = wait_until(journal_complete, "the consumer's stop message in the journal",
                              10, PROBE)
    outcomes = re.findall(r"^stop-post: (.*)$", journal, re.MULTILINE)
    assert outcomes == [*["result=signal code=killed status=KILL"] * 2,
                        "result=success code=exited status=0"], journal


def kill_and_wait_for_restart(box: Container, log: Path, writer: subprocess.Popen[str],
                              kill: int) -> None:
    """Once the consumer has handled 200 more of the writer's events, kill -9 its main
    process; wait until systemd has restarted it (restart number ``kill``) and it is ready."""
    before = read_checkpoint(log)
    assert before is not None

    def progressed() -> bool:
        cp = read_checkpoint(log)
        return cp is not None and before is not None and cp["offset"] > before["offset"] + 200

    wait_until(progressed, "the consumer to handle events appended from outside", 20, PROBE)
    assert writer.poll() is None, "the writer stopped before the kill"
    old_pid = box.show(UNIT, "MainPID")["MainPID"]
    box.run("systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", UNIT)

    def restarted() -> bool:
        p = box.show(UNIT, "NRestarts", "ActiveState", "SubState", "MainPID")
        return (p["NRestarts"] == str(kill) and p["ActiveState"] == "active"
                and p["SubState"] == "running" and p["MainPID"] not in ("0", old_pid))

    wait_until(restarted, f"restart number {kill} after kill -9", 30, PROBE)
    assert writer.poll() is None, "the writer stopped before the restart"


POOL = ("eventpipe-consumer@counter-a.service", "eventpipe-consumer@counter-b.service")


def test_two_units_share_one_consumer_name(container: tuple[Container, Path]) -> None:
    """README's hot standby: two instances name one consumer; kill -9 the active one (twice)
    and the standby takes over, while a writer outside appends; the state stays exact."""
    box, data = container
    log = data / "counter"
    gid = install_basics(box)
    for unit in POOL:
        instance = unit.split("@")[1].removesuffix(".service")
        box.write(f"/etc/eventpipe/{instance}.env", textwrap.dedent(f"""\
            EVENTPIPE_CONSUMER_NAME=counter
            EVENTPIPE_STANDBY=true
            EVENTPIPE_LOG_PATH={LOG_IN_CONTAINER}
            EVENTPIPE_HANDLER=counter_handler:count
            PYTHONPATH=/opt/eventpipe-test
            EVENTPIPE_INITIAL_STATE='{{"count": 0, "sum": 0}}'
            EVENTPIPE_CHECKPOINT_EVERY=100
            """), mode="0640")
        install_unit(box, CONSUMER_TEMPLATE, unit, log_exit=False)
    box.run("systemctl", "daemon-reload")
    first = subprocess.run(writer_cmd(log, 1000), capture_output=True, text=True, timeout=60,
                           env=writer_env(), group=gid, extra_groups=[], check=False)
    assert first.returncode == 0, first.stderr
    try:
        check_standby_pool(box, log, gid)
    except BaseException:
        for unit in POOL:
            print(box.run("systemctl", "status", "--no-pager", "--full", unit,
                          check=False).stdout)
        raise


def pool_roles(box: Container) -> tuple[str, str] | None:
    """(active unit, standby unit) when one reports its offset and the other stands by."""
    status = {u: box.show(u, "StatusText", "ActiveState") for u in POOL}
    if any(p["ActiveState"] != "active" for p in status.values()):
        return None
    active = [u for u, p in status.items()
              if p["StatusText"].startswith("consumer counter: offset")]
    standby = [u for u, p in status.items() if "standing by" in p["StatusText"]]
    return (active[0], standby[0]) if len(active) == 1 and len(standby) == 1 else None


def progressed_past(log: Path, before: dict[str, Any]) -> bool:
    cp = read_checkpoint(log)
    return cp is not None and cp["offset"] > before["offset"] + 200


def taken_over_by(box: Container, unit: str) -> tuple[str, str] | None:
    roles = pool_roles(box)
    return roles if roles is not None and roles[0] == unit else None


def check_standby_pool(box: Container, log: Path, gid: int) -> None:
    box.run("systemctl", "start", *POOL, timeout=90)  # both READY: the standby at once
    active, standby = wait_until(lambda: pool_roles(box),
                                 "one unit consuming, the other standing by", 60, PROBE)
    with background_writer(log, gid) as (writer, appended):
        for _ in range(2):
            before = read_checkpoint(log)
            assert before is not None
            wait_until(functools.partial(progressed_past, log, before),
                       "progress before the kill", 30, PROBE)
            box.run("systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", active)
            # The standby takes the name over; systemd restarts the killed unit, which now
            # finds the name held and stands by in its turn.
            roles = wait_until(functools.partial(taken_over_by, box, standby),
                               "the standby to take over after kill -9", 60, PROBE)
            active, standby = roles
            assert writer.poll() is None, "the writer stopped before the takeover"
    head = log_head(log)
    assert head == 1000 + appended[0]
    checkpoint = wait_until(lambda: (
        (cp := read_checkpoint(log)) is not None and cp["offset"] == head and cp),
        "the checkpoint to reach the head", 60, PROBE)
    assert checkpoint["state"] == {"count": head, "sum": sum(map(value, range(head)))}
    box.run("systemctl", "stop", *POOL, timeout=60)


def test_writer_example_under_systemd(container: tuple[Container, Path]) -> None:
    """The example writer appends spooled files, and sets aside one with a bad line."""
    box, data = container
    install_basics(box)
    install_unit(box, "eventpipe-writer-example.service", log_exit=False)
    install_unit(box, "eventpipe-writer-example.path", log_exit=False)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "enable", "--now", "eventpipe-writer-example.path")
    spool = "/var/spool/eventpipe"
    good = "".join(orjson.dumps({"order": i}).decode() + "\n" for i in range(5))
    box.write(f"{spool}/a.tmp", good)
    box.write(f"{spool}/b.tmp", '{"order": 5}\nnot json\n{"order": 6}\n')
    # Producers rename finished files into incoming/, so no half-written file is picked up.
    box.run("sh", "-c", f"mv {spool}/a.tmp {spool}/incoming/a.jsonl && "
            f"mv {spool}/b.tmp {spool}/incoming/b.jsonl")

    def spool_done() -> str | None:
        left = box.run("sh", "-c", f"cd {spool} && echo incoming/* rejected/*").stdout.strip()
        return left if left == "incoming/* rejected/b.jsonl" else None

    try:
        wait_until(spool_done, "the writer to empty the spool", 30, PROBE)
        with EventLog(data / "orders", file_mode=0o660, trust_owner=True) as log:
            events = [r.event for r in log.read()]
        assert sorted(e["order"] for e in events) == list(range(7)), events

        def journal_complete() -> bool:
            text = box.run("journalctl", "--unit", "eventpipe-writer-example.service",
                           "--no-pager", "--output=cat").stdout
            # append --json summaries for both files, and the complaint about the bad line
            return ('"written":5,' in text and '"written":2,' in text
                    and "line 2: not JSON" in text)

        wait_until(journal_complete, "the writer's reports in the journal", 10, PROBE)
    except BaseException:
        print(box.run("journalctl", "--unit", "eventpipe-writer-example.service",
                      "--unit", "eventpipe-writer-example.path", "--no-pager", "-n", "60",
                      check=False).stdout)
        raise
