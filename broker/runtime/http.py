"""brokerd's HTTP side: Prometheus metrics, queue depths for autoscalers, probes, the web page.

Served by hypercorn's trio worker inside brokerd's own event loop (started
from ``Server.serve``'s nursery), so a request reads the state with no locks,
through frozen views built on request (``broker.handlers.views``), and a wedged
event loop is a failed probe.  The app is a
plain ASGI callable, not a framework.

    GET /metrics     Prometheus text format 0.0.4
    GET /api/queues  {"queues": {"emails": {"ready": 12, "inflight": 3, ...}}}
                     (KEDA metrics-api: valueLocation "queues.emails.ready")
    GET /healthz     liveness: the event loop answers and the log writer is
                     not stuck in one write or fsync.  Stays 200 when the log
                     has *failed* (full disk): restarting would not help, and
                     consumers still drain the queues.
    GET /readyz      readiness: recovery done, listeners open, not stopping,
                     and the log accepts writes (503 with the reason otherwise:
                     producers would get LOG_FAILED).
    GET /ready/leader  /readyz, and 503 unless this brokerd is the leader: the
                     readiness probe of a Service that points at the leader only.

    GET /, /task/<id>, /static/*, /api/overview, /api/tasks, /api/graphs, /api/task/<id>,
        /api/dead/<queue>: the live web page and its JSON (``broker.web``)
    POST /api/queues/<name>/pause|resume|purge|requeue-dead: the page's buttons;
        the same state methods as the admin commands, then the server's flush,
        and the reply waits for the log like an admin reply does (``App._act``)
    POST /api/task/<id>/revoke|terminate|retry: the task page's buttons (``broker.web.actions``)
    GET /worker/<hostname>, POST /api/workers/<hostname>/shutdown|pool-grow|pool-shrink: a worker's
        page and its controls (a CONTROL relayed to it; the reply waits CONTROL_WAIT at most)

With users (``server.users``) every route but /healthz, /readyz and /static/* needs a login
(``App._guarded``; sessions, CSRF and bearer tokens in ``broker.web.login``):
    GET  /login, POST /login   the token form; a session cookie on success
    POST /logout               ends the session (with its CSRF token)
/metrics and /api/queues are left open only by ``http_open_metrics``.

Anything else is 404, a wrong method 405 (with Allow), both as JSON.
During log replay nothing listens yet (replay runs before the listeners
open): probes see "connection refused", which a startup probe allows for.

Labels stay low-cardinality: the only label values are queue names and fixed
words (state, reason, le); never message or task ids.

No trio import here (tests/test_layering.py): hypercorn's trio worker does
the I/O, and ``Server.serve`` gives it a task status to report on.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import shutil
import socket
import time
from urllib.parse import parse_qs, quote, unquote, urlsplit

from broker import __version__, web
from broker.errors import BrokerError
from broker.handlers import views
from broker.runtime.durability import FSYNC_BUCKETS
from broker.web import actions, login
from broker.web.login import OPEN

log = logging.getLogger("brokerd.http")

SECONDS = 1.0
# /healthz fails (and the systemd watchdog stops being fed) once the log
# writer has been inside one write or fsync this long.  A healthy fsync takes
# milliseconds and a very busy disk seconds; a minute means the device has
# stopped answering (Linux's hung-task detector waits 120 s), and only a
# restart on a reattached volume can help.
WRITER_STALL_LIMIT = 60 * SECONDS
# An idle keep-alive connection is closed after this (a Prometheus scrape
# every 15 s opens a new one; hypercorn's own default).
KEEP_ALIVE_TIMEOUT = 5 * SECONDS
# A connection that sends nothing for this long, in the middle of a request (a body that
# stops arriving), is closed: no request of ours takes a client this long to send.
READ_TIMEOUT = 10 * SECONDS
# The largest request line plus headers (hypercorn's default): a browser's are ~1-2 KiB.
MAX_REQUEST_HEAD = 16 * 1024

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = b"application/json"


# -- health ------------------------------------------------------------------------------
def health(server) -> tuple[bool, dict]:
    """Liveness: (ok, body).  Answering at all proves the event loop runs."""
    body: dict = {"status": "ok", "event_loop": "ok"}
    dur = server.wal
    if dur is None:
        return True, body
    stall = dur.writer_stall(time.monotonic())
    body["log_writer_stall_s"] = round(stall, 3)
    if dur.failed is not None:
        # Reported, never fatal here: see /readyz and the metrics.
        body["log"] = f"failed: {dur.failed}"
    if stall > WRITER_STALL_LIMIT:
        body["status"] = "unhealthy"
        body["reason"] = (
            f"the write-ahead log writer has been inside one write or fsync for {stall:.0f}s "
            f"(limit {WRITER_STALL_LIMIT:g}s): the disk under {dur.data_dir} is not answering"
        )
        return False, body
    return True, body


def readiness(server) -> tuple[bool, dict]:
    """Readiness: (ok, body) — whether producers should be sent here."""
    if getattr(server, "stopping", False):
        return False, {"status": "stopping", "reason": "brokerd is shutting down"}
    if not server.ready:
        return False, {"status": "starting", "reason": "recovery or the protocol listeners are not done yet"}
    dur = server.wal
    if dur is not None and dur.failed is not None:
        return False, {
            "status": "log_failed",
            "reason": f"the write-ahead log failed ({dur.failed}); publishes are refused with "
            "LOG_FAILED until brokerd is restarted; consumers may still drain the queues",
        }
    return True, {"status": "ready"}


def leader_readiness(server) -> tuple[bool, dict]:
    """/ready/leader: ready (above) and the leader now, so a Service selecting ready pods points at the
    leader alone (deploy/kubernetes/replicated).  A follower, or a leader fenced by the election, is 503."""
    ok, body = readiness(server)
    if not ok:
        return ok, body
    roles = getattr(server, "roles", None)
    if roles is not None:
        leads = roles.role == "leader" and not getattr(roles, "fenced", False)
    else:
        leads = getattr(server, "follower", None) is None
    if not leads:
        return False, {"status": "not_leader", "reason": "this brokerd is a follower (or fenced): it takes no writes"}
    return True, {"status": "leader"}


# -- /api/queues -------------------------------------------------------------------------
# Queues per piece of a streamed /metrics or /api/queues.  Both list every queue (a scraper
# wants them all), so instead of rendering 50,000 queues in one go (0.5-1.5 s with the event
# loop blocked) they are rendered this many at a time and each piece is sent before the next
# is computed: sending is a trio checkpoint, so other clients run between pieces.  200 queues
# cost ~2-6 ms of rendering (measured: bench/http_queues.py).
QUEUE_CHUNK = 200


def _queue_json(s) -> dict:
    return {
        "ready": s.ready,
        "inflight": s.inflight,
        "delayed": s.delayed,
        "dead": s.dead,
        "backlog": s.ready + s.inflight,
        "consumers": s.consumers,
        "oldest_ready_age_s": round(s.oldest_ready_age, 3),
        "paused": s.paused,
        "published": s.published,
        "delivered": s.delivered,
        "acked": s.acked,
        "nacked": s.nacked,
        "redelivered": s.redelivered,
        "dead_lettered": s.dead_lettered,
        "expired": s.expired,
        "rejected": s.rejected,
        "released": s.released,
        "recalled": s.recalled,
    }


def _visible(names: list, access) -> list:
    """The queue names this viewer's grants cover (all of them without users)."""
    return names if access is None or access.grant is None else [n for n in names if access.sees(n)]


