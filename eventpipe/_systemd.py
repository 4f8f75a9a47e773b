"""The systemd ``sd_notify`` protocol, with the standard library only.

A service started by systemd with ``Type=notify`` (or ``notify-reload``) finds the manager's
datagram socket in ``NOTIFY_SOCKET`` and reports its state there as ``KEY=VALUE`` lines:
``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1`` and so on. Outside systemd the
variable is unset and :class:`SystemdNotifier` does nothing, so code can call it
unconditionally. Notification is best effort by design: a failed send is recorded, never
raised, because losing a status line must not take the service down with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Mapping
from types import TracebackType

__all__ = ["MAX_MESSAGE_BYTES", "SystemdNotifier"]

MAX_MESSAGE_BYTES = 4096
"""systemd drops (does not truncate) a notification datagram larger than this."""

_STATUS_PREFIX = b"STATUS="
_NEWLINES = re.compile(r"\r\n|[\r\n]")


class SystemdNotifier:
    """Sends state notifications to systemd over ``NOTIFY_SOCKET``.

    Guarantees:

    * Disabled (:attr:`enabled` is false) when ``NOTIFY_SOCKET`` is unset or empty; every
      method is then a no-op returning ``False``. An address systemd's own client would
      reject (neither an absolute path nor ``@abstract``) also disables it, and the reason
      is kept in :attr:`last_error`.
    * Sending never raises :class:`OSError`: a missing socket, ``ECONNREFUSED`` or a full
      queue make the call return ``False`` and set :attr:`last_error` (the most recent
      failure; a later success does not clear it). After :meth:`close` calls return
      ``False``.
    * No send blocks for longer than ``send_timeout`` seconds (``None`` blocks like
      libsystemd does), so a wedged manager cannot stall the caller indefinitely.
    * One socket is opened at construction and reused; :meth:`close` releases it and is
      idempotent. Safe to share between threads.
    * The environment is read once at construction, except ``WATCHDOG_PID``, which is
      compared with the *current* pid on every use so a forked child does not ping the
      watchdog on its parent's behalf.

    Malformed fields passed to :meth:`notify` are programming errors and raise
    :class:`ValueError` whether or not the notifier is enabled, so they surface in tests
    run outside systemd.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        send_timeout: float | None = 5.0,
    ) -> None:
        if send_timeout is not None and send_timeout < 0:
            raise ValueError(f"send_timeout must be >= 0 or None, not {send_timeout!r}")
        env = os.environ if environ is None else environ
        self.last_error: OSError | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._address: str | None = None
        self._last_ping: float | None = None
        self._watchdog_usec = _parse_positive_int(env.get("WATCHDOG_USEC", ""))
        self._watchdog_pid_text = env.get("WATCHDOG_PID", "").strip()

        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return
        if raw.startswith("@"):
            # Linux abstract namespace: the name is the address with the '@' swapped for NUL.
            address = "\0" + raw[1:]
        elif raw.startswith("/"):
            address = raw
        else:
            # Relative paths and other families (systemd's "vsock:") are not supported here;
            # guessing would send notifications somewhere unintended.
            self.last_error = OSError(
                errno.EAFNOSUPPORT, f"unsupported NOTIFY_SOCKET address: {raw!r}"
            )
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:
            self.last_error = exc
            return
        if send_timeout is not None:
            _set_send_timeout(sock, send_timeout)
        self._sock = sock
        self._address = address

    @property
    def enabled(self) -> bool:
        """Whether notifications are actually sent (``NOTIFY_SOCKET`` usable, not closed)."""
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of ``WATCHDOG_USEC``, or ``None`` if off.

        ``None`` when the notifier is disabled, ``WATCHDOG_USEC`` is unset or not a positive
        integer, or ``WATCHDOG_PID`` is set to anything but this process's pid. Half, as
        systemd recommends, leaves a full half period of slack for a late ping.
        """
        if not self.enabled or self._watchdog_usec is None:
            return None
        if self._watchdog_pid_text and self._watchdog_pid_text != str(os.getpid()):
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"KEY=VALUE"`` strings) as one datagram; return whether it went.

        Raises :class:`ValueError` for no fields, a field without ``=`` or one containing a
        newline (which would smuggle in another assignment). Never raises :class:`OSError`.
        """
        return self._send(fields, time.monotonic())

    def ready(self) -> bool:
        """Send ``READY=1``: start-up is complete."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """Send ``STATUS=text``, a one-line human-readable state shown by ``systemctl status``.

        Each CR, LF or CRLF in ``text`` becomes one space, and the text is cut (on a
        character boundary) so the datagram fits in :data:`MAX_MESSAGE_BYTES`.
        """
        encoded = _NEWLINES.sub(" ", text).encode("utf-8", "replace")
        room = MAX_MESSAGE_BYTES - len(_STATUS_PREFIX)
        # Cutting the bytes may split a multi-byte character; dropping the partial tail keeps
        # the line valid UTF-8, which systemd requires before it will display it.
        line = encoded[:room].decode("utf-8", "ignore")
        return self.notify("STATUS=" + line)

    def stopping(self) -> bool:
        """Send ``STOPPING=1``: shutdown has begun."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Send ``WATCHDOG=1`` now, whatever the interval; a success restarts the interval."""
        return self.notify("WATCHDOG=1")

    def maybe_ping_watchdog(self, now: float | None = None) -> bool:
        """Send ``WATCHDOG=1`` if :attr:`watchdog_interval` has elapsed since the last ping.

        Returns whether a ping was sent successfully. ``now`` defaults to
        :func:`time.monotonic` and must be on that clock. Cheap enough to call from a hot
        loop. A failed send does not count as a ping, so the next call retries rather than
        waiting out another interval towards the watchdog deadline.
        """
        interval = self.watchdog_interval
        if interval is None:
            return False
        if now is None:
            now = time.monotonic()
        last = self._last_ping
        if last is not None and now - last < interval:
            return False
        return self._send(("WATCHDOG=1",), now)

    def wait_at_most(self, limit: float) -> float:
        """``limit``, or less: the time until the next watchdog ping is due (at least 10 ms,
        so a failing send is retried without spinning): how long a runner may block."""
        due = self.watchdog_due_in()
        return limit if due is None else min(limit, max(due, 0.01))

    def watchdog_due_in(self, now: float | None = None) -> float | None:
        """Seconds until :meth:`maybe_ping_watchdog` will send the next ping (0: due now).

        ``None`` when the watchdog is off (see :attr:`watchdog_interval`). For callers that
        sleep between pings: waking at this time keeps each ping on its interval, where fixed
        sleeps of the interval would let a ping slip by up to one sleep.
        """
        interval = self.watchdog_interval
        if interval is None:
            return None
        last = self._last_ping
        if last is None:
            return 0.0
        if now is None:
            now = time.monotonic()
        return max(0.0, last + interval - now)

    def close(self) -> None:
        """Close the socket; later calls are no-ops returning ``False``. Idempotent."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = repr(self._address) if self._address is not None else "disabled"
        state = "" if self.enabled or self._address is None else " closed"
        return f"<SystemdNotifier {where}{state}>"

    def _send(self, fields: tuple[str, ...], now: float) -> bool:
        _check_fields(fields)
        if self._sock is None:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        # The lock keeps close() from releasing the descriptor mid-send, where the number
        # could be reused by an unrelated file that would then receive the datagram.
        with self._lock:
            sock, address = self._sock, self._address
            if sock is None or address is None:
                return False
            try:
                sock.sendto(payload, address)
            except OSError as exc:
                self.last_error = exc
                return False
            if "WATCHDOG=1" in fields:
                self._last_ping = now
        return True


def _check_fields(fields: tuple[str, ...]) -> None:
    if not fields:
        raise ValueError("notify() needs at least one KEY=VALUE field")
    for field in fields:
        if "\n" in field:
            raise ValueError(f"notification field contains a newline: {field!r}")
        key, sep, _ = field.partition("=")
        if not sep or not key:
            raise ValueError(f"notification field is not KEY=VALUE: {field!r}")


def _parse_positive_int(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    # SO_SNDTIMEO rather than sock.settimeout(): for an unconnected datagram socket poll()
    # reports "writable" even while the receiver's queue is full, so Python's timeout mode
    # would spin on EAGAIN; the kernel option sleeps until there is room or time is up.
    whole = int(seconds)
    micros = int((seconds - whole) * 1_000_000)
    if whole == 0 and micros == 0:
        micros = 1  # a zeroed timeval means "block forever", the opposite of what was asked
    # Without the option sends merely block as libsystemd's do; not worth failing over.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", whole, micros))
