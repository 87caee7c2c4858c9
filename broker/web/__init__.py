"""brokerd's live web page: the part of Flower people use, served by ``broker.runtime.http``.

No framework and no build step: Python renders every section as HTML (all
user data goes through ``esc``), and ``app.js`` polls the JSON endpoints once a
second with ``?html=1``, which adds the same sections rendered again, and
swaps them in.  One renderer, so the page without JavaScript and the live page
look the same, and escaping happens in one place.

    GET  /                           the page: queues, workers, recent tasks, dead letters, schedules
    GET  /task/<id>                  one task: args, result or traceback, timeline, parent and children
    GET  /static/app.js, style.css   the assets (shipped in the package: broker/web/*)
    GET  /api/overview               queues (depth, counters, rate history), workers, dead letters, schedules
    GET  /api/tasks?offset=&limit=&sort=&order=&state=&name=&q=
                                     one page of the kept task history (broker.state.events.tasks_page):
                                     sorted by received/started/finished/runtime/state/name/worker,
                                     filtered by state and name, searched (q) in name, args, result, worker
    GET  /api/graphs                 the last hour in 10 s points: succeeded/s, failed/s, runtime p50/p95 of
                                     the busiest task names, queue depth (broker.state.graphs)
    GET  /api/task/<id>              what brokerd knows of one task (404 when nothing)
    GET  /api/dead/<queue>?n=        the first n dead letters of a queue
    POST /api/queues/<name>/pause|resume|purge|requeue-dead
                                     the admin protocol's PAUSE, RESUME, PURGE, REQUEUE-DEAD

Rates: ``Rates`` samples every queue's published and acked counters at most
once a second, whenever an HTTP request arrives (the open page polls every
second; a Prometheus scrape samples too), and keeps three minutes.  A rate is
the counters' difference between two instants, interpolated between samples,
so a stretch nobody watched shows as its average rather than as zero.

Task events, history and the worker registry come from ``broker.state.events``
(``tasks_recent``, ``task_info``, ``workers_list``); stored results fill in tasks
that sent no events.  Those three are looked up with ``getattr``, so the page still
works on a state without them.  Queues, dead letters and results are read as frozen
views (``broker.handlers.views``), never through the state's live structures.

No trio and no clock here: ``now`` is passed in, and ``broker.runtime.http`` does the I/O.
"""

from __future__ import annotations

import bisect
import heapq
import html
import json
from collections import deque
from pathlib import Path
from urllib.parse import quote, urlencode

import cbor2

from broker import __version__
from broker.errors import BadRequest
from broker.handlers import views
from broker.web.login import OPEN, Access

HERE = Path(__file__).resolve().parent
ASSETS = {
    "/static/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", b"text/css; charset=utf-8"),
}
HTML_CONTENT_TYPE = b"text/html; charset=utf-8"

RATE_SAMPLE_EVERY = 1.0  # seconds between samples of the counters (at most)
RATE_BUCKET = 3.0  # seconds per sparkline bar
RATE_BUCKETS = 60  # 60 x 3 s: the last three minutes
RATE_KEEP = RATE_BUCKET * RATE_BUCKETS + 10.0
# Queues: the page and /api/overview show one page of queues, largest backlog (ready +
# in flight) first, with a name filter and offset, never all of them: with 50,000 queues
# rendering all took 2.4 s of the event loop on every poll.  Picking a page costs one pass
# over the queues (heapq.nlargest, ~10 ms at 50,000); only the page's queues are rendered.
QUEUES_SHOWN = 50  # queues on one page
QUEUES_MAX = 500  # the most one request may ask for (limit=)
# Broker-wide totals and the names of custom dead-letter queues need a pass over every
# queue (~15 ms at 50,000): computed at most once per this many seconds and shared.
TOTALS_TTL = 1.0
# The sparklines: up to this many queues, every queue's counters are sampled; beyond, only
# the queues shown on a page in the last RATE_KEEP seconds (at most RATE_WATCH_MAX of them):
# keeping three minutes of samples of 50,000 queues would cost ~1 GB.
RATE_ALL_QUEUES = 1000
RATE_WATCH_MAX = 2000
TASKS_DEFAULT = 50
TASKS_MAX = 1000  # rows of one page (broker.state.events.TASKS_PAGE_MAX)
TASK_SORT_LABELS = {"received": "received", "started": "started", "finished": "when", "runtime": "runtime ms",
                    "state": "state", "name": "name", "worker": "worker"}