def queues_json_chunks(server, now: float, access=None):
    """``{"queues": {name: {...}}}`` as text pieces, QUEUE_CHUNK queues each; ``backlog`` is
    ready + inflight, the figure to scale workers on (in-flight tasks still need their worker).
    The names are taken once; a queue deleted while the reply streams is left out."""
    state = server.state
    names = _visible(views.queue_names(state), access)
    yield '{"queues":{'
    sep = ""
    for i in range(0, len(names), QUEUE_CHUNK):
        part = {s.name: _queue_json(s) for s in views.queue_statistics(state, names[i:i + QUEUE_CHUNK], now)}
        if part:
            yield sep + json.dumps(part, separators=(",", ":"))[1:-1]
            sep = ","
    yield "}}\n"


def queues_json(server, now: float) -> dict:
    return json.loads("".join(queues_json_chunks(server, now)))


# -- /metrics ----------------------------------------------------------------------------
def escape_label(value: str) -> str:
    # exposition format 0.0.4: backslash, double quote and line feed are escaped
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


# (metric, help, QueueStatistics field) for the per-queue counters
QUEUE_COUNTERS = (
    ("brokerd_messages_published_total", "Messages accepted into the queue.", "published"),
    ("brokerd_messages_delivered_total", "Deliveries to consumers, redeliveries included.", "delivered"),
    ("brokerd_messages_acked_total", "Deliveries acknowledged.", "acked"),
    ("brokerd_messages_nacked_total", "Deliveries given back with NACK.", "nacked"),
    ("brokerd_messages_redelivered_total", "Messages returned to the queue after their consumer left or timed out.", "redelivered"),
    ("brokerd_messages_dead_lettered_total", "Messages moved from this queue to its dead-letter queue.", "dead_lettered"),
    ("brokerd_messages_expired_total", "Messages dropped because their TTL passed.", "expired"),
    ("brokerd_messages_released_total", "Deliveries a consumer gave back unstarted (RELEASE).", "released"),
    ("brokerd_messages_recalled_total", "Deliveries brokerd asked back from a busy consumer for an idle one (RECALL).",
     "recalled"),
)
MESSAGE_STATES = ("ready", "inflight", "delayed", "dead")


# what a streamed scrape keeps of each queue's QueueStatistics (not its options map)
_ROW_FIELDS = ("ready", "inflight", "delayed", "dead", "oldest_ready_age", "consumers", "paused",
               *(field for _, _, field in QUEUE_COUNTERS), "rejected")
_row = operator.attrgetter(*_ROW_FIELDS)
_COL = {f: i + 1 for i, f in enumerate(_ROW_FIELDS)}  # column of a field in a row (0 is the label)


def metrics_chunks(server, now: float, access=None):
    """The exposition text in pieces (see QUEUE_CHUNK): the broker-wide families, then
    each per-queue family QUEUE_CHUNK queues at a time.  The first per-queue family takes
    each queue's figures once; the others reuse them, so one scrape is one snapshot per
    queue.  A queue deleted while the scrape streams is left out."""
    state = server.state
    names = _visible(views.queue_names(state), access)
    out: list[str] = []
    add = out.append

    def family(name: str, typ: str, help_: str) -> None:
        add(f"# HELP {name} {help_}")
        add(f"# TYPE {name} {typ}")

    def single(name: str, typ: str, help_: str, value, lbl: str = "") -> None:
        family(name, typ, help_)
        add(f"{name}{{{lbl}}} {_num(value)}" if lbl else f"{name} {_num(value)}")

    def piece() -> str:
        text = "\n".join(out) + "\n"
        out.clear()
        return text

    # broker-wide
    single("brokerd_up", "gauge", "1 while brokerd answers scrapes.", 1)
    single("brokerd_build_info", "gauge", "brokerd's version, as a label.", 1, f'version="{escape_label(__version__)}"')
    single("brokerd_start_time_seconds", "gauge", "Unix time brokerd started.", float(server.started))
    single("brokerd_ready", "gauge", "1 when /readyz would answer 200.", readiness(server)[0])
    single("brokerd_connections", "gauge", "Open client connections (binary protocol and admin text).", len(server.conns))
    single("brokerd_queues", "gauge", "Queues known to brokerd, dead-letter queues included.", len(names))

    # per queue
    family(
        "brokerd_queue_messages", "gauge",
        "Messages in the queue by state; dead counts this queue's dead-letter queue "
        "(which also shows them as its own ready).",
    )
    rows: list[tuple] = []
    for i in range(0, len(names), QUEUE_CHUNK):
        for s in views.queue_statistics(state, names[i:i + QUEUE_CHUNK], now):
            r = ('queue="' + escape_label(s.name) + '"', *_row(s))
            rows.append(r)
            lbl = r[0]
            add(f'brokerd_queue_messages{{{lbl},state="ready"}} {r[1]}')
            add(f'brokerd_queue_messages{{{lbl},state="inflight"}} {r[2]}')
            add(f'brokerd_queue_messages{{{lbl},state="delayed"}} {r[3]}')
            add(f'brokerd_queue_messages{{{lbl},state="dead"}} {r[4]}')
        yield piece()

    def per_queue(metric: str, field: str, fmt, extra: str = ""):
        col = _COL[field]
        for i in range(0, len(rows), QUEUE_CHUNK):
            for r in rows[i:i + QUEUE_CHUNK]:
                add(f"{metric}{{{r[0]}{extra}}} {fmt(r[col])}")
            yield piece()

    family("brokerd_queue_oldest_ready_age_seconds", "gauge", "Age of the oldest ready message of the highest ready priority; 0 when none is ready.")
    yield from per_queue("brokerd_queue_oldest_ready_age_seconds", "oldest_ready_age", _num)
    family("brokerd_queue_consumers", "gauge", "Consumers subscribed to the queue.")
    yield from per_queue("brokerd_queue_consumers", "consumers", str)
    family("brokerd_queue_paused", "gauge", "1 while deliveries from the queue are paused.")
    yield from per_queue("brokerd_queue_paused", "paused", lambda v: "1" if v else "0")
    for name, help_, field in QUEUE_COUNTERS:
        family(name, "counter", help_ + " Kept across restarts.")
        yield from per_queue(name, field, str)
    family("brokerd_publish_rejected_total", "counter", "Publishes refused by the queue, by reason (max_length: full with overflow=reject).")
    yield from per_queue("brokerd_publish_rejected_total", "rejected", str, ',reason="max_length"')

    dur = server.wal
    if dur is not None:
        _wal_metrics(dur, single, family, add)
    roles = getattr(server, "roles", None)
    if roles is not None:
        _replication_metrics(server, roles, single, family, add)
    if out:
        yield piece()


