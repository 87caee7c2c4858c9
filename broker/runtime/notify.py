"""The systemd notify protocol (sd_notify(3)), without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: an AF_UNIX datagram
socket, a path or (leading ``@``) a name in the abstract namespace.  Each
datagram is newline-separated ``KEY=VALUE`` lines.  brokerd sends:

- ``STATUS=...`` and ``EXTEND_TIMEOUT_USEC=...`` while it replays its log, so a
  long recovery is shown in ``systemctl status`` and not killed by
  ``TimeoutStartSec`` (broker/cli.py);
- ``READY=1`` once recovery is done and the listeners are open, and
  ``WATCHDOG=1`` every ``WATCHDOG_USEC/2`` while the event loop and the log
  writer make progress; ``STOPPING=1`` on SIGTERM (broker/runtime/server.py).

Everything is a no-op when ``$NOTIFY_SOCKET`` is unset: brokerd run by hand,
in a container or under Kubernetes.  Sending never raises: a service manager
that went away must not take the broker with it.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "enabled", "watchdog_interval", "usec"]


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*lines: str) -> bool:
    """Send one datagram of ``KEY=VALUE`` lines; True if it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not lines:
        return False
    if addr[0] == "@":  # abstract namespace: a leading NUL byte instead of "@"
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for;
    a child that inherited the environment must not ping for its parent.
    """
    raw = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not raw or not enabled():
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        us = int(raw)
    except ValueError:
        return None
    return us / 2e6 if us > 0 else None


def usec(seconds: float) -> str:
    return str(int(seconds * 1_000_000))


# How far each EXTEND_TIMEOUT_USEC pushes systemd's start deadline, and how
# often replay re-sends it: a replay that stalls for longer than this is
# killed, one that keeps going is not.
REPLAY_EXTEND = 60.0  # seconds
REPLAY_REPORT_EVERY = 5.0  # seconds


def replay_progress(records, segments: int, clock):
    """Pass ``records`` (from ``WriteAheadLog.open``) through, telling systemd
    how far the replay got: ``STATUS=replaying segment i/n``, a fresh
    ``EXTEND_TIMEOUT_USEC`` and (while the watchdog is on) ``WATCHDOG=1`` when
    a new segment starts or every few seconds within a long one.  ``clock`` is
    a monotonic clock (``time.monotonic``).  Use only when ``enabled()``: the
    per-record check is cheap but not free.
    """
    watchdog = watchdog_interval() is not None
    seg = None
    index = 0
    n = 0
    last = clock()
    for r in records:
        n += 1
        if r.segment_name != seg or not n & 0x3FFF:
            if r.segment_name != seg:
                seg = r.segment_name
                index += 1
                changed = True
            else:
                changed = False
            now = clock()
            if changed or now - last >= REPLAY_REPORT_EVERY:
                last = now
                lines = [
                    f"STATUS=replaying segment {index}/{max(segments, index)} ({n} records so far)",
                    f"EXTEND_TIMEOUT_USEC={usec(REPLAY_EXTEND)}",
                ]
                if watchdog:
                    lines.append("WATCHDOG=1")  # replay is progress; the watchdog may already be armed
                notify(*lines)
        yield r
