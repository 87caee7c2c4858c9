"""What a caller passes, made ready for the wire: addresses, client names, ids, option maps.

Both shells (``client.producer``, ``client.async_client``), the verb table (``client.verbs``),
the CLIs and the tests use these; none of them is session state, so they live apart from
``client.session``.  No I/O and no clock: an ``eta`` datetime is converted, never compared with now.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from client.errors import error_from_wire

DEFAULT_PORT = 7700
URL_ENV = "BROKERD_URL"  # the broker used when none is given
TLS_PARAMS = ("ca", "cert", "key")  # brokerds:// query parameters: PEM file paths
MASK = "***"  # what a credential is shown as in reprs, logs and errors
# Addresses one broker URL may list (a replica group: a leader and its followers).  A group
# is 3 or 5 brokers; 16 leaves room and bounds what one connect attempt walks through.
MAX_ADDRESSES = 16
# Reconnecting to a replica group (protocol.md §6.4): each pass over the addresses that
# finds no leader waits RECONNECT_FIRST, doubling up to RECONNECT_MAX (jittered 50-100 %
# so many clients do not stampede a new leader), and gives up with ConnectionLost once
# RECONNECT_TOTAL has passed: long enough for a restart or an election (a lease of a few
# seconds), short enough that a web request fails rather than hangs.
RECONNECT_FIRST = 0.05  # seconds
RECONNECT_MAX = 2.0  # seconds
RECONNECT_TOTAL = 30.0  # seconds
# NOT_LEADER redirects followed in one connect: a group whose members name each other in a
# loop (a split brain, a misconfiguration) gets an error instead of a spin.
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed ``brokerd://[user:token@]host:port[,host:port...]`` or ``brokerds://...?ca=&cert=&key=``.

    ``host``/``port`` are the first address; ``hosts`` all of them, in the order given (a
    replica group: clients look for the leader among them, protocol.md §6.4).
    ``str()``/``repr()`` never show the token (or the user): they are ``***``.
    """

    host: str
    port: int = DEFAULT_PORT
    tls: bool = False
    user: str | None = None
    token: str | None = None
    ca: str | None = None  # PEM of the CA(s) to trust (default: the system's)
    cert: str | None = None  # client certificate (mutual TLS) ...
    key: str | None = None  # ... and its key (default: in ``cert``)
    hosts: tuple = ()  # every (host, port) listed; () means just (host, port)

    @property
    def addresses(self) -> tuple:
        """Every ``(host, port)`` of the URL, in the order given."""
        return self.hosts or ((self.host, self.port),)

    def at(self, host: str, port: int) -> "BrokerUrl":
        """The same URL (credentials, TLS, the list) aimed at ``host:port`` first."""
        return dataclasses.replace(self, host=host, port=port)

    def __str__(self) -> str:
        where = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.addresses)
        cred = f"{MASK}:{MASK}@" if self.user is not None or self.token is not None else ""
        query = "&".join(f"{k}={getattr(self, k)}" for k in TLS_PARAMS if getattr(self, k))
        return f"{'brokerds' if self.tls else 'brokerd'}://{cred}{where}" + (f"?{query}" if query else "")

    __repr__ = __str__

    def hello_options(self) -> dict | None:
        """HELLO's credential keys (protocol.md §5.1), or None without credentials."""
        if self.user is None and self.token is None:
            return None
        return {"user": self.user or "", "token": self.token or ""}