GRAPH_NAMES = 5  # task names with a runtime line in the graph (the busiest over the hour)
DEAD_SHOWN = 10  # dead letters per queue on the overview
DEAD_MAX = 1000
TEXT_MAX = 300  # characters of a value shown in a table cell (the task page shows all of it)
TASK_STATE_NAMES = ("PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED", "REJECTED")


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def short(value, limit: int = TEXT_MAX) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plain(value):
    """A value the JSON encoder takes (bytes as text or hex, anything odd as its repr)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return "0x" + value.hex()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return repr(value)


# -- rates -------------------------------------------------------------------------------
class Rates:
    """Per-queue (published, acked) counters sampled at most once a second, for five minutes."""

    def __init__(self):
        self.times: deque = deque()
        self.samples: deque = deque()  # {queue: (published, acked)}, one per time
        self.watched: dict = {}  # queue name -> when a page last showed it (see RATE_ALL_QUEUES)

    def watch(self, names, now: float) -> None:
        w = self.watched
        for name in names:
            w.pop(name, None)
            w[name] = now  # insertion order = least recently shown first
        while len(w) > RATE_WATCH_MAX or (w and now - next(iter(w.values())) > RATE_KEEP):
            del w[next(iter(w))]

    def sample(self, state, now: float) -> None:
        if self.times and now - self.times[-1] < RATE_SAMPLE_EVERY:
            return
        self.times.append(now)
        if views.queue_count(state) <= RATE_ALL_QUEUES:
            self.samples.append(views.queue_counters(state))
        else:
            self.samples.append(views.queue_counters(state, self.watched))
        while self.times and now - self.times[0] > RATE_KEEP:
            self.times.popleft()
            self.samples.popleft()

    def _value(self, times: list, name: str, t: float):
        """Counter pair of ``name`` at time t (linear between samples); None before the first."""
        j = bisect.bisect_right(times, t)
        if j == 0:
            return None
        a = self.samples[j - 1].get(name, (0, 0))
        if j == len(times):
            return a
        b = self.samples[j].get(name, (0, 0))
        t0, t1 = times[j - 1], times[j]
        f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
        return (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f)

    def series(self, name: str, now: float) -> dict:
        """{"published": [per-second rate or None, ...], "acked": [...]}, oldest bar first."""
        times = list(self.times)
        pub: list = []
        ack: list = []
        prev = self._value(times, name, now - RATE_BUCKET * RATE_BUCKETS)
        for i in range(1, RATE_BUCKETS + 1):
            cur = self._value(times, name, now - RATE_BUCKET * (RATE_BUCKETS - i))
            if prev is None or cur is None:
                pub.append(None)
                ack.append(None)
            else:
                pub.append(round(max(0.0, cur[0] - prev[0]) / RATE_BUCKET, 2))
                ack.append(round(max(0.0, cur[1] - prev[1]) / RATE_BUCKET, 2))
            prev = cur
        return {"bucket_s": RATE_BUCKET, "published": pub, "acked": ack}


def sparkline(series: dict) -> str:
    """Inline SVG: published (line) and acked (dashed) per second over the buckets."""
    pub, ack = series["published"], series["acked"]
    known = [v for v in pub + ack if v is not None]
    top = max(known) if known else 0.0
    w, h, n = 150, 28, len(pub)

    def line(vals, cls):
        pts = []
        for i, v in enumerate(vals):
            if v is None:
                continue
            y = h - 2 - (v / top * (h - 4) if top else 0)
            pts.append(f"{i * (w - 1) / max(1, n - 1):.1f},{y:.1f}")
        return f'<polyline class="{cls}" points="{" ".join(pts)}"/>' if pts else ""

    last_p = next((v for v in reversed(pub) if v is not None), None)
    last_a = next((v for v in reversed(ack) if v is not None), None)
    title = (f"last {len(pub) * series['bucket_s'] / 60:g} min, {series['bucket_s']:g} s bars; max {top:g}/s; now published "
             f"{last_p if last_p is not None else '-'}/s, acked {last_a if last_a is not None else '-'}/s")
    return (f'<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f"<title>{esc(title)}</title>{line(pub, 'pub')}{line(ack, 'ack')}</svg>"
            f'<span class="rate">{esc(last_p if last_p is not None else "-")}/s</span>')


# -- data --------------------------------------------------------------------------------
def _dead_letter(msg, now: float) -> dict:
    headers = plain(msg.headers or {})
    d = {"id": msg.id, "attempts": msg.attempts, "age_s": round(max(0.0, now - msg.ts), 3), "bytes": len(msg.body),
         "reason": headers.get("x-dead-reason"), "from": headers.get("x-dead-from"), "task": None, "args": None,
         "body": None}
    body = msg.body
    env = None
    if len(body) <= 65536:
        try:
            env = cbor2.loads(body)
        except Exception:
            env = None
    if isinstance(env, dict) and isinstance(env.get("task"), str):
        d["task"] = env["task"]
        d["args"] = short(plain(env.get("args")), 200)
    else:
        d["body"] = short(plain(bytes(body)), 200)
    return d


class Web:
    """The page's data and rendering for one ``broker.runtime.server.Server``."""

    def __init__(self, server):
        self.server = server
        self.rates = Rates()
        self._totals: dict | None = None

    # ---- JSON ----
    def totals(self, now: float) -> dict:
        """Broker-wide sums and the custom dead-letter queue names, recomputed at most once per TOTALS_TTL."""
        cached = self._totals
        if cached is not None and 0 <= now - cached["at"] < TOTALS_TTL:
            return cached
        t = views.queue_totals(self.server.state)
        self._totals = {"at": now, "ready": t.ready, "delayed": t.delayed, "published": t.published, "acked": t.acked,
                        "custom_dl": t.custom_dead_letter_queues}
        return self._totals

    def queues(self, now: float, match: str = "", offset: int = 0, limit: int = QUEUES_SHOWN,
               access: Access = OPEN) -> tuple[list, dict]:
        """One page of queues, largest backlog first (then name), and ``{"total", "matched",
        "offset", "limit", "filter"}``; ``match`` keeps the names that contain it."""
        state = self.server.state
        total = views.queue_count(state)
        qs = views.queue_backlogs(state, match)
        if access.grant is not None:  # a user sees only the queues a grant of theirs covers
            qs = [q for q in qs if access.sees(q[1])]
            total = len(qs) if not match else sum(1 for n in views.queue_names(state) if access.sees(n))
        top = heapq.nlargest(offset + limit, qs, key=_backlog)[offset:]
        top.sort(key=lambda q: (-q[0], q[1]))
        custom_dl = self.totals(now)["custom_dl"]
        self.rates.watch([name for _, name in top], now)
        self.rates.sample(state, now)
        out = []
        for _, name in top:
            v = views.queue_view(state, name, now)  # no await since the backlogs: it still exists
            s, dl = v.stats, v.dead_letter_queue
            out.append({
                "name": name, "ready": s.ready, "inflight": s.inflight, "delayed": s.delayed, "dead": s.dead,
                "backlog": s.ready + s.inflight,
                "consumers": s.consumers, "paused": s.paused, "oldest_ready_age_s": round(s.oldest_ready_age, 3),
                "published": s.published, "delivered": s.delivered, "acked": s.acked, "nacked": s.nacked,
                "dead_lettered": s.dead_lettered, "dead_letter_queue": dl,
                "is_dead_letter_queue": dl is None or name in custom_dl,
                "rate": self.rates.series(name, now),
                "may_manage": access.manages(name),
            })
        return out, {"total": total, "matched": len(qs), "offset": offset, "limit": limit, "filter": match}

    def dead(self, name: str, n: int, now: float) -> dict:
        d = views.dead_letters(self.server.state, name, n, DEAD_MAX)  # BrokerError NOT_FOUND
        return {"queue": d.queue, "dead_letter_queue": d.dead_letter_queue, "total": d.total,
                "messages": [_dead_letter(m, now) for m in d.messages]}

    def workers(self, now: float):
        fn = getattr(self.server.state, "workers_list", None)
        return plain(fn(now)) if fn is not None else None

    def limits(self, now: float, access: Access = OPEN) -> list:
        """Rate limits and concurrency caps (issue 15) with the messages each holds back; a queue's
        only for users who see that queue."""
        fn = getattr(self.server.state, "rate_table", None)
        rows = plain(fn(now)) if fn is not None else []
        if access.grant is not None:
            rows = [r for r in rows if r["kind"] != "queue" or access.sees(r["name"])]
        return rows

    def tenants(self, access: Access = OPEN) -> list:
        """Queues in tenant turns with their busiest tenants (issue 15), those the user sees."""
        fn = getattr(self.server.state, "tenant_table", None)
        rows = plain(fn()) if fn is not None else []
        if access.grant is not None:
            rows = [r for r in rows if access.sees(r["queue"])]
        return rows

    def schedules(self) -> list:
        fn = getattr(self.server.state, "schedule_list", None)
        return plain(fn()) if fn is not None else []

    def overview(self, now: float, match: str = "", offset: int = 0, limit: int = QUEUES_SHOWN,
                 access: Access = OPEN) -> dict:
        state = self.server.state
        queues, page = self.queues(now, match, offset, limit, access)
        dead = {q["name"]: self.dead(q["name"], DEAD_SHOWN, now) for q in queues
                if q["dead"] and not q["is_dead_letter_queue"] and q["may_manage"]}
        t = self.totals(now)
        b = views.connection_counts(state)  # frozen; the per-queue sums come from the cached totals
        return {
            "broker": {"version": __version__, "uptime_s": round(now - self.server.started, 1),
                       "connections": b.connections, "consumers": b.consumers,
                       "ready": t["ready"], "inflight": b.inflight, "delayed": t["delayed"],
                       "published": t["published"], "acked": t["acked"], "queues": page["total"]},
            "queues": queues,
            "queues_page": page,
            "workers": self.workers(now) if access.workers else None,
            "dead": dead,
            "schedules": self.schedules() if access.schedules else [],
            "limits": self.limits(now, access),
            "tenants": self.tenants(access),
            "replication": self.replication(),
            "now": now,
        }

    def replication(self) -> dict | None:
        """Role, epoch, leader and each follower's durable lsn and lag (broker/runtime/roles.py)."""
        roles = getattr(self.server, "roles", None)
        if roles is None or self.server.wal is None:
            return None
        srv = self.server
        repl = srv.replication if srv.follower is None else None
        f = srv.follower
        return {"role": "fenced" if roles.fenced else roles.role, "epoch": roles.epoch,
                "leader": roles.leader_address, "lsn": roles.last_lsn(),
                "connected": getattr(f, "connected", None) if f is not None else None,
                "followers": repl.followers() if repl is not None else []}

    def tasks(self, now: float, *, offset: int = 0, limit: int = TASKS_DEFAULT, sort: str = "received",
              order: str = "desc", state_filter: str | None = None, name: str | None = None,
              search: str | None = None) -> dict:
        """One page of tasks (BadRequest names a bad sort, order or search): the kept histories,
        then, newest first and unfiltered by name or search, stored results of tasks that sent no
        events.  {"tasks", "total" (matching histories), "more" (a next page exists), and the query}."""
        state = self.server.state
        if order not in ("asc", "desc"):
            raise BadRequest(f"order is asc or desc (got {order[:20]!r})")
        total, rows = 0, []
        page = getattr(state, "tasks_page", None)
        if page is not None:
            total, rows = page(now, offset=offset, limit=limit, sort=sort, desc=order == "desc",
                               state=state_filter, name=name, search=search)
        more = offset + limit < total
        if not more and sort == "received" and order == "desc" and name is None and not search:
            # results carry no name, args or worker: only in the unfiltered newest-first list
            skip = max(0, offset - total)
            extra = views.results_without_events(state, now, state_filter, (), skip + limit + 1 - len(rows))[skip:]
            more = len(rows) + len(extra) > limit
            rows += [{"id": r.id, "name": None, "state": r.state, "args": None, "kwargs": None, "worker": None,
                      "runtime": None, "received": None, "started": None, "finished": r.updated, "result": r.value,
                      "exception": None} for r in extra]
        return {"tasks": [{k: plain(d.get(k)) for k in TASK_FIELDS} for d in rows[:limit]], "total": total,
                "more": more, "offset": offset, "limit": limit, "sort": sort, "order": order,
                "state": state_filter, "name": name, "q": search}

    def graphs(self, now: float) -> dict:
        g = getattr(self.server.state, "task_graphs", None)
        return g.series(now, GRAPH_NAMES) if g is not None else {}

    def task(self, task_id: str, now: float) -> dict | None:
        state = self.server.state
        info = None
        fn = getattr(state, "task_info", None)
        if fn is not None:
            info = fn(task_id, now)
        if info is None:
            r = views.result(state, task_id, now)
            if r is None:
                return None
            info = {"id": task_id, "state": r.state, "result": r.value, "meta": r.meta, "events": [], "children": []}
        return plain(info)

    # ---- HTML ----
    def page(self, now: float, match: str = "", offset: int = 0, access: Access = OPEN) -> str:
        ov = self.overview(now, match, offset, access=access)
        s = self.sections(ov, access)
        s["tasks"] = render_tasks(self.tasks(now)) if access.tasks else NO_TASKS
        s["graphs"] = render_graphs(self.graphs(now)) if access.tasks else ""
        options = "".join(f'<option value="{st}">{st}</option>' for st in TASK_STATE_NAMES)
        return PAGE.format(
            title="brokerd", version=esc(__version__), kind="overview", task_id="", account=render_account(access),
            body=f"""
<section id="replication"><h2>Replication</h2><div data-section="replication">{s["replication"]}</div></section>
<section id="queues"><h2>Queues</h2>
<form id="queue-filter" method="get" action="/">
  <label>name contains <input name="q" value="{esc(match)}" placeholder="queue name" size="30"></label>
  <input type="hidden" name="offset" value="0">
</form>
<div data-section="queues">{s["queues"]}</div></section>
<section id="workers"><h2>Workers</h2><div data-section="workers">{s["workers"]}</div></section>
<section id="graphs"><h2>Last hour</h2><div data-section="graphs">{s["graphs"] or NO_GRAPHS}</div></section>
<section id="tasks"><h2>Tasks</h2>
<form id="task-filter" method="get" action="/api/tasks">
  <label>state <select name="state"><option value="">any</option>{options}</select></label>
  <label>name <input name="name" placeholder="task name (exact)" size="30"></label>
  <label>search <input name="q" placeholder="name, args, result, worker…" size="30" maxlength="200"></label>
</form>
<div data-section="tasks">{s["tasks"]}</div></section>
<section id="dead"><h2>Dead letters</h2><div data-section="dead">{s["dead"]}</div></section>
<section id="schedules"><h2>Schedules</h2><div data-section="schedules">{s["schedules"]}</div></section>
<section id="limits"><h2>Rate limits and caps</h2><div data-section="limits">{s["limits"]}</div>
<h3>Tenants per queue</h3><div data-section="tenants">{s["tenants"]}</div></section>
""")

    def sections(self, ov: dict, access: Access = OPEN) -> dict:
        return {"queues": render_queues(ov["queues"], ov.get("queues_page"), access.csrf),
                "workers": render_workers(ov["workers"]),
                "dead": render_dead(ov["dead"], access.csrf), "schedules": render_schedules(ov["schedules"]),
                "limits": render_limits(ov.get("limits") or [], access.csrf if access.workers else False), "tenants": render_tenants(ov.get("tenants") or []), "summary": render_summary(ov["broker"]),
                "replication": render_replication(ov.get("replication"))}

    def worker_page(self, hostname: str, now: float, access: Access = OPEN) -> str:
        """One worker: pool, counts, heartbeat age, queues, and its controls (``control`` grant)."""
        w = next((x for x in (self.workers(now) or []) if x.get("hostname") == hostname), None)
        return PAGE.format(
            title=f"worker {esc(hostname)} · brokerd", version=esc(__version__), kind="worker", task_id="",
            account=render_account(access),
            body=f'<p><a href="/">&larr; overview</a></p><section id="worker"><div data-section="worker">'
                 f'{render_worker(hostname, w, access)}</div><p id="reply" class="reply"></p></section>')

    def task_page(self, task_id: str, now: float, access: Access = OPEN) -> str:
        info = self.task(task_id, now)
        return PAGE.format(
            title=f"task {esc(task_id)} · brokerd", version=esc(__version__), kind="task", task_id=esc(task_id),
            account=render_account(access),
            body=f'<p><a href="/">&larr; overview</a></p><section id="task"><div data-section="task">'
                 f"{render_task(task_id, info, access)}</div></section>")