def render_metrics(server, now: float) -> str:
    return "".join(metrics_chunks(server, now))


def _wal_metrics(dur, single, family, add) -> None:
    single("brokerd_wal_failed", "gauge", "1 once the write-ahead log failed (ENOSPC, EIO): publishes are refused until restart.", dur.failed is not None)
    single("brokerd_wal_writer_stall_seconds", "gauge", "Seconds the log writer has been inside its current write or fsync; 0 when idle.", dur.writer_stall(time.monotonic()))
    family("brokerd_wal_fsync_seconds", "histogram", "Latency of the log's fsyncs.")
    cum = 0
    for bound, n in zip(FSYNC_BUCKETS, dur.fsync_hist):
        cum += n
        add(f'brokerd_wal_fsync_seconds_bucket{{le="{_num(float(bound))}"}} {cum}')
    add(f'brokerd_wal_fsync_seconds_bucket{{le="+Inf"}} {dur.fsyncs}')
    add(f"brokerd_wal_fsync_seconds_sum {_num(dur.fsync_seconds)}")
    add(f"brokerd_wal_fsync_seconds_count {dur.fsyncs}")
    single("brokerd_wal_records_per_fsync", "gauge", "Log records made durable per fsync since start (group commit); rate(records)/rate(fsync count) for recent figures.", dur.records / dur.fsyncs if dur.fsyncs else 0.0)
    single("brokerd_wal_records_total", "counter", "Log records written since start.", dur.records)
    single("brokerd_wal_batches_total", "counter", "Log writes (batches of records) since start.", dur.batches)
    single("brokerd_wal_bytes_total", "counter", "Bytes written to the log since start.", dur.bytes)
    segs = dur.wal.segments()
    single("brokerd_wal_bytes", "gauge", "Bytes in the log's segment files now.", sum(s.size_bytes for s in segs))
    single("brokerd_wal_segments", "gauge", "Segment files of the log now.", len(segs))
    single("brokerd_wal_compactions_total", "counter", "Compactions since start.", dur.compactions)
    single("brokerd_wal_live_bytes", "gauge", "The live size compaction is triggered against: the larger of the queued "
           "messages' estimate and what compaction measured it rewrote forward.", dur.live_bytes())
    single("brokerd_wal_compacted_bytes_total", "counter", "Bytes compaction and checkpoints rewrote forward since "
           "start.", dur.compacted_bytes)
    try:
        usage = shutil.disk_usage(dur.data_dir)
        free, total = usage.free, usage.total
    except OSError:
        free = total = float("nan")
    single("brokerd_disk_free_bytes", "gauge", "Free bytes on the file system of the data directory.", free)
    single("brokerd_disk_total_bytes", "gauge", "Size in bytes of the file system of the data directory.", total)
    rec = dur.recovery
    single("brokerd_recovery_seconds", "gauge", "Seconds the log replay took at the last start.", rec.seconds if rec else 0.0)
    single("brokerd_recovery_records", "gauge", "Log records replayed at the last start.", rec.records if rec else 0)
    single("brokerd_recovery_truncated_bytes", "gauge", "Bytes of torn tail cut off the log at the last start; above 0 after a crash mid-write.", rec.truncated_bytes if rec else 0)


def _replication_metrics(server, roles, single, family, add) -> None:
    """Role, epoch and, on a leader, each follower's durable lsn and lag (broker/runtime/roles.py)."""
    now_role = "fenced" if roles.fenced else roles.role
    family("brokerd_replication_role", "gauge", "1 for this brokerd's role in its replication group: leader, follower, or fenced (a leader that stopped taking writes).")
    for r in ("leader", "follower", "fenced"):
        add(f'brokerd_replication_role{{role="{r}"}} {1 if r == now_role else 0}')
    single("brokerd_replication_epoch", "gauge", "The leadership term of this brokerd's log (EPOCH records; one more at each promotion).", roles.epoch)
    repl = server.replication if server.follower is None else None
    followers = repl.followers() if repl is not None else []
    for name, help_, key in (
        ("brokerd_replication_follower_lsn", "Each follower's durable (fsynced) lsn, as its last REPLICA_ACK said.", "lsn"),
        ("brokerd_replication_follower_lag_records", "Records this leader has written that the follower has not acked.", "lag_records"),
        ("brokerd_replication_follower_lag_seconds", "Seconds since the follower last had every record this leader had written (0 when caught up).", "lag_seconds"),
    ):
        family(name, "gauge", help_)
        for f in followers:
            add(f'{name}{{follower="{escape_label(f["address"])}"}} {_num(f[key])}')


# -- the ASGI app ------------------------------------------------------------------------
def _json(status: int, body: dict) -> tuple[int, bytes, bytes]:
    return status, JSON_CONTENT_TYPE, (json.dumps(body, separators=(",", ":")) + "\n").encode()


