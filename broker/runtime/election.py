"""Who leads, decided by an existing engine: an etcd lease, or a Kubernetes Lease object.

brokerd writes no consensus protocol of its own (issue 16).  With ``--election`` every
brokerd of a group starts fenced (it takes no writes) and runs an ``Elector``:

- A candidate reads who leads.  Nobody (the key is absent, or the Lease expired): if its
  log reaches the last *confirmed* lsn the leader published, it campaigns with a
  compare-and-swap that only one candidate can win; a candidate behind it does not
  campaign (it would lose confirmed writes).  Somebody else: it follows them
  (``roles.follow``), and follows the next one when the leader changes.
- The winner holds a lease of ``ttl`` seconds, renews it every ``ttl / 3`` seconds and
  calls ``roles.promote``.  It publishes the lsn its confirms have reached on every
  renewal (monotonic: a smaller value never overwrites a larger one).
- Fencing.  The engine frees the leadership at the earliest ``ttl`` seconds after it
  received the last renewal, which is after the leader *sent* it.  So the leader
  calls ``roles.fence(reason)`` (stops accepting writes at once) at ``sent + ttl - margin``
  unless a later renewal succeeded first: when etcd cannot be reached, when a renewal
  says the lease is gone, or when the renewing task dies.  A watchdog task does this
  on its own timer, so a renewal stuck in a dead TCP connection cannot delay it.  No
  write is confirmed by two leaders: the old one stops ``margin`` seconds before the
  new one can win.
- A leader that lost its lease does not campaign again for one ``ttl`` (its link to the
  engine is suspect; the others get the first chance), then is a candidate again.
- On a clean stop (SIGTERM) a leader fences and releases its lease at once, so the
  others need not wait for the ttl.

Engines:
  ``etcd://host:2379[,host2:2379...]/prefix``  etcd v3's JSON gateway over HTTP/1.1 (etcd >= 3.4:
      /v3/lease/grant, /v3/lease/keepalive, /v3/lease/revoke, /v3/kv/range, /v3/kv/txn).
      ``<prefix>/leader`` = {"address", "epoch"} (JSON), put under the leader's lease by a txn
      that succeeds only when the key does not exist (create_revision == 0).
      ``<prefix>/confirmed`` = the confirmed lsn, 20 decimal digits, no lease (it outlives leaders).
  ``kubernetes[:lease-name]``  a coordination.k8s.io/v1 Lease (default name ``brokerd-leader``) in
      the pod's namespace, through the API server at KUBERNETES_SERVICE_HOST with the pod's
      service-account token and CA; acquired and renewed by PUT with the resourceVersion last read
      (optimistic concurrency: a 409 means somebody else changed it first).  holderIdentity is the
      leader's advertised address; annotations carry the epoch and the confirmed lsn.  A
      candidate judges expiry by its own clock, from when it last saw the Lease change (as
      client-go does), never by comparing the renewTime written by another machine's clock.

The roles API this drives lives on the server (``server.roles``, broker/runtime/replication.py):
``await promote(reason) -> epoch``, ``await follow(address, reason)``, ``fence(reason)``, ``role``,
``epoch``, ``last_lsn()``.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import ssl
from dataclasses import dataclass

import trio

from broker.config import KUBE_LEASE_NAME, parse_election  # noqa: F401  (the URL's one parser)

log = logging.getLogger("brokerd.election")

# -- limits and timings (each with its reason) --------------------------------------------------
# Lease length when nothing else is configured (--election-ttl): long enough that a GC pause or a
# busy etcd does not depose a healthy leader, short enough that a dead one is replaced in seconds.
DEFAULT_TTL = 5  # seconds
# Renew this often: two renewals may fail before the fence is due (fence at 3/4 of the ttl).
RENEW_FRACTION = 1 / 3  # of the ttl
# The leader fences this long before its lease can expire at the engine, counted from when it
# sent its last successful renewal: covers the event loop being late to the watchdog's alarm and
# the clocks of two machines running at slightly different rates.
FENCE_MARGIN_FRACTION = 0.25  # of the ttl
FENCE_MARGIN_MIN = 0.5  # seconds
# How often a follower or candidate reads who leads.  It bounds how late a candidate notices a
# free leadership (part of the failover time); 4 small reads a second per brokerd cost etcd nothing.
POLL_INTERVAL = 0.25  # seconds
# A request to the engine that has not answered in this long has failed (a new one is tried next
# round; the watchdog does not wait for it).
REQUEST_TIMEOUT = 2.0  # seconds, at most; never more than the renew interval
# The engine's answers are small JSON documents; a larger one is refused rather than buffered.
MAX_RESPONSE_BYTES = 1024 * 1024  # bytes
# The files a pod's service account is mounted as.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The Lease annotations brokerd reads and writes.
ANNOTATION_EPOCH = "brokerd.io/epoch"
ANNOTATION_CONFIRMED = "brokerd.io/confirmed-lsn"


def fence_margin(ttl: float) -> float:
    return max(FENCE_MARGIN_MIN, ttl * FENCE_MARGIN_FRACTION)


class EngineError(Exception):
    """The election engine could not be reached or answered something unexpected."""


@dataclass(frozen=True)
class Leader:
    address: str
    epoch: int


# -- a small HTTP/1.1 client (one request per connection) -----------------------------------------
async def http_call(host: str, port: int, method: str, path: str, body: bytes = b"", *,
                    headers: dict | None = None, ssl_context: ssl.SSLContext | None = None,
                    timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
    """(status, body) of one request; EngineError when it cannot be had within ``timeout``."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             f"Content-Length: {len(body)}", "Accept: application/json"]
    if body:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    buf = bytearray()
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            if ssl_context is not None:
                stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
            async with stream:
                await stream.send_all(request)
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break  # a TLS peer that closed without close_notify: what arrived is whole or not (below)
                    if not data:
                        break
                    buf += data
                    if len(buf) > MAX_RESPONSE_BYTES:
                        raise EngineError(f"{host}:{port} sent more than {MAX_RESPONSE_BYTES} bytes for {path}")
    except trio.TooSlowError:
        raise EngineError(f"{host}:{port} did not answer {method} {path} within {timeout:g} s") from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise EngineError(f"cannot reach {host}:{port}: {exc}") from None
    return parse_response(bytes(buf), f"{host}:{port}{path}")