# -- rendering ----------------------------------------------------------------------------
def _when(ts) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return f'<time data-ts="{ts:.3f}">{ts:.3f}</time>'


def _task_link(tid) -> str:
    if not tid:
        return ""
    return f'<a class="tid" href="/task/{esc(quote(str(tid), safe=""))}">{esc(tid)}</a>'


def render_summary(b: dict) -> str:
    return (f'brokerd {esc(b["version"])} · up {esc(b["uptime_s"])} s · {esc(b["connections"])} connections · '
            f'{esc(b["ready"])} ready · {esc(b["inflight"])} in flight · {esc(b["delayed"])} delayed')


def render_replication(r: dict | None) -> str:
    """The replication box: this brokerd's role and epoch, its leader, and on a leader each
    follower's durable lsn and lag."""
    if r is None:
        return '<p class="empty">no log, no replication</p>'
    head = (f'<p class="replication"><b>{esc(r["role"])}</b> · epoch {esc(r["epoch"])} · lsn {esc(r["lsn"])}'
            + (f' · leader {esc(r["leader"])}' if r["leader"] and r["role"] != "leader" else "")
            + (" · connected" if r.get("connected") else (" · not connected" if r["role"] == "follower" else ""))
            + "</p>")
    if r["role"] != "leader":
        return head
    if not r["followers"]:
        return head + '<p class="empty">no followers connected</p>'
    rows = "".join(
        f'<tr><td>{esc(f["address"])}</td><td>{esc(f["lsn"])}</td>'
        f'<td>{esc(f["lag_records"])}</td><td>{esc(f["lag_seconds"])}</td>'
        f'<td>{"yes" if f["in_sync"] else "no"}</td></tr>' for f in r["followers"])
    return (head + '<table class="followers"><thead><tr><th>follower</th><th>durable lsn</th><th>lag (records)</th>'
            f'<th>lag (s)</th><th>in sync</th></tr></thead><tbody>{rows}</tbody></table>')