def route_metrics(server, access=OPEN):
    return 200, PROMETHEUS_CONTENT_TYPE, metrics_chunks(server, time.time(), access)  # streamed: see QUEUE_CHUNK


def route_queues(server, access=OPEN):
    return 200, JSON_CONTENT_TYPE, queues_json_chunks(server, time.time(), access)


def route_healthz(server, access=OPEN):
    ok, body = health(server)
    return _json(200 if ok else 503, body)


def route_readyz(server, access=OPEN):
    ok, body = readiness(server)
    return _json(200 if ok else 503, body)


def route_ready_leader(server, access=OPEN):
    ok, body = leader_readiness(server)
    return _json(200 if ok else 503, body)


ROUTES = {
    "/metrics": route_metrics,
    "/api/queues": route_queues,
    "/healthz": route_healthz,
    "/readyz": route_readyz,
    "/ready/leader": route_ready_leader,
}


# -- the web page (rendering and data in broker.web) -------------------------------------------
# POST /api/queues/<name>/<action>: the admin protocol's command and the state method it runs
ACTIONS = {
    "pause": ("PAUSE", lambda state, name, now: (state.pause(name, True, now), f"paused {name}")[1]),
    "resume": ("RESUME", lambda state, name, now: (state.pause(name, False, now), f"resumed {name}")[1]),
    "purge": ("PURGE", lambda state, name, now: _plural(state.purge(name, now), "purged {n} message{s} from " + name)),
    "requeue-dead": ("REQUEUE-DEAD", lambda state, name, now: _plural(
        state.requeue_dead(name, now), "requeued {n} dead letter{s} to " + name)),
}
ERROR_STATUS = {"NOT_FOUND": 404, "LOG_FAILED": 503, "BAD_REQUEST": 400}
HTML_ROUTES = ("/", "/task/<id>", "/static/app.js", "/static/style.css", "/api/overview", "/api/tasks", "/api/graphs",
               "/api/task/<id>", "/api/dead/<queue>", "POST /api/queues/<name>/pause|resume|purge|requeue-dead",
               "POST /api/task/<id>/revoke|terminate|retry", "/worker/<hostname>",
               "POST /api/workers/<hostname>/shutdown|pool-grow|pool-shrink", "POST /api/rates/task|queue/<name>?limit=")


def _plural(n: int, text: str) -> str:
    return text.format(n=n, s="" if n == 1 else "s")


def _int(query: dict, key: str, default: int, top: int) -> int:
    try:
        v = int(query.get(key, [default])[0])
    except ValueError:
        return default
    return max(1, min(top, v))


def _queue_page(query: dict) -> tuple[str, int, int]:
    """(name filter, offset, limit) of the page's queue list: ?q=&offset=&limit=."""
    match = (query.get("q") or [""])[0].strip()
    try:
        offset = max(0, int(query.get("offset", ["0"])[0]))
    except ValueError:
        offset = 0
    return match, offset, _int(query, "limit", web.QUEUES_SHOWN, web.QUEUES_MAX)


def _segments(scope) -> list[str]:
    """The path split on '/', each part percent-decoded on its own (a task id may hold a '/')."""
    raw = scope.get("raw_path")
    text = raw.decode("latin-1") if raw else quote(scope["path"])
    return [unquote(p) for p in text.split("?", 1)[0].split("/")[1:]]


def _html(status: int, text: str):
    return status, web.HTML_CONTENT_TYPE, text.encode()


# Sent with every response: the page loads only its own script and style, may not be framed
# (clickjacking the buttons), and no response is sniffed into another type.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" on the page's
    # own form POSTs (the Fetch standard's rule), which App.refusal must refuse; same-origin
    # still tells no other site anything
    (b"referrer-policy", b"same-origin"),
]
# Read by machines that address brokerd by whatever name or IP reaches it (Prometheus, kubelet
# probes, KEDA's metrics-api scaler through a Service name): not checked against the Host
# allow-list.  They change nothing and show no message or task data.
MACHINE_ROUTES = frozenset(("/metrics", "/api/queues", "/healthz", "/readyz", "/ready/leader"))


def _host_port(text: str, default_port: int | None):
    """``"Name:8080"`` -> ("name", 8080); ``"[::1]:80"`` -> ("[::1]", 80); no port -> default_port.
    None when it does not parse."""
    text = text.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[: end + 1], text[end + 1:]
    elif text.count(":") == 1:
        name, rest = text.split(":")
        rest = ":" + rest
    elif ":" in text:  # a bare IPv6 address
        name, rest = "[" + text + "]", ""
    else:
        name, rest = text, ""
    if not name:
        return None
    if not rest:
        return name, default_port
    if not rest.startswith(":") or not rest[1:].isdigit():
        return None
    return name, int(rest[1:])


def allowed_hosts(bound: str, port: int, extra: str = "") -> set:
    """The (host, port) pairs the page answers to: the bound address, 127.0.0.1, localhost and
    [::1] on the HTTP port, plus ``http_allowed_hosts`` (comma-separated, "name" for any port or
    "name:port").  A port of None matches any port."""
    out = {(h, port) for h in ("127.0.0.1", "localhost", "[::1]")}
    if bound not in ("0.0.0.0", "::"):  # a wildcard is not a name anyone browses to
        out.add((f"[{bound}]" if ":" in bound else bound.lower(), port))
    for entry in extra.split(","):
        if entry.strip():
            hp = _host_port(entry, None)
            if hp is not None:
                out.add(hp)
    return out