def parse_response(raw: bytes, where: str) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise EngineError(f"{where}: the answer ended before its headers did")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise EngineError(f"{where}: not an HTTP/1.1 answer ({status_line[:80]!r})")
    headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line, sep, body = body.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                raise EngineError(f"{where}: a broken chunked body") from None
            if not sep or size == 0:
                break
            if len(body) < size:
                raise EngineError(f"{where}: the answer was cut off")
            out += body[:size]
            body = body[size + 2:]
        body = bytes(out)
    elif "content-length" in headers:
        n = int(headers["content-length"]) if headers["content-length"].isdigit() else -1
        if n < 0 or len(body) < n:
            raise EngineError(f"{where}: the answer was cut off")
        body = body[:n]
    return int(parts[1]), body


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text or "")


# The longest leader address taken from the engine (a HOST:PORT; anything longer is not one).
MAX_ADDRESS = 300  # characters


def _leader_from(raw: bytes) -> Leader:
    """The leader a key's value names; Leader("", 0) when it is not brokerd's JSON (somebody else
    wrote the key): it is held, by nobody this brokerd can follow, until it goes away."""
    try:
        doc = json.loads(raw)
        address, epoch = doc["address"], doc.get("epoch", 0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return Leader("", 0)
    return _checked(address, epoch)


def _checked(address, epoch) -> Leader:
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or len(address) > MAX_ADDRESS or any(c.isspace() for c in address):
        return Leader("", 0)
    return Leader(address, epoch if type(epoch) is int and epoch >= 0 else 0)


# -- etcd ------------------------------------------------------------------------------------------
class EtcdEngine:
    """etcd v3 through its JSON gateway: a lease, a CAS on ``<prefix>/leader``, ``<prefix>/confirmed``."""

    name = "etcd"

    def __init__(self, endpoints: list[tuple[str, int]], prefix: str, ttl: float, *, clock=trio.current_time):
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.ttl = float(ttl)
        self.clock = clock
        self.leader_key = prefix + "/leader"
        self.confirmed_key = prefix + "/confirmed"
        self.lease_id: str | None = None
        self.create_revision: str | None = None  # of our leader key while we hold it
        self._current = 0  # the endpoint that answered last

    def timeout(self) -> float:
        return min(REQUEST_TIMEOUT, self.ttl * RENEW_FRACTION)

    async def _post(self, path: str, doc: dict) -> dict:
        errors = []
        for i in range(len(self.endpoints)):
            host, port = self.endpoints[(self._current + i) % len(self.endpoints)]
            try:
                status, body = await http_call(host, port, "POST", path, json.dumps(doc).encode(),
                                               timeout=self.timeout())
            except EngineError as exc:
                errors.append(str(exc))
                continue
            self._current = (self._current + i) % len(self.endpoints)
            try:
                answer = json.loads(body or b"{}")
            except ValueError:
                raise EngineError(f"etcd at {host}:{port} answered {path} with something not JSON") from None
            if not isinstance(answer, dict):
                raise EngineError(f"etcd at {host}:{port} answered {path} with JSON that is not an object")
            if status != 200:
                raise EngineError(f"etcd at {host}:{port} refused {path}: {str(answer.get('message', status))[:200]}")
            return answer
        raise EngineError("; ".join(errors))

    async def observe(self) -> Leader | None:
        kvs = (await self._post("/v3/kv/range", {"key": _b64(self.leader_key)})).get("kvs") or []
        return _leader_from(_unb64(kvs[0].get("value", ""))) if kvs else None

    async def confirmed_lsn(self) -> int:
        kvs = (await self._post("/v3/kv/range", {"key": _b64(self.confirmed_key)})).get("kvs") or []
        return _lsn(_unb64(kvs[0].get("value", ""))) if kvs else 0

    async def try_acquire(self, leader: Leader) -> float | None:
        """Grant a lease and put the leader key under it if nobody holds it: the time the lease's
        clock started (the grant's send time), or None when somebody else won."""
        sent = self.clock()
        granted = await self._post("/v3/lease/grant", {"TTL": max(1, round(self.ttl))})
        lease_id = granted.get("ID")
        # etcd may raise a short TTL to its minimum: the lease it gave is what we must fence by
        try:
            self.ttl = max(self.ttl, float(granted.get("TTL", self.ttl)))
        except (TypeError, ValueError):
            raise EngineError(f"etcd granted a lease with a TTL that is not a number: {granted.get('TTL')!r}") from None
        key = _b64(self.leader_key)
        answer = await self._post("/v3/kv/txn", {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": _b64(_leader_json(leader)), "lease": lease_id}}],
        })
        if not answer.get("succeeded"):
            await self._revoke(lease_id)
            return None
        self.lease_id = lease_id
        self.create_revision = answer.get("header", {}).get("revision")
        return sent

    async def renew(self) -> float | None:
        sent = self.clock()
        answer = await self._post("/v3/lease/keepalive", {"ID": self.lease_id})
        ttl = int(answer.get("result", {}).get("TTL", 0) or 0)
        return sent if ttl > 0 else None  # no TTL: the lease expired (or was revoked)

    async def set_leader(self, leader: Leader) -> None:
        """Rewrite our leader key (the epoch after promotion), only while it is still ours."""
        key = _b64(self.leader_key)
        await self._post("/v3/kv/txn", {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": self.create_revision}],
            "success": [{"request_put": {"key": key, "value": _b64(_leader_json(leader)), "lease": self.lease_id}}],
        })

    async def publish_confirmed(self, lsn: int) -> None:
        """Raise ``<prefix>/confirmed`` to ``lsn``: only while we lead, never lowering it."""
        kvs = (await self._post("/v3/kv/range", {"key": _b64(self.confirmed_key)})).get("kvs") or []
        current = _lsn(_unb64(kvs[0].get("value", ""))) if kvs else 0
        if lsn <= current:
            return
        mod = kvs[0].get("mod_revision", "0") if kvs else "0"
        await self._post("/v3/kv/txn", {
            "compare": [
                {"key": _b64(self.leader_key), "result": "EQUAL", "target": "CREATE",
                 "create_revision": self.create_revision},
                {"key": _b64(self.confirmed_key), "result": "EQUAL", "target": "MOD", "mod_revision": mod},
            ],
            "success": [{"request_put": {"key": _b64(self.confirmed_key), "value": _b64(f"{lsn:020d}")}}],
        })

    async def release(self) -> None:
        if self.lease_id is not None:
            lease_id, self.lease_id, self.create_revision = self.lease_id, None, None
            await self._revoke(lease_id)

    async def _revoke(self, lease_id) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": lease_id})
        except EngineError as exc:
            log.info("could not revoke the etcd lease %s (it expires on its own): %s", lease_id, exc)


def _lsn(raw: bytes) -> int:
    try:
        return max(0, int(raw.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        return 0


def _leader_json(leader: Leader) -> str:
    return json.dumps({"address": leader.address, "epoch": leader.epoch}, separators=(",", ":"))


# -- Kubernetes -----------------------------------------------------------------------------------
def _micro_time(now: float) -> str:
    """A Lease's MicroTime (RFC 3339, microseconds, UTC)."""
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubernetesEngine:
    """A coordination.k8s.io/v1 Lease, acquired and renewed with resourceVersion concurrency."""

    name = "kubernetes"

    def __init__(self, api_host: str, api_port: int, namespace: str, lease_name: str, identity: str, ttl: float, *,
                 token_file: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 clock=trio.current_time, wall=None):
        import time as _time

        self.api = (api_host, api_port)
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{lease_name}"
        self.create_path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.lease_name, self.identity = namespace, lease_name, identity
        self.ttl = float(ttl)
        self.token_file = token_file
        self.ssl_context = ssl_context
        self.clock = clock
        self.wall = wall or _time.time
        self.seen: dict | None = None  # the Lease as last read (None: there is none)
        self.seen_version: str | None = None
        self.seen_at = 0.0  # our clock when the Lease last changed as far as we saw
        self.mine: dict | None = None  # the Lease as we last wrote it, while we hold it
        self._write_lock = trio.Lock()

    @classmethod
    def in_cluster(cls, lease_name: str, identity: str, ttl: float) -> "KubernetesEngine":
        """The API server, namespace, token and CA of the pod this runs in."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not host:
            raise EngineError("--election kubernetes runs inside a pod: KUBERNETES_SERVICE_HOST is not set")
        port = int(os.environ.get("KUBERNETES_SERVICE_PORT", "443"))
        try:
            with open(os.path.join(SERVICE_ACCOUNT_DIR, "namespace")) as fh:
                namespace = fh.read().strip()
            ctx = ssl.create_default_context(cafile=os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"))
        except OSError as exc:
            raise EngineError(f"--election kubernetes needs the pod's service account at {SERVICE_ACCOUNT_DIR} "
                              f"(automountServiceAccountToken): {exc}") from None
        return cls(host, port, namespace, lease_name, identity, ttl,
                   token_file=os.path.join(SERVICE_ACCOUNT_DIR, "token"), ssl_context=ctx)

    def timeout(self) -> float:
        return min(REQUEST_TIMEOUT, self.ttl * RENEW_FRACTION)

    async def _call(self, method: str, path: str, doc: dict | None = None) -> tuple[int, dict]:
        headers = {}
        if self.token_file:
            try:  # read each time: the kubelet rotates projected tokens
                with open(self.token_file) as fh:
                    headers["Authorization"] = "Bearer " + fh.read().strip()
            except OSError as exc:
                raise EngineError(f"cannot read the service-account token {self.token_file}: {exc}") from None
        body = json.dumps(doc).encode() if doc is not None else b""
        status, raw = await http_call(*self.api, method, path, body, headers=headers,
                                      ssl_context=self.ssl_context, timeout=self.timeout())
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            raise EngineError(f"the Kubernetes API answered {method} {path} with something not JSON") from None
        if status in (401, 403):
            raise EngineError(f"the Kubernetes API refused {method} on Lease {self.lease_name} ({status}): "
                              f"{answer.get('message', '')}; the pod's service account needs get/create/update "
                              "on leases.coordination.k8s.io (deploy/kubernetes/replicated/rbac.yaml)")
        return status, answer

    def _note(self, lease: dict | None) -> None:
        version = (lease or {}).get("metadata", {}).get("resourceVersion")
        if lease is None or version != self.seen_version:
            self.seen_at = self.clock()
        self.seen, self.seen_version = lease, version

    async def _read(self) -> dict | None:
        status, answer = await self._call("GET", self.path)
        if status == 404:
            self._note(None)
            return None
        if status != 200:
            raise EngineError(f"GET Lease {self.lease_name}: {status} {answer.get('message', '')}")
        self._note(answer)
        return answer

    def _holder(self, lease: dict | None) -> Leader | None:
        spec = (lease or {}).get("spec") or {}
        holder = spec.get("holderIdentity")
        duration = spec.get("leaseDurationSeconds") or 0
        if not holder or type(duration) is not int or self.clock() > self.seen_at + duration:
            return None  # free, or not renewed for a whole lease duration as our clock saw it
        epoch = ((lease.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_EPOCH, "0")
        return _checked(holder, int(epoch) if str(epoch).isdigit() and len(str(epoch)) < 20 else 0)

    async def observe(self) -> Leader | None:
        return self._holder(await self._read())

    async def confirmed_lsn(self) -> int:
        if self.seen is None:
            await self._read()
        value = ((self.seen or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_CONFIRMED, "0")
        return int(value) if str(value).isdigit() else 0

    def _lease(self, base: dict | None, leader: Leader, *, acquire: bool, confirmed: int | None = None) -> dict:
        now = _micro_time(self.wall())
        lease = json.loads(json.dumps(base)) if base else {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.lease_name, "namespace": self.namespace}, "spec": {}}
        meta = lease.setdefault("metadata", {})
        notes = meta.get("annotations") or {}
        notes[ANNOTATION_EPOCH] = str(leader.epoch)
        if confirmed is not None:
            old = notes.get(ANNOTATION_CONFIRMED, "0")
            notes[ANNOTATION_CONFIRMED] = str(max(confirmed, int(old) if str(old).isdigit() else 0))
        meta["annotations"] = notes
        spec = lease.setdefault("spec", {})
        if acquire:
            if spec.get("holderIdentity") and spec.get("holderIdentity") != leader.address:
                spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
            spec["acquireTime"] = now
        spec.update(holderIdentity=leader.address, leaseDurationSeconds=max(1, round(self.ttl)), renewTime=now)
        return lease

    async def try_acquire(self, leader: Leader) -> float | None:
        sent = self.clock()
        if self.seen is None:
            status, answer = await self._call("POST", self.create_path, self._lease(None, leader, acquire=True))
            ok = status == 201 or status == 200
        else:
            status, answer = await self._call("PUT", self.path, self._lease(self.seen, leader, acquire=True))
            ok = status == 200
        if status == 409 or not ok:
            if status not in (409,):
                log.warning("the Lease %s was not acquired: %s %s", self.lease_name, status, answer.get("message", ""))
            return None  # somebody else wrote it first
        self.mine = answer
        self._note(answer)
        return sent

    async def renew(self, leader: Leader | None = None, confirmed: int | None = None) -> float | None:
        async with self._write_lock:  # one PUT at a time: two with one resourceVersion would 409 each other
            return await self._renew(leader, confirmed)

    async def _renew(self, leader: Leader | None, confirmed: int | None) -> float | None:
        sent = self.clock()
        current = self.mine or {}
        who = leader or Leader(self.identity, int(((current.get("metadata") or {}).get("annotations") or {})
                                                  .get(ANNOTATION_EPOCH, "0") or 0))
        status, answer = await self._call("PUT", self.path, self._lease(current, who, acquire=False,
                                                                        confirmed=confirmed))
        if status == 409:
            return None  # somebody else changed our Lease: it is no longer ours
        if status != 200:
            raise EngineError(f"renewing Lease {self.lease_name}: {status} {answer.get('message', '')}")
        self.mine = answer
        self._note(answer)
        return sent

    async def set_leader(self, leader: Leader) -> None:
        await self.renew(leader)

    async def publish_confirmed(self, lsn: int) -> None:
        notes = ((self.mine or {}).get("metadata") or {}).get("annotations") or {}
        current = notes.get(ANNOTATION_CONFIRMED, "0")
        if lsn > (int(current) if str(current).isdigit() else 0):  # monotonic; no write when unchanged
            await self.renew(confirmed=lsn)

    async def release(self) -> None:
        """Give the Lease up (holder cleared), as client-go's ReleaseOnCancel does."""
        if self.mine is None:
            return
        lease, self.mine = json.loads(json.dumps(self.mine)), None
        lease["spec"]["holderIdentity"] = ""
        lease["spec"]["leaseDurationSeconds"] = 1
        try:
            await self._call("PUT", self.path, lease)
        except EngineError as exc:
            log.info("could not release the Lease %s (it expires on its own): %s", self.lease_name, exc)


# -- the loop --------------------------------------------------------------------------------------
class Elector:
    """Campaign, lead (renew, publish the confirmed lsn, fence in time), or follow the leader."""

    def __init__(self, engine, roles, advertise: str, *, confirmed_lsn=None, poll: float = POLL_INTERVAL,
                 clock=trio.current_time):
        self.engine = engine
        self.roles = roles
        self.advertise = advertise
        # the lsn up to which this brokerd's confirms went out while it leads (default: its log's end)
        self.confirmed_lsn = confirmed_lsn or roles.last_lsn
        self.poll = poll
        self.clock = clock
        self.following: str | None = None
        self.leading = False
        self.fence_at = 0.0
        self.renewed_at: float | None = None  # send time of the last successful renewal
        self.backoff_until = 0.0
        self._said = ""  # the last state logged, so a steady state is said once
        self.renew_scope: trio.CancelScope | None = None  # the renewing task's (tests stop it)

    def _say(self, level, text: str, *args) -> None:
        line = text % args
        if line != self._said:
            self._said = line
            log.log(level, "%s", line)

    @property
    def ttl(self) -> float:
        return self.engine.ttl

    async def run(self) -> None:
        self.roles.fence(f"waiting for the {self.engine.name} election")  # no write until it says who leads
        while True:
            try:
                await self._round()
            except EngineError as exc:
                self._say(logging.WARNING, "election: %s %s", self.engine.name, exc)
            except Exception as exc:  # a change of role refused (roles.RoleError) or failed: try again next round
                self._say(logging.ERROR, "election: %s: %s", type(exc).__name__, exc)
                self.following = None
            await trio.sleep(self.poll)

    async def _round(self) -> None:
        leader = await self.engine.observe()
        if leader is None:
            if self.clock() < self.backoff_until:
                return
            confirmed = await self.engine.confirmed_lsn()
            mine = self.roles.last_lsn()
            if mine < confirmed:
                self._say(logging.WARNING, "election: not campaigning: this log ends at lsn %d, before the "
                          "confirmed lsn %d the last leader published (it would lose confirmed writes)", mine, confirmed)
                return
            await self._campaign()
        elif not leader.address:
            self._say(logging.WARNING, "election: the %s leader record holds something that is not a brokerd's "
                      "HOST:PORT: waiting for it to expire or be deleted", self.engine.name)
        elif leader.address != self.advertise:
            if self.following != leader.address:
                self._say(logging.INFO, "election: %s leads (epoch %d): following it", leader.address, leader.epoch)
                await self.roles.follow(leader.address, f"the {self.engine.name} election: {leader.address} leads "
                                        f"(epoch {leader.epoch})")
                self.following = leader.address
        else:
            self._say(logging.INFO, "election: the leadership is still held under this address (%s) by an "
                      "older lease: waiting for it to expire", self.advertise)

    async def _campaign(self) -> None:
        want = Leader(self.advertise, int(self.roles.epoch) + 1)
        began = await self.engine.try_acquire(want)
        if began is None:
            return  # somebody else won; the next round follows them
        self.fence_at = began + self.ttl - fence_margin(self.ttl)
        self.renewed_at = began
        self.leading = True
        self.following = None
        # No confirm leaves after the fence time, even when this process was paused past it and
        # its writer runs before the watchdog: the check is made where replies go out.
        self.roles.guard_confirms(lambda: self.clock() < self.fence_at)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog, nursery.cancel_scope)  # before anything that can wait
                nursery.start_soon(self._renew, nursery.cancel_scope)  # promotion may take a while: keep the lease
                # not cancelled half-way (the watchdog may fire meanwhile): the fence below then undoes it
                with trio.CancelScope(shield=True):
                    epoch = await self.roles.promote(f"won the {self.engine.name} election as {self.advertise}")
                log.info("election: leading as %s, epoch %d (lease %g s, renewed every %g s, fence %g s before "
                         "it can expire)", self.advertise, epoch, self.ttl, self.ttl * RENEW_FRACTION,
                         fence_margin(self.ttl))
                self._said = ""
                with trio.move_on_after(self.engine.timeout()):
                    try:
                        await self.engine.set_leader(Leader(self.advertise, int(epoch)))
                    except EngineError as exc:
                        log.warning("election: could not write epoch %d to the leader key: %s", epoch, exc)
        finally:
            # whatever ended the term (a lost lease, an error, brokerd stopping): writes stop first,
            # then the lease is given back so the others need not wait for it to expire
            self.leading = False
            self.roles.fence(f"the {self.engine.name} leadership ended")  # a no-op when fenced already
            self.roles.guard_confirms(None)
            self.backoff_until = self.clock() + self.ttl
            with trio.CancelScope(shield=True), trio.move_on_after(self.engine.timeout()):
                await self.engine.release()

    async def _watchdog(self, scope: trio.CancelScope) -> None:
        while self.clock() < self.fence_at:
            await trio.sleep_until(self.fence_at)
        self.roles.fence(f"no {self.engine.name} renewal for {self.clock() - (self.renewed_at or 0.0):.2f} s: "
                         "the lease could expire")
        self.leading = False
        log.error("election: fenced: no successful %s renewal for %.2f s (the lease is %g s; fencing %g s before "
                  "it can expire): this brokerd takes no more writes", self.engine.name,
                  self.clock() - (self.renewed_at or 0.0), self.ttl, fence_margin(self.ttl))
        scope.cancel()

    async def _renew(self, scope: trio.CancelScope) -> None:
        interval = self.ttl * RENEW_FRACTION
        with trio.CancelScope() as self.renew_scope:
            next_at = self.renewed_at + interval
            while True:
                await trio.sleep_until(next_at)
                next_at = self.clock() + interval
                try:
                    sent = await self.engine.renew()
                except EngineError as exc:
                    log.warning("election: renewing the %s lease failed (%s); fencing in %.2f s unless one succeeds",
                                self.engine.name, exc, max(0.0, self.fence_at - self.clock()))
                    continue
                if sent is None:
                    self.roles.fence(f"the {self.engine.name} lease is gone")
                    self.leading = False
                    log.error("election: fenced: the %s lease is gone (expired or taken): this brokerd takes no "
                              "more writes", self.engine.name)
                    scope.cancel()
                    return
                self.renewed_at = sent
                self.fence_at = sent + self.ttl - fence_margin(self.ttl)
                try:
                    await self.engine.publish_confirmed(int(self.confirmed_lsn()))
                except EngineError as exc:
                    log.warning("election: could not publish the confirmed lsn: %s", exc)


def engine_for(config, advertise: str):
    """The engine ``config.election`` names (Config.validate has checked the text)."""
    kind = parse_election(config.election)
    if kind[0] == "etcd":
        return EtcdEngine(kind[1], kind[2], config.election_ttl)
    return KubernetesEngine.in_cluster(kind[1], advertise, config.election_ttl)


def confirmed_lsn_of(server):
    """What a leader publishes as confirmed: its log's durable end, and never beyond what its
    confirms waited for on followers' disks.

    With --sync-replicas N that is what N followers have fsynced.  With 0 a confirm promised the
    leader's own disk only, so the published lsn is what the furthest follower has acked (0 with
    none): publishing the leader's own end would keep every follower that lags by even one record
    (a ticker record written just before a kill) from ever campaigning, and the group would stay
    leaderless after the leader died."""
    roles = server.roles

    def confirmed() -> int:
        lsn = roles.last_lsn()
        repl = getattr(server, "replication", None)
        if repl is None:
            return lsn
        if getattr(repl, "sync_replicas", 0) > 0:
            return min(lsn, repl.replica_lsn())
        acked = [link.get("acked", 0) for link in getattr(repl, "links", {}).values()]
        return min(lsn, max(acked, default=0))

    return confirmed


async def run_election(server, config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """brokerd's elector (cli.run starts it once the listeners are open): started() hands back the
    cancel scope that stops it (a leader then fences and releases its lease)."""
    advertise = config.advertise or f"{config.host}:{server.port}"
    engine = engine_for(config, advertise)  # EngineError: told to the caller before started()
    elector = Elector(engine, server.roles, advertise, confirmed_lsn=confirmed_lsn_of(server))
    server.elector = elector
    log.info("election: %s with a %g s lease, advertising %s", config.election, engine.ttl, advertise)
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await elector.run()