def _action(queue: str, action: str, label: str, confirm: str = "", csrf: str = "") -> str:
    return _button(f"/api/queues/{quote(queue, safe='')}/{action}", label, confirm, csrf)


def _button(url: str, label: str, confirm: str = "", csrf: str = "") -> str:
    """A POST button in a plain form (works without JavaScript; app.js sends it by fetch)."""
    c = f' data-confirm="{esc(confirm)}"' if confirm else ""
    token = f'<input type="hidden" name="csrf" value="{esc(csrf)}">' if csrf else ""
    return (f'<form method="post" action="{esc(url)}" class="act">{token}'
            f'<button type="submit" data-action="{esc(url)}"{c}>{esc(label)}</button></form>')


def _pager(page: dict | None, shown: int) -> str:
    """"queues 1–50 of 50,000, largest backlog first" with previous/next links (plain links
    without JavaScript; app.js follows them in place, by data-offset)."""
    if not page:
        return ""
    first, matched, limit, match = page["offset"], page["matched"], page["limit"], page["filter"]
    what = f'{matched:,} queue{"" if matched == 1 else "s"}' + (f' matching “{esc(match)}”' if match else "")
    if matched > shown or first:
        text = f"queues {first + 1 if shown else 0:,}–{first + shown:,} of {what}, largest backlog first"
    else:
        text = f"{what}, largest backlog first"
    links = []
    for label, off in (("← previous", max(0, first - limit)), ("next →", first + limit)):
        if (off < first) if label.startswith("←") else (off < matched):
            href = "/?" + urlencode({"q": match, "offset": off} if match else {"offset": off})
            links.append(f'<a class="pager" href="{esc(href)}" data-offset="{off}">{esc(label)}</a>')
    return f'<p class="pager" data-matched="{matched}">{text} {" ".join(links)}</p>'


