"""The users file's client side: tokens, their scrypt hashes, and writing one [users.NAME] table.

``brokerd-ctl user add`` needs these without importing the broker (client/ctl.py may
not import broker/, tests/test_layering.py), and brokerd needs the same hashing to
check a token; so they live here and ``broker.auth`` imports them.  Reading the
file and deciding grants stays in ``broker.auth``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile

GRANT_KINDS = (
    "publish",        # PUBLISH; a chord's body and a schedule's target queue too
    "consume",        # CONSUME and settling what was delivered (ACK, NACK, TOUCH, CANCEL); a worker's events
    "manage",         # DECLARE, DELETE, PURGE, PAUSE, RESUME; dead letters and their requeue
    "results-read",   # RESULT_GET, TASK_INFO: a web app waiting for its tasks
    "results-write",  # RESULT_SET, RESULT_FORGET: a worker storing outcomes
    "schedules",      # SCHEDULE_PUT/REMOVE/PAUSE/LIST: brokerd-beat
    "control",        # REVOKE, CONTROL_REQUEST, SUBSCRIBE, WORKERS: operators and dashboards
    "admin",          # every netcat command, ADMIN frames, user management
    "replicate",      # REPLICATE, REPLICA_ACK: a follower brokerd reading the whole log
)
USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class AuthError(ValueError):
    """A users file or a grant that brokerd cannot use; the message names the user and the key."""


# -- tokens ---------------------------------------------------------------------------------------
# scrypt from the standard library: memory-hard, so a stolen users file does not give tokens away
# cheaply.  n=2**14, r=8, p=1 is the interactive-login setting of the scrypt paper (~16 MiB, ~50 ms
# here): paid once per connection, never per message.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
TOKEN_BYTES = 32  # a generated token: 256 random bits, URL-safe text


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str, salt: bytes | None = None, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` (salt and hash in unpadded URL-safe base64)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def check_token(stored: str, token: str) -> bool:
    """Whether ``token`` matches the stored hash (constant-time compare)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = _unb64(digest)
        got = hashlib.scrypt(token.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=64 * 1024 * 1024, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


# -- one entry of the file ------------------------------------------------------------------------
def parse_grant_args(args: list[str]) -> dict[str, tuple[str, ...]]:
    """``["publish=emails,sms.*", "results-read=*"]`` -> grants, or AuthError naming the bad one."""
    grants: dict[str, tuple[str, ...]] = {}
    for arg in args:
        kind, sep, globs = arg.partition("=")
        if not sep or kind not in GRANT_KINDS or not globs:
            raise AuthError(f"grant {arg!r} must be KIND=GLOB[,GLOB...] with KIND one of {', '.join(GRANT_KINDS)}")
        grants[kind] = grants.get(kind, ()) + tuple(g for g in globs.split(",") if g)
    return grants


def user_entry(name: str, token_hash: str, grants: dict) -> str:
    """One [users.NAME] table, as ``brokerd-ctl user add`` appends it."""
    if not USER_NAME.match(name):
        raise AuthError(f"user name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'")
    lines = [f"[users.{name}]", f'token = "{token_hash}"']
    for kind in GRANT_KINDS:
        if grants.get(kind):
            globs = ", ".join(_toml_string(g) for g in grants[kind])
            lines.append(f"{kind} = [{globs}]")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def add_user(path: str, name: str, grants: dict) -> str:
    """Append a new user to the users file at ``path`` (created if missing); return its token.

    Refuses a name the file already has.  The file is rewritten whole through a temporary
    file in the same directory, fsynced and renamed over it, with mode 0600 (it holds token
    hashes): a crash leaves the old file or the new one, never half of one.
    """
    import tomllib

    try:
        with open(path, "rb") as fh:
            old = fh.read()
    except FileNotFoundError:
        old = b""
    try:
        existing = tomllib.loads(old.decode()).get("users", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AuthError(f"{path} is not a valid users file ({exc}); fix it before adding users") from None
    if name in existing:
        raise AuthError(f"user {name!r} already exists in {path}; choose another name (its token is not shown again)")
    token = new_token()
    entry = user_entry(name, hash_token(token), grants)
    text = old.decode()
    if text and not text.endswith("\n"):
        text += "\n"
    text += ("\n" if text else "") + entry
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".users-", dir=folder)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself survives a crash once the directory is synced
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return token