class App:
    """The ASGI application: ``App(server, port)``, where ``server`` is a ``broker.runtime.server.Server``
    and ``port`` the HTTP port it listens on (for the Host allow-list)."""

    def __init__(self, server, port: int | None = None, run_sync=None, sleep=None):
        self.server = server
        self.web = web.Web(server)
        cfg = getattr(server, "config", None)
        # With users (server.users): the logins (broker.web.login).  ``run_sync`` runs scrypt off
        # the event loop and ``sleep`` waits out the auth throttle (trio's, passed in by
        # Server.serve: this module imports no trio); without them both happen inline / not at all.
        self.sessions = login.Sessions()
        self.bearers = login.BearerCache()
        self.run_sync, self.sleep = run_sync, sleep
        self.secure = bool(getattr(cfg, "tls_cert", ""))  # cookies get Secure under HTTPS
        self.open_metrics = bool(getattr(cfg, "http_open_metrics", False))
        self.hosts = allowed_hosts(getattr(cfg, "host", "127.0.0.1"), port if port is not None else getattr(cfg, "http_port", 0),
                                   getattr(cfg, "http_allowed_hosts", ""))

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        hp = _host_port(host, 80)
        return hp is not None and (hp in self.hosts or (hp[0], None) in self.hosts)

    def refusal(self, headers: dict, path: str, method: str):
        """Why this browser request may not run (DNS rebinding, cross-site, sandboxed frame), or None.

        The Host must be one of ``self.hosts``: a rebinding attacker's page has its own name in
        Host.  An Origin, when sent, must be "null"-free and one of those hosts: a sandboxed
        iframe or a data: URL sends "null", another site its own origin."""
        if path in MACHINE_ROUTES and method in ("GET", "HEAD"):
            return None
        host = headers.get("host")
        if not self.host_allowed(host):
            return (f"Host {host!r} is not an address of this brokerd (allowed: the bound address, 127.0.0.1, "
                    "localhost, [::1]); if it is a real name of this broker, add it to http_allowed_hosts "
                    "(BROKERD_HTTP_ALLOWED_HOSTS). Refused to stop DNS rebinding")
        origin = headers.get("origin")
        if origin is not None:
            if origin.strip().lower() == "null":
                return "requests with Origin: null (sandboxed frames, data: and file: pages) are refused"
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not self.host_allowed(parts.netloc):
                return f"cross-origin request from {origin} refused"
        return None

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":  # websocket: not served here
            await send({"type": "websocket.close", "code": 1003})
            return
        path = scope["path"]
        method = scope["method"]
        extra: list = []
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            why = self.refusal(headers, path, method)
            if why is not None:
                status, ctype, body = _json(403, {"error": "FORBIDDEN", "message": why})
            else:
                status, ctype, body, extra = await self._guarded(scope, receive, method, path, headers)
        except Exception:  # a bug costs this request, never the broker
            log.exception("http: %s %s failed", method, path)
            status, ctype, body = _json(500, {"error": "INTERNAL", "message": "internal error in brokerd; see its log"})
        head = [(b"content-type", ctype), (b"cache-control", b"no-store"), *SECURITY_HEADERS, *extra]
        if isinstance(body, (bytes, bytearray)):
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-length", str(len(body)).encode()), *head]})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
            return
        # a generator of text pieces (QUEUE_CHUNK): each is sent before the next is computed
        await send({"type": "http.response.start", "status": status, "headers": head})
        if method != "HEAD":
            try:
                for piece in body:
                    await send({"type": "http.response.body", "body": piece.encode(), "more_body": True})
            finally:
                body.close()
        await send({"type": "http.response.body", "body": b""})

    # -- logins (only when brokerd has users) ----------------------------------------------
    async def _guarded(self, scope, receive, method: str, path: str, headers: dict):
        """Who is asking, then ``_dispatch`` with what they may see; without users, everyone sees all."""
        users = getattr(self.server, "users", None)
        if not users:
            return await self._dispatch(scope, receive, method, path, headers, OPEN)
        if path == "/login":
            return await self._login(scope, receive, method, headers, users)
        if path == "/logout":
            return await self._logout(receive, method, headers)
        if path in ("/healthz", "/readyz", "/ready/leader") or path.startswith("/static/"):  # probes; no data in the assets
            return await self._dispatch(scope, receive, method, path, headers, OPEN)
        if path in ("/metrics", "/api/queues") and self.open_metrics and method in ("GET", "HEAD"):
            # http_open_metrics: Prometheus and KEDA scrape without a token, by explicit choice
            return await self._dispatch(scope, receive, method, path, headers, OPEN)
        access, how = await self._who(scope, headers, users)
        if how == "failed":
            return (*_json(401, {"error": "AUTH_FAILED", "message": "that user name and token are not known to this "
                                 "broker (Authorization: Bearer <user>:<token>)"}), [(b"www-authenticate", b'Bearer realm="brokerd"')])
        if access is None:
            if method in ("GET", "HEAD") and (path == "/" or path.startswith(("/task/", "/worker/"))):
                return 303, b"text/plain; charset=utf-8", b"log in first: /login\n", [(b"location", b"/login")]
            return (*_json(401, {"error": "AUTH_REQUIRED", "message": "this broker has users: log in at /login, or send "
                                 "Authorization: Bearer <user>:<token>"}), [(b"www-authenticate", b'Bearer realm="brokerd"')])
        if how == "session" and method not in ("GET", "HEAD"):
            # a browser's cookie rides along on any request it makes: a POST must also prove it came
            # from our page, by this session's CSRF token (header from app.js, or the form's field)
            sent = headers.get(login.CSRF_HEADER)
            if sent is None:
                form = await _read_form(receive, login.ACTION_BODY_MAX)
                sent = (form or {}).get(login.CSRF_FIELD, [None])[0]
            if not login.same(sent, access.csrf):
                return (*_json(403, {"error": "CSRF_FAILED", "message": "this request does not carry the page's CSRF token "
                                     "for your session (X-CSRF-Token header or csrf form field); reload the page"}), [])
        return await self._dispatch(scope, receive, method, path, headers, access)

    async def _who(self, scope, headers: dict, users):
        """(Access, "bearer" | "session") of this request, (None, "failed") for a wrong bearer
        token (after the throttle's delay), or (None, None) when it carries no login."""
        now = time.monotonic()
        bearer = login.parse_bearer(headers.get("authorization"))
        if bearer is not None:
            name, token = bearer
            user = None
            hit = self.bearers.get(name, token, now) if name else None
            if hit is not None:
                user = users.by_name.get(hit)
            elif name:
                user = await self._authenticate(users, name, token)
                if user is not None:
                    self.bearers.put(name, token, now)
            if user is None:
                await self._failed(scope)
                return None, "failed"
            return login.Access.of(user), "bearer"
        s = self.sessions.get(login.cookie(headers, login.SESSION_COOKIE), now)
        user = users.by_name.get(s.user) if s is not None else None
        if user is None:
            return None, None
        return login.Access.of(user, s.csrf), "session"

    async def _authenticate(self, users, name: str, token: str):
        if self.run_sync is not None:
            return await self.run_sync(users.authenticate, name, token)  # scrypt: off the loop
        return users.authenticate(name, token)

    async def _failed(self, scope) -> None:
        """A failed login: wait the auth throttle's delay for this address (as the protocol does)."""
        address = (scope.get("client") or ("?",))[0]
        delay = self.server.auth_throttle.failed(address, time.monotonic())
        log.warning("http: login failed from %s (answer delayed %.1fs)", address, delay)
        if self.sleep is not None:
            await self.sleep(min(delay, self.server.config.handshake_timeout))

    async def _login(self, scope, receive, method: str, headers: dict, users):
        """GET: the form (with a fresh login CSRF value, also set as a cookie: double submit).
        POST: check it, then a new session and its cookie, and back to the page."""
        if method in ("GET", "HEAD"):
            value = login.new_secret()
            return (*_html(200, web.login_page(login_csrf=value)),
                    [(b"set-cookie", login.set_cookie(login.LOGIN_COOKIE, value, secure=self.secure))])
        if method != "POST":
            return (*_json(405, {"error": "METHOD_NOT_ALLOWED", "message": f"/login answers GET and POST, not {method}"}),
                    [(b"allow", b"GET, HEAD, POST")])
        form = await _read_form(receive, login.LOGIN_BODY_MAX)
        if form is None:
            return (*_json(413, {"error": "TOO_LARGE", "message": f"a login form is at most {login.LOGIN_BODY_MAX} bytes"}), [])
        expected = login.cookie(headers, login.LOGIN_COOKIE)
        if not login.same(form.get(login.CSRF_FIELD, [None])[0], expected):
            return (*_json(403, {"error": "CSRF_FAILED", "message": "the login form's CSRF value is missing or not this "
                                 "browser's; open /login again"}), [])
        name = (form.get("user") or [""])[0].strip()
        token = (form.get("token") or [""])[0].strip()
        user = await self._authenticate(users, name, token) if name and token else None
        address = (scope.get("client") or ("?",))[0]
        if user is None:
            await self._failed(scope)  # the token is never echoed back, nor logged
            return (*_html(401, web.login_page("that user name and token are not known to this broker", expected)), [])
        self.server.auth_throttle.succeeded(address)
        session = self.sessions.new(user.name, time.monotonic())
        log.info("http: %s logged in from %s", user.name, address)
        return (303, b"text/plain; charset=utf-8", b"logged in\n",
                [(b"location", b"/"), (b"set-cookie", login.set_cookie(login.SESSION_COOKIE, session.id, secure=self.secure)),
                 (b"set-cookie", login.set_cookie(login.LOGIN_COOKIE, "", secure=self.secure, max_age=0))])

    async def _logout(self, receive, method: str, headers: dict):
        if method != "POST":
            return (*_json(405, {"error": "METHOD_NOT_ALLOWED", "message": f"/logout answers POST only, not {method}"}),
                    [(b"allow", b"POST")])
        sid = login.cookie(headers, login.SESSION_COOKIE)
        s = self.sessions.get(sid, time.monotonic())
        if s is not None:
            sent = headers.get(login.CSRF_HEADER)
            if sent is None:
                sent = ((await _read_form(receive, login.ACTION_BODY_MAX)) or {}).get(login.CSRF_FIELD, [None])[0]
            if not login.same(sent, s.csrf):
                return (*_json(403, {"error": "CSRF_FAILED", "message": "log out from the page's own button"}), [])
            self.sessions.drop(sid)
        return (303, b"text/plain; charset=utf-8", b"logged out\n",
                [(b"location", b"/login"), (b"set-cookie", login.set_cookie(login.SESSION_COOKIE, "", secure=self.secure, max_age=0))])

    async def _dispatch(self, scope, receive, method: str, path: str, headers: dict, access=OPEN):
        self.web.rates.sample(self.server.state, time.time())  # the sparklines' history (at most 1/s)
        handler = ROUTES.get(path)
        if handler is not None:
            if method not in ("GET", "HEAD"):
                return (*_json(405, {"error": "METHOD_NOT_ALLOWED", "message": f"{path} answers GET only, not {method}"}),
                        [(b"allow", b"GET, HEAD")])
            return (*handler(self.server, access), [])
        seg = _segments(scope)
        # actions: POST /api/queues/<name>/<action>
        if len(seg) == 4 and seg[:2] == ["api", "queues"] and seg[3] in ACTIONS and seg[2]:
            if method != "POST":
                return (*_json(405, {"error": "METHOD_NOT_ALLOWED", "message": f"{path} answers POST only, not {method}"}),
                        [(b"allow", b"POST")])
            if not access.manages(seg[2]):
                return (*_refused(access, seg[3], "manage", seg[2]), [])
            return await self._act(receive, headers, seg[2], seg[3])
        # task actions: POST /api/task/<id>/revoke|terminate|retry (broker.web.actions)
        if len(seg) == 4 and seg[:2] == ["api", "task"] and seg[2] and seg[3] in actions.TASK_ACTIONS:
            if method != "POST":
                return (*_json(405, {"error": "METHOD_NOT_ALLOWED", "message": f"{path} answers POST only, not {method}"}),
                        [(b"allow", b"POST")])
            return await self._task_act(headers, access, seg[2], seg[3])
        # worker controls: POST /api/workers/<hostname>/shutdown|pool-grow|pool-shrink
        if len(seg) == 4 and seg[:2] == ["api", "workers"] and seg[2] and seg[3] in actions.WORKER_ACTIONS:
            if method != "POST":
                return (*_json(405, {"error": "METHOD_NOT_ALLOWED", "message": f"{path} answers POST only, not {method}"}),
                        [(b"allow", b"POST")])
            if not access.workers:
                return (*_refused(access, "control workers", "control", None), [])
            return await self._worker_act(headers, seg[2], seg[3])
        # rate limits from the page: POST /api/rates/task|queue/<name>?limit=10/s (as RATE_LIMIT, "control")
        if len(seg) == 4 and seg[:2] == ["api", "rates"] and seg[2] in ("task", "queue") and seg[3]:
            if method != "POST":
                return (*_json(405, {"error": "METHOD_NOT_ALLOWED", "message": f"{path} answers POST only, not {method}"}),
                        [(b"allow", b"POST")])
            if not access.workers:
                return (*_refused(access, "set rate limits", "control", None), [])
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            limit = (query.get("limit") or [""])[0].strip() or None
            return await self._rate_act(headers, seg[2], seg[3], limit)
        read = self._read_route(seg, access)
        if read is None:
            return (*_json(404, {
                "error": "NOT_FOUND",
                "message": f"no endpoint {path}; brokerd serves {', '.join(ROUTES)}, {', '.join(HTML_ROUTES)}",
            }), [])
        if method not in ("GET", "HEAD"):
            return (*_json(405, {"error": "METHOD_NOT_ALLOWED", "message": f"{path} answers GET only, not {method}"}),
                    [(b"allow", b"GET, HEAD")])
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return (*read(query, time.time()), [])

    def _read_route(self, seg: list, access=OPEN):
        """The handler ``(query, now) -> (status, ctype, body)`` of a read-only web route, or None."""
        w = self.web
        n = len(seg)
        if seg == [""]:
            return lambda q, now: _html(200, w.page(now, *_queue_page(q)[:2], access=access))
        tasks_route = ((n == 2 and seg[0] == "task" and seg[1]) or seg == ["api", "tasks"] or seg == ["api", "graphs"]
                       or (n == 3 and seg[:2] == ["api", "task"] and seg[2]))
        if tasks_route and not access.tasks:  # task arguments and results: results-read
            return lambda q, now: _refused(access, "read tasks", "results-read", None)
        if n == 3 and seg[:2] == ["api", "dead"] and seg[2] and not access.manages(seg[2]):
            return lambda q, now: _refused(access, "read the dead letters of", "manage", seg[2])
        if n == 2 and seg[0] == "worker" and seg[1]:
            if not access.workers:
                return lambda q, now: _refused(access, "see workers", "control", None)
            host = seg[1]
            return lambda q, now: _html(200, w.worker_page(host, now, access))
        if n == 2 and seg[0] == "task" and seg[1]:
            tid = seg[1]
            return lambda q, now: _html(200, w.task_page(tid, now, access))
        if n == 2 and seg[0] == "static":
            found = web.asset("/static/" + seg[1])
            if found is None:
                return None
            return lambda q, now: (200, found[1], found[0])
        if n == 2 and seg == ["api", "overview"]:
            def overview(q, now):
                d = w.overview(now, *_queue_page(q), access=access)
                if q.get("html"):
                    d["html"] = w.sections(d, access)
                return _json(200, d)
            return overview
        if n == 2 and seg == ["api", "tasks"]:
            def tasks(q, now):
                def text(key):
                    return (q.get(key) or [""])[0].strip()
                try:
                    offset = max(0, int(text("offset") or 0))
                except ValueError:
                    offset = 0
                try:
                    d = w.tasks(now, offset=offset, limit=_int(q, "limit", web.TASKS_DEFAULT, web.TASKS_MAX),
                                sort=text("sort") or "received", order=text("order").lower() or "desc",
                                state_filter=text("state").upper() or None, name=text("name") or None,
                                search=text("q") or None)
                except BrokerError as exc:
                    return _json(ERROR_STATUS.get(exc.code, 400), {"error": exc.code, "message": exc.message})
                if q.get("html"):
                    d["html"] = {"tasks": web.render_tasks(d)}
                return _json(200, d)
            return tasks
        if n == 2 and seg == ["api", "graphs"]:
            def graphs(q, now):
                d = {"graphs": w.graphs(now)}
                if q.get("html"):
                    d["html"] = {"graphs": web.render_graphs(d["graphs"])}
                return _json(200, d)
            return graphs
        if n == 3 and seg[:2] == ["api", "task"] and seg[2]:
            tid = seg[2]

            def task(q, now):
                try:
                    info = w.task(tid, now)
                except BrokerError as exc:
                    return _json(ERROR_STATUS.get(exc.code, 400), {"error": exc.code, "message": exc.message})
                d = {"task": info}
                if q.get("html"):
                    d["html"] = {"task": web.render_task(tid, info, access)}
                if info is None:
                    d.update(error="NOT_FOUND", message=f"brokerd knows nothing of task {tid!r}")
                return _json(200 if info is not None else 404, d)
            return task
        if n == 3 and seg[:2] == ["api", "dead"] and seg[2]:
            qname = seg[2]

            def dead(q, now):
                try:
                    return _json(200, w.dead(qname, _int(q, "n", web.DEAD_SHOWN, web.DEAD_MAX), now))
                except BrokerError as exc:
                    return _json(ERROR_STATUS.get(exc.code, 400), {"error": exc.code, "message": exc.message})
            return dead
        return None

    async def _act(self, receive, headers: dict, name: str, action: str):
        """Apply PAUSE/RESUME/PURGE/REQUEUE-DEAD as the admin protocol does: the same state
        method, then the server's flush, then (log on) the reply waits until the change is durable."""
        # The body (a form's, or none) is not used and not read: a client trickling one cannot
        # hold the request open, and hypercorn closes a connection whose body was left unread.
        # Host and Origin were checked in App.refusal: another site's page (or a rebinding one) may
        # not purge our queues through the visitor's browser
        server = self.server
        command, fn = ACTIONS[action]
        try:
            try:
                message = fn(server.state, name, time.time())
            finally:
                server.flush()
        except BrokerError as exc:
            return (*_json(ERROR_STATUS.get(exc.code, 400), {"error": exc.code, "message": exc.message}), [])
        if server.wal is not None:  # like an admin line: reply once the change is on disk
            await server.wal.wait_durable(server.state.last_lsn)
        log.info("http: %s %s (from the web page)", command, name)
        if "text/html" in headers.get("accept", "") and "application/json" not in headers.get("accept", ""):
            # a plain form POST (no JavaScript): back to the page
            return (303, b"text/plain; charset=utf-8", (message + "\n").encode(), [(b"location", b"/")])
        return (*_json(200, {"ok": True, "queue": name, "action": action, "message": message}), [])


    async def _task_act(self, headers: dict, access, task_id: str, action: str):
        """Revoke / terminate / retry one task (``broker.web.actions``), then the server's flush,
        and (log on) the reply once the change is durable, like ``_act``.  Host, Origin and (for a
        session) CSRF were checked before; the grant is checked here, where the queue is known."""
        server = self.server
        now = time.time()
        try:
            plan = actions.plan(self.web, access, task_id, action, now)  # BrokerError, or a refusal
            if plan.refused is not None:
                return (*_refused(access, *plan.refused), [])
            try:
                answer = plan.run(server.state, now)
            finally:
                server.flush()
        except BrokerError as exc:
            return (*_json(ERROR_STATUS.get(exc.code, 400), {"error": exc.code, "message": exc.message}), [])
        if server.wal is not None:
            await server.wal.wait_durable(server.state.last_lsn)
        log.info("http: %s task %s (from the web page)", action, task_id)
        if "text/html" in headers.get("accept", "") and "application/json" not in headers.get("accept", ""):
            return (303, b"text/plain; charset=utf-8", (answer["message"] + "\n").encode(),
                    [(b"location", answer["next"].encode())])
        return (*_json(200, {"ok": True, "task": task_id, "action": action, **answer}), [])


    async def _rate_act(self, headers: dict, kind: str, name: str, limit):
        """The page's "set rate": RATE_LIMIT (protocol.md §5.39) on the state, logged; the answer once
        durable.  Host, Origin and (for a session) CSRF were checked before, the grant by the caller."""
        server = self.server
        try:
            try:
                out = server.state.rate_limit(name, limit, kind, time.time())
            finally:
                server.flush()
        except BrokerError as exc:
            return (*_json(ERROR_STATUS.get(exc.code, 400), {"error": exc.code, "message": exc.message}), [])
        if server.wal is not None:
            await server.wal.wait_durable(server.state.last_lsn)
        message = f"rate limit of {kind} {name} is {out['limit'] or 'none'} (was {out['previous'] or 'none'})"
        log.info("http: %s (from the web page)", message)
        if "text/html" in headers.get("accept", "") and "application/json" not in headers.get("accept", ""):
            return (303, b"text/plain; charset=utf-8", (message + "\n").encode(), [(b"location", b"/#limits")])
        return (*_json(200, {"ok": True, **web.plain(out), "message": message, "next": "/#limits"}), [])

    async def _worker_act(self, headers: dict, hostname: str, action: str):
        """Relay one CONTROL to the worker and wait (CONTROL_WAIT at most) for its reply."""
        server = self.server
        state = server.state
        try:
            try:
                req, command = actions.control_start(state, hostname, action, time.time())
            finally:
                server.flush()  # the CONTROL frame goes out now
        except BrokerError as exc:
            return (*_json(ERROR_STATUS.get(exc.code, 400), {"error": exc.code, "message": exc.message}), [])
        deadline = time.monotonic() + actions.CONTROL_WAIT
        # the reply arrives through the worker's connection into req.replies; the state drops the
        # request at its deadline (CONTROL_WAIT), so this loop is bounded twice
        while req is not None and req.expected and time.monotonic() < deadline and self.sleep is not None:
            await self.sleep(0.02)
        replies = dict(req.replies) if req is not None else {}
        reply = replies.get(hostname)
        log.info("http: %s to worker %s (from the web page): %r", command, hostname, reply)
        if reply is None:
            message = f"worker {hostname} did not answer {command} within {actions.CONTROL_WAIT:g}s"
        elif isinstance(reply, dict) and "error" in reply:
            message = f"worker {hostname}: {reply['error']}"
        else:
            message = f"worker {hostname}: {reply.get('ok') if isinstance(reply, dict) else reply}"
        nxt = actions.worker_url(hostname)
        if "text/html" in headers.get("accept", "") and "application/json" not in headers.get("accept", ""):
            return (303, b"text/plain; charset=utf-8", (message + "\n").encode(), [(b"location", nxt.encode())])
        return (*_json(200 if reply is not None else 504, {"ok": reply is not None, "worker": hostname, "action": action,
                       "reply": web.plain(reply), "message": message, "next": nxt}), [])


