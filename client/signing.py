"""Signed tasks (protocol.md §8.4): Ed25519 signatures on task envelopes, Celery's "message signing".

A producer with a signing key puts ``sig`` in every envelope it sends::

    "sig": {"kid": "3f1c0e9a7b2d4c55", "alg": "ed25519", "scope": "task", "sig": h'…64 bytes…'}

and a worker configured with public keys refuses (dead-letters, FAILURE ``SecurityError``, never runs)
every task whose signature is missing, made by a key it does not trust, or does not match.  So a leaked
publish grant cannot make workers run arbitrary calls.

**What is signed** (``signed_bytes``): the domain string ``SIG_DOMAIN`` followed by the canonical CBOR
(RFC 8949 §4.2.1, ``cbor2.dumps(..., canonical=True)``) of the array ``[meta, covered]``: ``meta`` is the
``sig`` map without its ``sig`` entry (so the key id, the algorithm and the scope are signed too), and
``covered`` is the envelope without ``sig``: every other key, including ``id``.  Hence an altered body,
a signature moved to another envelope, or a signed body published under another task id (the worker also
requires message id == envelope ``id``) do not verify.  The worker re-encodes the envelope it decoded;
any value that does not survive that round trip fails closed (refused), never open.

**Scopes**: envelopes that brokerd itself completes before delivery are signed at the producer with the
part brokerd fills in left out, and that part is bound otherwise:

- ``task``: everything (``delay``, ``apply_async``, ``send_task``, links, chain steps, chord members);
- ``chord-body`` / ``chord-error``: brokerd prepends the member results (1 argument) or the failed
  member's id, exception type and message (3 arguments) to ``args``; those leading arguments are not
  covered, the task, its id and the producer's own arguments are;
- ``schedule``: brokerd sets ``id`` and ``root_id`` to ``NAME@TICK`` and may set ``expires`` at each
  tick; those three are not covered, the schedule entry's name is (``meta["schedule"]``), and the worker
  requires the id to be ``NAME@`` followed by a Unix time.

Keys: ``task_signing_key`` (a PEM text or a path to a PEM file, PKCS#8) and ``task_signing_key_id`` (default:
``key_id(public key)``, the first 16 hex digits of the SHA-256 of the raw public key) on producers;
``task_signing_public_keys`` ``{kid: PEM or path}`` on workers (``--signing-public-key KID=PATH``).  Several
public keys at once let keys rotate: trust the new one, switch producers, drop the old one.

    python -m client.signing keygen /etc/brokerd/tasks   # writes tasks.key (0600) and tasks.pub, prints the kid

``cryptography`` is an optional dependency (``pip install 'brokerd[signing]'``), imported only when keys
are configured.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys

import cbor2

ALG = "ed25519"
SIG_KEY = "sig"  # the envelope key that carries the signature map
# Signed bytes start with this, so a task signature can never be taken for a signature of anything else
# made with the same key (and a later format, v2, cannot be confused with this one).
SIG_DOMAIN = b"brokerd-task-signature-v1\x00"
# How many leading arguments brokerd prepends to a chord body's / chord errback's args (state/schedules.py
# _finish_chord): those are not covered by the producer's signature.
PREPENDED_ARGS = {"chord-body": 1, "chord-error": 3}
SCOPES = ("task", "chord-body", "chord-error", "schedule")
# Envelope keys brokerd sets on each scheduled run: not covered in the "schedule" scope.
SCHEDULE_FILLED = ("id", "root_id", "expires")
# A key id is text of 1 to 64 characters (it is shown in errors and logs, so it stays short).
KID_MAX = 64
_TICK_ID = re.compile(r"@[0-9]+(\.[0-9]+)?\Z")


class SigningError(ValueError):
    """A signing setting that cannot be used (a bad key, a missing package); the message says what to fix."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningError("signed tasks need the 'cryptography' package: pip install 'brokerd[signing]'") from None
    return serialization, ed25519