def broker_url(address=None) -> BrokerUrl:
    """Any way a broker is named → a ``BrokerUrl``.

    ``brokerd://[user:token@]host[:port]``, ``brokerds://...`` (TLS, with ``?ca=``/``?cert=``/
    ``?key=`` file paths), a plain ``"host:port"``/``"[::1]:port"``/``"host"``, a ``(host, port)``
    tuple, or a ``BrokerUrl``.  None: ``$BROKERD_URL``, else 127.0.0.1:7700.  A malformed one
    raises ``ValueError`` naming what is wrong (never the token).
    """
    if isinstance(address, BrokerUrl):
        return address
    if address is None:
        address = os.environ.get(URL_ENV) or f"127.0.0.1:{DEFAULT_PORT}"
    if isinstance(address, tuple):
        return BrokerUrl(str(address[0]), int(address[1]))
    text = str(address).strip()
    scheme, sep, _ = text.partition("://")
    if not sep:
        hosts = _host_list(text, text)
        return BrokerUrl(*hosts[0], hosts=hosts if len(hosts) > 1 else ())
    if scheme.lower() not in ("brokerd", "brokerds"):
        raise ValueError(f"broker URL scheme must be brokerd:// or brokerds:// (got {scheme}://)")
    parts = urlsplit(text)
    netloc = parts.netloc
    user = token = None
    if "@" in netloc:
        cred, _, netloc = netloc.rpartition("@")
        user, _, token = cred.partition(":")
        user, token = unquote(user), unquote(token)
    if not netloc:
        raise ValueError(f"broker URL names no host: {_masked(text)}")
    hosts = _host_list(netloc, _masked(text))
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(TLS_PARAMS))
    if unknown:
        raise ValueError(f"broker URL: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(TLS_PARAMS)}")
    tls = scheme.lower() == "brokerds"
    files = {k: query[k][-1] for k in TLS_PARAMS if k in query and query[k][-1]}
    if files and not tls:
        raise ValueError(f"broker URL: {', '.join(files)} need(s) TLS: use brokerds://")
    return BrokerUrl(*hosts[0], tls, user, token, **files, hosts=hosts if len(hosts) > 1 else ())


def _host_list(text: str, shown: str) -> tuple:
    """``h1:p1,h2:p2,...`` -> ((h1, p1), ...); a ValueError names an empty or extra entry."""
    entries = text.split(",")
    if len(entries) > MAX_ADDRESSES:
        raise ValueError(f"broker URL lists {len(entries)} addresses; at most {MAX_ADDRESSES} are allowed: {shown}")
    hosts = []
    for i, entry in enumerate(entries, 1):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"broker URL address {i} of {len(entries)} is empty (a doubled or trailing comma?): {shown}")
        host, port = _host_port(entry)
        if not 0 < port < 65536:
            raise ValueError(f"broker port must be from 1 to 65535 (got {port} in address {i}: {entry})")
        if any(c.isspace() or c in "/?#@" for c in host):
            raise ValueError(f"broker URL address {i} has a bad host {host!r}: {shown}")
        hosts.append((host, port))
    return tuple(hosts)


def parse_leader(text: str) -> tuple[str, int]:
    """The leader's ``HOST:PORT`` from a HELLO reply's ``leader`` or a NOT_LEADER message
    (its last word, protocol.md §4); ValueError if it names none."""
    words = str(text).split()
    if not words:
        raise ValueError("no leader address")
    word = words[-1].rstrip(".,;")
    if ":" not in word.rpartition("]")[2]:  # an explicit port: "send writes to the leader" names none
        raise ValueError(f"not a HOST:PORT: {word!r}")
    host, port = _host_port(word)
    if not 0 < port < 65536 or not host:
        raise ValueError(f"not a HOST:PORT: {word!r}")
    return host, port


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    try:
        return host or "127.0.0.1", int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"broker port must be a number (got {port!r})") from None


def _masked(text: str) -> str:
    """``text`` with any ``user:token@`` shown as ``***:***@``."""
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest.partition("/")[0]:
        return f"{scheme}://{MASK}:{MASK}@{rest.partition('@')[2]}"
    return text


def redact(address):
    """A broker address as it may be shown (logs, reprs, errors): credentials as ``***``.
    One without credentials is returned as it was given."""
    if isinstance(address, tuple):
        return address
    if address is None or isinstance(address, BrokerUrl):
        return str(broker_url(address))
    return _masked(str(address))


def default_name() -> str:
    """The name a client gives in HELLO unless told otherwise: ``host:pid``."""
    host = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "localhost")
    return f"{host}:{os.getpid()}"


def new_id_prefix() -> str:
    """A random per-client prefix for message ids (12 hex digits: 48 bits)."""
    return os.urandom(6).hex()


def parse_address(address) -> tuple[str, int]:
    """``"host:port"``, ``"[::1]:port"``, ``(host, port)``, ``"host"`` (port 7700) or a broker URL."""
    url = broker_url(address)
    return url.host, url.port


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
