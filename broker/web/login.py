"""Who is looking at the web page: sessions, CSRF tokens and bearer credentials (pure, no I/O).

Used by ``broker.runtime.http`` only when brokerd has users (``users_file``); without users
the page stays open as before.  Two ways in:

* a browser logs in through ``/login`` (user + token) and gets a **session cookie**: a random
  id that brokerd keeps in memory (``Sessions``, bounded, dropped after SESSION_IDLE seconds
  unused, and all gone at a restart).  Each session has its own **CSRF token**, which every
  POST must carry (the ``X-CSRF-Token`` header the page's script sends, or the ``csrf`` form
  field); a token from another session, or none, is refused.
* a script sends ``Authorization: Bearer <user>:<token>``.  Browsers never add that header on
  their own, so a bearer request needs no CSRF token.  The token is checked with scrypt
  (~50 ms) once; a correct pair is then remembered for BEARER_CACHE_TTL seconds as a keyed
  digest (never the token), so a Prometheus scrape every 15 s costs one scrypt a minute.

No clock here: ``now`` (monotonic seconds) is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

SECONDS = 1.0
# A session unused this long is dropped (the open page polls every second, so an open tab
# never idles out; a tab closed for half an hour must log in again).
SESSION_IDLE = 30 * 60 * SECONDS
# Sessions kept in memory at most; beyond, the least recently used is dropped.  Each costs
# ~300 bytes, and logging in costs the guesser a correct token, so this only bounds memory.
SESSIONS_MAX = 10_000
# How long a checked bearer user:token pair is trusted without running scrypt again, and how
# many pairs are remembered.  A token removed from the users file needs a restart anyway
# (the file is read at start), so this adds no staleness of its own.
BEARER_CACHE_TTL = 60 * SECONDS
BEARER_CACHE_MAX = 1_000
# The form login's body: a user name (<= 64) and a token (~43 characters), urlencoded.
LOGIN_BODY_MAX = 4 * 1024
# An action's form body carries only the CSRF field.
ACTION_BODY_MAX = 1024

SESSION_COOKIE = "brokerd_session"
LOGIN_COOKIE = "brokerd_login"  # the login form's own CSRF value (double submit), before any session
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets; False when either is missing."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass
class Session:
    id: str
    user: str
    csrf: str
    last_used: float


class Sessions:
    """The logged-in browsers: session id -> Session, least recently used first."""

    def __init__(self, idle: float = SESSION_IDLE, max_sessions: int = SESSIONS_MAX):
        self.idle, self.max_sessions = idle, max_sessions
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def new(self, user: str, now: float) -> Session:
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        s = Session(new_secret(), user, new_secret(), now)
        self._by_id[s.id] = s
        return s

    def get(self, sid: str | None, now: float) -> Session | None:
        """The live session of this id (its idle clock restarted), or None."""
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        if now - s.last_used > self.idle:
            del self._by_id[sid]
            return None
        s.last_used = now
        self._by_id.move_to_end(sid)
        return s

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)


class BearerCache:
    """user:token pairs scrypt already accepted, as digests keyed by a per-process secret."""

    def __init__(self, ttl: float = BEARER_CACHE_TTL, max_entries: int = BEARER_CACHE_MAX):
        self.ttl, self.max_entries = ttl, max_entries
        self._key = secrets.token_bytes(32)
        self._seen: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # digest -> (user, until)

    def _digest(self, name: str, token: str) -> bytes:
        return hmac.new(self._key, name.encode() + b"\0" + token.encode(), hashlib.sha256).digest()

    def get(self, name: str, token: str, now: float) -> str | None:
        d = self._digest(name, token)
        hit = self._seen.get(d)
        if hit is None:
            return None
        if now >= hit[1]:
            del self._seen[d]
            return None
        return hit[0]

    def put(self, name: str, token: str, now: float) -> None:
        while len(self._seen) >= self.max_entries:
            self._seen.popitem(last=False)
        self._seen[self._digest(name, token)] = (name, now + self.ttl)


def parse_bearer(header: str | None) -> tuple[str, str] | None:
    """``Authorization: Bearer <user>:<token>`` -> (user, token); None when absent or another scheme."""
    if not header:
        return None
    scheme, _, cred = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    name, sep, token = cred.strip().partition(":")
    if not sep or not name or not token:
        return ("", "")  # a Bearer header of the wrong shape: a failed login, not "no login"
    return name, token


def cookie(headers: dict, name: str) -> str | None:
    """One cookie's value from the Cookie header."""
    for part in headers.get("cookie", "").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v
    return None


def set_cookie(name: str, value: str, *, secure: bool, max_age: int | None = None) -> bytes:
    """A Set-Cookie value: HttpOnly (no script reads it), SameSite=Strict (no other site's page
    sends it), Secure when brokerd serves HTTPS, for the whole site."""
    out = f"{name}={value}; Path=/; HttpOnly; SameSite=Strict"
    if secure:
        out += "; Secure"
    if max_age is not None:
        out += f"; Max-Age={max_age}"
    return out.encode()


ALL = "*"


@dataclass(frozen=True)
class Access:
    """What one request's viewer may see and press on the page (``OPEN``: no users, everything).

    Built from a ``broker.auth.User`` by ``Access.of``: queues by ``User.sees``, buttons and
    dead letters by ``manage`` (``admin`` covers every kind), recent tasks by ``results-read``,
    workers by ``control``, schedules by ``schedules``.
    """

    user: str | None = None
    csrf: str = ""
    grant: object = None  # the broker.auth.User, or None for OPEN

    def may(self, kind: str, queue: str | None = None) -> bool:
        u = self.grant
        return u is None or u.may(kind, queue) or u.may("admin", queue)

    def sees(self, queue: str) -> bool:
        return self.grant is None or self.grant.sees(queue)

    def manages(self, queue: str) -> bool:
        return self.may("manage", queue)

    @property
    def tasks(self) -> bool:
        return self.may("results-read")

    @property
    def workers(self) -> bool:
        return self.may("control")

    @property
    def schedules(self) -> bool:
        return self.may("schedules")

    @classmethod
    def of(cls, user, csrf: str = "") -> "Access":
        return cls(user.name, csrf, user)


OPEN = Access()