def _pem(value, what: str) -> bytes:
    """A PEM given as text/bytes, or a path to a file holding one."""
    if isinstance(value, str):
        if value.lstrip().startswith("-----BEGIN"):
            return value.encode()
        try:
            with open(value, "rb") as f:
                return f.read()
        except OSError as exc:
            raise SigningError(f"{what}: cannot read the key file {value!r}: {exc.strerror}") from None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, os.PathLike):
        return _pem(os.fspath(value), what)
    raise SigningError(f"{what} must be a PEM text or a path to a PEM file (got {type(value).__name__})")


def load_private_key(value, what: str = "task_signing_key"):
    serialization, ed25519 = _crypto()
    if isinstance(value, ed25519.Ed25519PrivateKey):
        return value
    try:
        key = serialization.load_pem_private_key(_pem(value, what), password=None)
    except SigningError:
        raise
    except Exception as exc:  # noqa: BLE001 - cryptography raises ValueError/TypeError/UnsupportedAlgorithm
        raise SigningError(f"{what} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{what} is a {type(key).__name__}; task signing uses Ed25519 keys "
                           f"(make one with: python -m client.signing keygen NAME)")
    return key


def load_public_key(value, what: str = "task_signing_public_keys"):
    serialization, ed25519 = _crypto()
    if isinstance(value, ed25519.Ed25519PublicKey):
        return value
    try:
        key = serialization.load_pem_public_key(_pem(value, what))
    except SigningError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SigningError(f"{what} is not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError(f"{what} is a {type(key).__name__}; task signing uses Ed25519 keys")
    return key


def key_id(public_key) -> str:
    """The default key id: 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _check_kid(kid, what: str) -> str:
    if type(kid) is not str or not 0 < len(kid) <= KID_MAX:
        raise SigningError(f"{what}: a key id must be text of 1 to {KID_MAX} characters (got {kid!r})")
    return kid


def signed_bytes(env: dict, meta: dict, *, delivered: bool) -> bytes:
    """The bytes a signature covers (module docstring).  ``delivered``: ``env`` is as the worker got it,
    so brokerd's prepended chord arguments are stripped; at the producer they are not there yet."""
    covered = {k: v for k, v in env.items() if k != SIG_KEY}
    scope = meta.get("scope")
    n = PREPENDED_ARGS.get(scope)
    if n and delivered:
        args = covered.get("args")
        covered["args"] = args[n:] if type(args) is list else args
    elif scope == "schedule":
        for k in SCHEDULE_FILLED:
            covered.pop(k, None)
    return SIG_DOMAIN + cbor2.dumps([meta, covered], canonical=True)


class Signer:
    """Signs envelopes with one private key (a producer's ``task_signing_key``)."""

    def __init__(self, private_key, kid: str | None = None):
        self.key = load_private_key(private_key)
        self.kid = _check_kid(kid, "task_signing_key_id") if kid is not None else key_id(self.key.public_key())

    def sign(self, env: dict, scope: str = "task", schedule: str | None = None) -> dict:
        """Add ``sig`` to ``env`` (in place) and return it.  ``schedule``: the entry's name (scope "schedule")."""
        if scope not in SCOPES:
            raise ValueError(f"unknown signature scope {scope!r} (one of {', '.join(SCOPES)})")
        meta = {"kid": self.kid, "alg": ALG, "scope": scope}
        if scope == "schedule":
            meta["schedule"] = schedule
        env.pop(SIG_KEY, None)
        sig = self.key.sign(signed_bytes(env, meta, delivered=False))
        env[SIG_KEY] = {**meta, "sig": sig}
        return env


class Verifier:
    """Checks envelopes against the trusted public keys (a worker's ``task_signing_public_keys``)."""

    def __init__(self, public_keys: dict):
        if not isinstance(public_keys, dict) or not public_keys:
            raise SigningError("task_signing_public_keys must be a non-empty map {key id: PEM or path}")
        self.keys = {_check_kid(kid, "task_signing_public_keys"): load_public_key(v, f"public key {kid!r}")
                     for kid, v in public_keys.items()}

    def refusal(self, env: dict, msg_id: str) -> str | None:
        """None when ``env`` (delivered as message ``msg_id``) carries a good signature; else why not."""
        s = env.get(SIG_KEY)
        if s is None:
            return "it is not signed, and this worker runs signed tasks only"
        if type(s) is not dict:
            return f"its 'sig' field is a {type(s).__name__}, not a signature map"
        kid, alg, scope, sig = s.get("kid"), s.get("alg"), s.get("scope"), s.get("sig")
        if alg != ALG:
            return f"its signature algorithm {alg!r} is not {ALG!r}"
        if type(kid) is not str or kid not in self.keys:
            return f"it is signed by key id {str(kid)[:KID_MAX]!r}, which this worker does not trust " \
                   f"(trusted: {', '.join(sorted(self.keys))})"
        if scope not in SCOPES:
            return f"its signature scope {str(scope)[:40]!r} is not one of {', '.join(SCOPES)}"
        if type(sig) is not bytes or len(sig) != 64:
            return "its signature is not 64 bytes"
        if env.get("id") != msg_id:
            return f"its envelope id {str(env.get('id'))[:80]!r} is not its message id (a signed body sent as another task)"
        if scope == "schedule":
            name = s.get("schedule")
            if type(name) is not str or not msg_id.startswith(name + "@") or not _TICK_ID.match(msg_id, len(name)):
                return f"its id {msg_id[:80]!r} is not a run of the signed schedule entry {str(name)[:80]!r}"
        elif scope in PREPENDED_ARGS and len(env.get("args") or ()) < PREPENDED_ARGS[scope]:
            return f"a {scope} signature needs the {PREPENDED_ARGS[scope]} leading arguments brokerd adds"
        meta = {k: v for k, v in s.items() if k != "sig"}
        try:
            data = signed_bytes(env, meta, delivered=True)
            self.keys[kid].verify(sig, data)
        except Exception:  # noqa: BLE001 - InvalidSignature, or a value canonical CBOR cannot encode
            return f"its signature by key {kid!r} does not match its contents (altered, or made for another task)"
        return None


def signer_for(conf) -> Signer | None:
    """The app's Signer, or None when ``task_signing_key`` is not set."""
    key = conf.get("task_signing_key")
    if not key:
        return None
    return Signer(key, conf.get("task_signing_key_id"))


def verifier_for(conf) -> Verifier | None:
    """The worker's Verifier, or None when ``task_signing_public_keys`` is not set (tasks run unchecked)."""
    keys = conf.get("task_signing_public_keys")
    if not keys:
        return None
    return Verifier(keys)


# -- python -m client.signing keygen NAME ----------------------------------------------------
def keygen(prefix: str) -> tuple[str, str, str]:
    """Write PREFIX.key (the private key, mode 0600) and PREFIX.pub; return (kid, key path, pub path)."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    kpath, ppath = prefix + ".key", prefix + ".pub"
    fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite a key
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    with open(ppath, "xb") as f:
        f.write(pub)
    return key_id(key.public_key()), kpath, ppath


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.signing", description="Keys for signed tasks.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("keygen", help="make an Ed25519 key pair: PREFIX.key (keep secret) and PREFIX.pub")
    g.add_argument("prefix", metavar="PREFIX", help="path without extension, e.g. /etc/brokerd/tasks")
    args = ap.parse_args(argv)
    try:
        kid, kpath, ppath = keygen(args.prefix)
    except FileExistsError as exc:
        print(f"keygen: {exc.filename} exists; not overwriting a key (pick another PREFIX)", file=sys.stderr)
        return 2
    except (OSError, SigningError) as exc:
        print(f"keygen: {exc}", file=sys.stderr)
        return 2
    print(kid)
    print(f"private key: {kpath}  (producers: task_signing_key={kpath!r}, task_signing_key_id={kid!r})",
          file=sys.stderr)
    print(f"public key:  {ppath}  (workers: --signing-public-key {kid}={ppath})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