def _backlog(q: tuple[int, str]) -> int:
    return q[0]


def render_queues(queues: list, page: dict | None = None, csrf: str = "") -> str:
    if not queues:
        if page and page.get("filter"):
            return f'<p class="empty">no queue name contains “{esc(page["filter"])}”</p>' + _pager(page, 0)
        return '<p class="empty">no queues yet</p>' + _pager(page, 0)
    rows = []
    for q in queues:
        name = q["name"]
        acts = ""
        if q.get("may_manage", True):  # buttons only for queues the viewer may manage
            acts = (_action(name, "resume", "resume", csrf=csrf) if q["paused"]
                    else _action(name, "pause", "pause", csrf=csrf))
            acts += _action(name, "purge", "purge", f"Drop every ready and delayed message of {name}?", csrf)
            if q["dead"] and not q["is_dead_letter_queue"]:
                acts += _action(name, "requeue-dead", f"requeue {q['dead']} dead", csrf=csrf)
        rows.append(
            f'<tr data-queue="{esc(name)}" class="{"paused" if q["paused"] else ""}">'
            f'<td class="name">{esc(name)}{" <em>paused</em>" if q["paused"] else ""}</td>'
            f'<td class="n">{q["ready"]}</td><td class="n">{q["inflight"]}</td><td class="n">{q["delayed"]}</td>'
            f'<td class="n">{q["dead"]}</td><td class="n">{q["consumers"]}</td>'
            f'<td class="n">{q["published"]}</td><td class="n">{q["acked"]}</td>'
            f'<td>{sparkline(q["rate"])}</td><td class="acts">{acts}</td></tr>')
    return (_pager(page, len(queues)) +
            '<table><thead><tr><th>queue</th><th>ready</th><th>in flight</th><th>delayed</th><th>dead</th>'
            '<th>consumers</th><th>published</th><th>acked</th><th>published/s (— acked/s)</th><th></th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _worker_pool(w: dict) -> str:
    size = w.get("pool_size", w.get("concurrency"))
    text = f"{w.get('pool') or ''} × {size}" if size is not None else str(w.get("pool") or "")
    auto = w.get("autoscale")
    if isinstance(auto, list) and len(auto) == 2:
        text += f" (autoscale {auto[1]}–{auto[0]})"
    return text


def _worker_changes(w: dict) -> str:
    """Pool grown/shrunk (--autoscale) and children replaced (--max-tasks/--max-memory-per-child)."""
    parts = []
    if w.get("pool_grown") or w.get("pool_shrunk"):
        parts.append(f"grown {w.get('pool_grown') or 0}, shrunk {w.get('pool_shrunk') or 0}")
    if w.get("replaced_max_memory") or w.get("replaced_max_tasks"):
        parts.append(f"replaced {w.get('replaced_max_memory') or 0} (memory), {w.get('replaced_max_tasks') or 0} (tasks)")
    return "; ".join(parts)


def render_workers(workers) -> str:
    if workers is None:
        return '<p class="empty">this brokerd keeps no worker registry</p>'
    if not workers:
        return '<p class="empty">no worker has reported yet (workers send worker-online and heartbeats)</p>'
    rows = []
    for w in workers:
        load = w.get("loadavg")
        queues = w.get("queues")
        rows.append(
            f'<tr data-worker="{esc(w.get("hostname"))}" class="w-{esc(w.get("state"))}">'
            f'<td class="name">{_worker_link(w.get("hostname"))}</td><td><span class="badge s-{esc(w.get("state"))}">'
            f'{esc(w.get("state"))}</span> <small>{esc(w.get("reason") or "")}</small></td>'
            f'<td>{esc(_worker_pool(w))}</td><td>{esc(",".join(map(str, queues)) if isinstance(queues, list) else "")}</td>'
            f'<td class="n">{esc(w.get("active", ""))}</td><td class="n">{esc(w.get("processed", ""))}</td>'
            f'<td>{esc(" ".join(str(x) for x in load) if isinstance(load, list) else (load or ""))}</td>'
            f'<td>{esc(_worker_changes(w))}</td>'
            f'<td class="n">{esc(round(w.get("heartbeat_age") or 0, 1))} s</td></tr>')
    return ('<table><thead><tr><th>worker</th><th>state</th><th>pool</th><th>queues</th><th>active</th><th>processed</th>'
            f'<th>load</th><th>pool changes</th><th>last heartbeat</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _worker_link(hostname) -> str:
    return f'<a class="worker" href="/worker/{esc(quote(str(hostname), safe=""))}">{esc(hostname)}</a>'


def render_worker(hostname: str, w: dict | None, access: Access = OPEN) -> str:
    if w is None:
        return (f'<h2>worker {esc(hostname)}</h2><p class="empty">no worker of this name has reported '
                "(workers send worker-online and heartbeats)</p>")
    st = w.get("state")
    queues = w.get("queues")
    load = w.get("loadavg")
    kv = [("state", f'<span class="badge s-{esc(st)}">{esc(st)}</span> <small>{esc(w.get("reason") or "")}</small>'),
          ("pool", esc(_worker_pool(w))), ("processed", esc(w.get("processed", ""))),
          ("active", esc(w.get("active", ""))),
          ("last heartbeat", f'<span data-field="heartbeat_age">{esc(round(w.get("heartbeat_age") or 0, 1))}</span> s ago'),
          ("queues", esc(",".join(map(str, queues)) if isinstance(queues, list) else "")),
          ("load", esc(" ".join(str(x) for x in load) if isinstance(load, list) else (load or ""))),
          ("pool changes", esc(_worker_changes(w))), ("software", esc(" ".join(
              str(w.get(k)) for k in ("sw_ident", "sw_ver") if w.get(k)))), ("pid", esc(w.get("pid") or ""))]
    acts = ""
    if st == "online" and access.workers:
        url = "/api/workers/" + quote(hostname, safe="")
        acts = ('<div class="acts worker-acts">'
                + _button(url + "/pool-grow", "pool +1", csrf=access.csrf)
                + _button(url + "/pool-shrink", "pool −1", csrf=access.csrf)
                + _button(url + "/shutdown", "shut down", f"Shut down worker {hostname} (warm: running tasks finish)?",
                          access.csrf) + "</div>")
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in kv)
    return (f'<h2>worker <span class="mono">{esc(hostname)}</span></h2>{acts}'
            f'<table class="kv" data-worker="{esc(hostname)}">{rows}</table>')


def _task_pager(page: dict, shown: int) -> str:
    """"tasks 51–100 of 10,000, by runtime ↓" with previous/next links (app.js follows them in place)."""
    first, limit = page["offset"], page["limit"]
    what = f'{page["total"]:,} kept' + ("+" if page["more"] and first + shown >= page["total"] else "")
    text = (f"tasks {first + 1 if shown else 0:,}–{first + shown:,} of {what}, by {page['sort']} "
            f"{'↓' if page['order'] == 'desc' else '↑'}")
    links = []
    if first:
        links.append(f'<a class="pager" href="#tasks" data-task-offset="{max(0, first - limit)}">← newer</a>')
    if page["more"]:
        links.append(f'<a class="pager" href="#tasks" data-task-offset="{first + limit}">older →</a>')
    return f'<p class="pager" id="task-pager" data-total="{page["total"]}">{esc(text)} {" ".join(links)}</p>'


def _sort_head(key: str, page: dict | None) -> str:
    """A column head that sorts by ``key`` (again: the other way round)."""
    label = TASK_SORT_LABELS[key]
    if page is None:
        return f"<th>{esc(label)}</th>"
    on = page["sort"] == key
    order = ("asc" if page["order"] == "desc" else "desc") if on else "desc"
    mark = (" ↓" if page["order"] == "desc" else " ↑") if on else ""
    return (f'<th><a href="#tasks" class="sort{" on" if on else ""}" data-sort="{key}" data-order="{order}">'
            f"{esc(label)}{mark}</a></th>")


def render_tasks(tasks, page: dict | None = None) -> str:
    """The task table; ``tasks`` is a list, or the dict ``Web.tasks`` returns (then with its pager)."""
    if isinstance(tasks, dict):
        page, tasks = tasks, tasks["tasks"]
    pager = _task_pager(page, len(tasks)) if page is not None else ""
    if not tasks:
        return pager + '<p class="empty">no tasks match</p>'
    rows = []
    for t in tasks:
        outcome = t.get("exception") if t.get("state") == "FAILURE" else t.get("result")
        args = "" if t.get("args") is None else short(t["args"], 120)
        rows.append(
            f'<tr data-task="{esc(t["id"])}" data-state="{esc(t.get("state"))}">'
            f'<td>{_task_link(t["id"])}</td><td class="tname">{esc(t.get("name") or "")}</td>'
            f'<td><span class="badge s-{esc(t.get("state"))}">{esc(t.get("state"))}</span></td>'
            f'<td class="mono">{esc(args)}</td><td class="mono">{esc("" if outcome is None else short(outcome, 120))}</td>'
            f'<td>{esc(t.get("worker") or "")}</td>'
            f'<td class="n rt">{esc("" if not isinstance(t.get("runtime"), (int, float)) else round(t["runtime"] * 1000, 1))}</td>'
            f'<td>{_when(t.get("received"))}</td>'
            f'<td>{_when(t.get("finished") or t.get("received"))}</td></tr>')
    return (pager + f'<table class="tasks"><thead><tr><th>task id</th>{_sort_head("name", page)}{_sort_head("state", page)}'
            f'<th>args</th><th>result / exception</th>{_sort_head("worker", page)}{_sort_head("runtime", page)}'
            f'{_sort_head("received", page)}{_sort_head("finished", page)}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


# -- graphs (the last hour, kept by the broker: broker.state.graphs) -------------------------------
NO_GRAPHS = '<p class="empty no-grant">the graphs need the results-read grant</p>'


def _svg_lines(lines: list, title: str, unit: str, w: int = 480, h: int = 110) -> str:
    """An inline SVG chart: ``lines`` = [(css class, label, values with None gaps)], oldest first."""
    known = [v for _, _, vals in lines for v in vals if v is not None]
    top = max(known) if known else 0.0
    n = max((len(vals) for _, _, vals in lines), default=0)
    xs = [f"{i * (w - 1) / max(1, n - 1):.1f}" for i in range(n)]
    base, scale = h - 14, ((h - 24) / top if top else 0.0)
    polys = []
    for cls, label, vals in lines:
        segs, pts = [], []
        for i, v in enumerate(vals):
            if v is None:
                if pts:
                    segs.append(pts)
                    pts = []
                continue
            pts.append(f"{xs[i]},{base - v * scale:.1f}")
        if pts:
            segs.append(pts)
        c, t = esc(cls), f"<title>{esc(label)}</title>"
        for pts in segs:
            if len(pts) == 1:  # one point between gaps: a dot
                x, y = pts[0].split(",")
                polys.append(f'<circle class="{c}" cx="{x}" cy="{y}" r="1.5">{t}</circle>')
            else:
                polys.append(f'<polyline class="{c}" points="{" ".join(pts)}">{t}</polyline>')
    legend = " ".join(f'<span class="key {esc(cls)}">{esc(label)}</span>' for cls, label, _ in lines)
    return (f'<figure class="graph" data-graph="{esc(title)}"><figcaption>{esc(title)} '
            f'<small>max {esc(f"{top:.4g}")} {esc(unit)}</small></figcaption>'
            f'<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"><title>{esc(title)}, last hour</title>'
            f'<line class="axis" x1="0" y1="{h - 14}" x2="{w}" y2="{h - 14}"/>'
            f'<text x="0" y="{h - 2}">−60 min</text><text x="{w - 26}" y="{h - 2}">now</text>{"".join(polys)}</svg>'
            f"<div>{legend}</div></figure>")


def render_graphs(g: dict) -> str:
    if not g:
        return '<p class="empty">this brokerd keeps no graphs</p>'
    out = [_svg_lines([("ok", "succeeded/s", g["succeeded_per_s"]), ("bad", "failed/s", g["failed_per_s"])],
                      "throughput", "tasks/s")]
    rt = []
    for i, (name, p) in enumerate(g["runtime_s"].items()):
        rt.append((f"c{i} p50", f"{name} p50", p["p50"]))
        rt.append((f"c{i} p95", f"{name} p95", p["p95"]))
    out.append(_svg_lines(rt, "runtime", "s") if rt else
               '<figure class="graph" data-graph="runtime"><figcaption>runtime</figcaption>'
               '<p class="empty">no task finished in the last hour</p></figure>')
    out.append(_svg_lines([("depth", "ready + delayed", g["queue_depth"]), ("inflight", "in flight", g["inflight"])],
                          "queue depth", "messages"))
    return f'<div class="graphs" data-bucket-s="{esc(g["bucket_s"])}">{"".join(out)}</div>'


def render_dead(dead: dict, csrf: str = "") -> str:
    if not dead:
        return '<p class="empty">no dead letters</p>'
    parts = []
    for name, d in dead.items():
        rows = "".join(
            f'<tr data-dead="{esc(m["id"])}"><td class="mono">{esc(m["id"])}</td><td>{esc(m["task"] or "")}</td>'
            f'<td class="mono">{esc(m["args"] if m["task"] else m["body"])}</td><td>{esc(m["reason"] or "")}</td>'
            f'<td class="n">{m["attempts"]}</td><td class="n">{m["age_s"]}</td></tr>'
            for m in d["messages"])
        parts.append(
            f'<div class="deadq" data-dead-queue="{esc(name)}"><h3>{esc(name)} '
            f'<small>({len(d["messages"])} shown of {d["total"]} in {esc(d["dead_letter_queue"])})</small> '
            f'{_action(name, "requeue-dead", "requeue all", csrf=csrf)}</h3>'
            '<table><thead><tr><th>message id</th><th>task</th><th>args / body</th><th>reason</th><th>attempts</th>'
            f'<th>age s</th></tr></thead><tbody>{rows}</tbody></table></div>')
    return "".join(parts)


def render_schedules(schedules: list) -> str:
    if not schedules:
        return '<p class="empty">no schedules</p>'
    rows = "".join(
        f'<tr><td class="name">{esc(s.get("name"))}</td><td>{esc(s.get("timing"))}</td><td>{esc(s.get("queue"))}</td>'
        f'<td>{"paused" if s.get("paused") else "active"}</td><td>{_when(s.get("next"))}</td>'
        f'<td>{_when(s.get("last_tick"))}</td><td class="n">{esc(s.get("fired"))}</td><td>{esc(s.get("owner") or "")}</td></tr>'
        for s in schedules)
    return ('<table><thead><tr><th>schedule</th><th>when</th><th>queue</th><th>state</th><th>next</th>'
            f'<th>last</th><th>fired</th><th>owner</th></tr></thead><tbody>{rows}</tbody></table>')


def render_limits(limits: list, csrf=False) -> str:
    """Each rate limit and cap: what it limits, to what, set by whom, and how many it holds back now;
    for a user with the ``control`` grant (``csrf`` not False: the session's token, or None without
    users), a form that sets a task's rate for all workers (POST /api/rates/task/<name>)."""
    form = ""
    if csrf is not False:
        token = f'<input type="hidden" name="csrf" value="{esc(csrf)}">' if csrf else ""
        form = ('<form class="rate-set">' + token + '<input name="task" placeholder="task name" aria-label="task name"> '
                '<input name="limit" placeholder="10/s, 100/m, 0 = none" aria-label="rate limit"> '
                '<button type="button" data-rate-set>set rate (all workers)</button></form>')
    if not limits:
        return '<p class="empty">no rate limits or concurrency caps</p>' + form
    rows = "".join(
        f'<tr><td>{esc(r["kind"])}</td><td class="name">{esc(r["name"])}</td><td>{esc(r["limit"] or "none")}</td>'
        f'<td>{esc(r["source"])}</td><td class="n">{esc(r["waiting"])}</td>'
        f'<td class="n">{esc("" if r["inflight"] is None else r["inflight"])}</td></tr>'
        for r in limits)
    return ('<table><thead><tr><th>kind</th><th>name</th><th>limit</th><th>set by</th><th>waiting</th>'
            f'<th>in flight</th></tr></thead><tbody>{rows}</tbody></table>') + form


def render_tenants(rows: list) -> str:
    """Each queue delivering in tenant turns: its tenants' ready messages and weights (the busiest)."""
    if not rows:
        return '<p class="empty">no queue has tenants</p>'
    out = "".join(
        f'<tr><td class="name">{esc(r["queue"])}</td><td class="n">{esc(r["tenants"])}</td><td>'
        + ", ".join(f'{esc("-" if t["tenant"] is None else t["tenant"])}: {esc(t["ready"])}'
                    + (f' (weight {esc(t["weight"])})' if t["weight"] != 1 else "") for t in r["top"])
        + "</td></tr>"
        for r in rows)
    return ('<table><thead><tr><th>queue</th><th>tenants</th><th>ready per tenant (busiest first)</th></tr></thead>'
            f'<tbody>{out}</tbody></table>')


def _pre(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=repr, ensure_ascii=False)
    return f'<pre class="mono">{esc(text)}</pre>'


def _task_buttons(task_id: str, info: dict, access: Access) -> str:
    """Revoke / terminate (``control``) and, for a FAILURE, retry (``publish`` on its queue)."""
    url = "/api/task/" + quote(task_id, safe="")
    out = []
    st = info.get("state")
    if access.may("control") and st not in ("SUCCESS", "FAILURE", "REVOKED"):
        out.append(_button(url + "/revoke", "revoke", "", access.csrf))
        out.append(_button(url + "/terminate", "terminate", f"Revoke {task_id} and kill it if it runs?", access.csrf))
    q = info.get("queue")
    if st == "FAILURE" and isinstance(q, str) and q and access.may("publish", q):
        out.append(_button(url + "/retry", "retry", "", access.csrf))
    return f'<div class="acts task-acts">{"".join(out)}</div>' if out else ""


def render_task(task_id: str, info, access: Access = OPEN) -> str:
    if info is None:
        return (f'<h2>task {esc(task_id)}</h2><p class="empty">brokerd knows nothing of this task: no events and '
                'no stored result (yet, or any more)</p>')
    st = info.get("state")
    kv = [("name", esc(info.get("name") or "")), ("state", f'<span class="badge s-{esc(st)}">{esc(st)}</span>'),
          ("worker", esc(info.get("worker") or "")), ("queue", esc(info.get("queue") or "")),
          ("retries", esc(info.get("retries") if info.get("retries") is not None else "")),
          ("runtime s", esc(info.get("runtime") if info.get("runtime") is not None else "")),
          ("parent", _task_link(info.get("parent_id"))), ("root", _task_link(info.get("root_id"))),
          ("children", " ".join(_task_link(c) for c in info.get("children") or []) or "")]
    w = info.get("waiting")
    if isinstance(w, dict):  # not finished, and its message found (TASK_INFO's "waiting")
        kv.append(("waiting", f'<span class="waiting">{esc(w.get("text"))}</span>'
                   + (f"<br><small>{esc(w['hint'])}</small>" if w.get("hint") else "")))
    out = [f'<h2>task <span class="mono">{esc(task_id)}</span></h2>{_task_buttons(task_id, info, access)}<table class="kv">']
    out += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in kv]
    out.append("</table><h3>args</h3>" + _pre(info.get("args")) + "<h3>kwargs</h3>" + _pre(info.get("kwargs")))
    if info.get("exception") or info.get("traceback"):
        out.append('<h3>exception</h3><div class="failure">' + _pre(info.get("exception"))
                   + (_pre(info.get("traceback")) if info.get("traceback") else "") + "</div>")
    if info.get("result") is not None or st == "SUCCESS":
        out.append("<h3>result</h3>" + _pre(info.get("result")))
    evs = info.get("events") or []
    rows = []
    for ev in evs:
        extra = {k: v for k, v in ev.items() if k not in ("type", "ts", "hostname", "uuid", "id", "task_id")}
        rows.append(f'<tr><td>{_when(ev.get("ts"))}</td><td>{esc(ev.get("type"))}</td><td>{esc(ev.get("hostname"))}</td>'
                    f'<td class="mono">{esc(short(extra, 400))}</td></tr>')
    out.append("<h3>timeline</h3>" + (
        f'<table><thead><tr><th>when</th><th>event</th><th>worker</th><th>details</th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>' if rows else '<p class="empty">no events (the worker sent none)</p>'))
    return "".join(out)


NO_TASKS = '<p class="empty no-grant">recent tasks need the results-read grant</p>'  # app.js then polls no tasks
TASK_FIELDS = ("id", "name", "state", "args", "kwargs", "worker", "runtime", "received", "started", "finished",
               "result", "exception")


def render_account(access: Access) -> str:
    """The header's "signed in as NAME" and logout button (a POST with the session's CSRF token)."""
    if access.user is None:
        return ""
    return (f'<form id="logout" method="post" action="/logout">signed in as <b>{esc(access.user)}</b> '
            f'<input type="hidden" name="csrf" value="{esc(access.csrf)}"><button type="submit">log out</button></form>')


def login_page(error: str = "", login_csrf: str = "") -> str:
    """The login form: user name and token, posted to /login with the form's own CSRF value."""
    msg = f'<p class="err" id="login-error">{esc(error)}</p>' if error else ""
    return PAGE.format(
        title="log in · brokerd", version=esc(__version__), kind="login", task_id="", account="",
        body=f"""
<section id="login"><h2>Log in</h2>{msg}
<form id="login-form" method="post" action="/login">
  <input type="hidden" name="csrf" value="{esc(login_csrf)}">
  <label>user <input name="user" autocomplete="username" required maxlength="64"></label>
  <label>token <input name="token" type="password" autocomplete="current-password" required></label>
  <button type="submit">log in</button>
</form></section>""")


# the page's frame; str.format fields: title, version, kind, task_id, account, body (all escaped by the caller)
PAGE = (HERE / "page.html").read_text(encoding="utf-8")


def asset(path: str) -> tuple[bytes, bytes] | None:
    entry = ASSETS.get(path)
    if entry is None:
        return None
    return (HERE / entry[0]).read_bytes(), entry[1]
