"""What a caller passes, made ready for the wire: addresses, client names, ids, option maps.

Both shells (``client.producer``, ``client.async_client``), the verb table (``client.verbs``),
the CLIs and the tests use these; none of them is session state, so they live apart from
``client.session``.  No I/O and no clock: an ``eta`` datetime is converted, never compared with now.
"""

from __future__ import annotations

import os

from client.errors import error_from_wire


def default_name() -> str:
    """The name a client gives in HELLO unless told otherwise: ``host:pid``."""
    host = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "localhost")
    return f"{host}:{os.getpid()}"


def new_id_prefix() -> str:
    """A random per-client prefix for message ids (12 hex digits: 48 bits)."""
    return os.urandom(6).hex()


def parse_address(address) -> tuple[str, int]:
    """``"host:port"``, ``"[::1]:port"``, ``(host, port)`` or ``"host"`` (port 7700)."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    address = str(address)
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest.lstrip(":") or 7700)
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, 7700
    return host or "127.0.0.1", int(port)


def admin_reply(text):
    """An ADMIN reply's text; an ``ERR <CODE> <sentence>`` reply raises that code's exception."""
    if isinstance(text, str) and text.startswith("ERR "):
        parts = text.strip().split(" ", 2)
        code = parts[1] if len(parts) > 1 else "BAD_REQUEST"
        raise error_from_wire(code, parts[2] if len(parts) > 2 else text.strip())
    return text


def seconds(v, what):
    """Seconds from a number or a timedelta (None stays None)."""
    if v is None:
        return None
    ts = getattr(v, "total_seconds", None)
    if ts is not None:
        return ts()
    if type(v) not in (int, float):
        raise TypeError(f"{what} must be a number of seconds or a timedelta (got {type(v).__name__})")
    return v


def publish_options(delay, eta, ttl, headers):
    """The PUBLISH options map, or None when every option is left out."""
    if delay is None and eta is None and ttl is None and headers is None:
        return None
    opts = {}
    if delay is not None:
        opts["delay"] = seconds(delay, "delay")
    if eta is not None:
        stamp = getattr(eta, "timestamp", None)  # a datetime: aware, or local time if naive
        opts["eta"] = stamp() if stamp is not None else seconds(eta, "eta")
    if ttl is not None:
        opts["ttl"] = seconds(ttl, "ttl")
    if headers is not None:
        if not isinstance(headers, dict):
            raise TypeError(f"headers must be a dict (got {type(headers).__name__})")
        opts["headers"] = headers
    return opts


def queue_options(dead_letter=None, max_attempts=25, reserve_timeout=None, max_length=None, overflow="reject") -> dict:
    """The DECLARE options map (protocol.md §5.8); every key is sent so the broker compares all."""
    return {
        "dead_letter": dead_letter,
        "max_attempts": max_attempts,
        "reserve_timeout": seconds(reserve_timeout, "reserve_timeout"),
        "max_length": max_length,
        "overflow": overflow,
    }