def _refused(access, what: str, kind: str, queue: str | None):
    """403 ACCESS_REFUSED naming the grant the user lacks (the protocol's sentence)."""
    on = f" queue {queue!r}" if queue is not None else ""
    grant_on = f" on queue {queue!r}" if queue is not None else ""
    return _json(403, {"error": "ACCESS_REFUSED",
                       "message": f"user {access.user!r} may not {what}{on}: it needs the {kind!r} grant{grant_on}"})


async def _read_form(receive, limit: int):
    """A urlencoded request body as parse_qs's dict; None when it is over ``limit`` bytes.
    READ_TIMEOUT (hypercorn's) bounds a body that stops arriving."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return {}
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            break
    return parse_qs(body.decode("latin-1"))


# -- listening ---------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """Bind the HTTP port now (before any task starts), so a busy port fails
    brokerd's start like the protocol port does.  ``OSError.filename`` names
    the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, f"{host}:{port} (--http-port)") from None
    return sock


async def serve(server, sock: socket.socket, *, task_status, run_sync=None, sleep=None) -> None:
    """Serve ``App(server)`` on ``sock`` (from ``bind``) until cancelled; ``run_sync`` and ``sleep``
    (trio's) let the logins run scrypt off the loop and wait out the auth throttle."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    cfg = HypercornConfig()
    port = sock.getsockname()[1]
    cfg.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
    cfg.accesslog = None
    # hypercorn's own messages ("Running on ... CTRL + C") are noise here; its
    # warnings and errors reach brokerd's log.
    hlog = logging.getLogger("brokerd.http.hypercorn")
    hlog.setLevel(logging.WARNING)
    cfg.errorlog = hlog
    # hypercorn's idle timer runs from accept until a request's head is complete (and again
    # between requests), so KEEP_ALIVE_TIMEOUT also bounds a partial request line or head.
    cfg.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    cfg.read_timeout = READ_TIMEOUT  # a request body that stops arriving
    cfg.h11_max_incomplete_size = MAX_REQUEST_HEAD
    cfg.include_server_header = False
    tls = server.config
    if tls.tls_cert:  # HTTPS with the protocol port's certificate (no client certificate asked)
        cfg.certfile, cfg.keyfile = tls.tls_cert, tls.tls_key
        cfg.ssl_handshake_timeout = tls.handshake_timeout
    await hypercorn_serve(App(server, port, run_sync, sleep), cfg, task_status=task_status, mode="asgi")
