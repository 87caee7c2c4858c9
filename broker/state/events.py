"""Task events, task history, the worker registry and remote control: observability state.

Workers report what happens to each task (``task-received``, ``task-started``,
``task-succeeded``, ``task-failed``, ``task-retried``, ``task-revoked``,
``task-rejected``) and to themselves (``worker-online``, ``worker-heartbeat``,
``worker-offline``, ``worker-pool-resized``, ``worker-process-replaced``) in
batches (EMIT_EVENTS, protocol.md §5.29).  brokerd keeps:

* a **ring** of the most recent events (``MAX_EVENTS``), replayed to a new
  subscriber on request;
* each task's **history**: its events, at most ``MAX_TASK_EVENTS`` each, for
  at most ``MAX_TASKS`` tasks and ``MAX_HISTORY_EVENTS`` events in all (the
  task seen first is forgotten first).  What they say about the task (name,
  args, worker, state, runtime, parent and children) is worked out when someone
  asks (``summarize``), so that taking an event costs a list append;
* the **registry of workers**: online, lost (its connection closed without a
  ``worker-offline``, or no heartbeat for ``LOST_AFTER`` of its own heartbeat
  intervals, checked by ``tick``), offline (it said goodbye).

None of this is written to the log: events are observability, not state.  The
task histories alone outlive a restart, through a file of their own beside the log
(``broker.runtime.history``): each task event marks its task changed (a dict insert), the
server takes the changed histories (``history_changes``) every few seconds and appends them
to that file (encoded and written in a worker thread), and at start-up they are read back
(``restore_history``) under the same bounds as above.  Measured (bench/task_events.py, shared
2-core box): taking a task's three events went from ~19 to ~26 us of CPU with the history
marks and the graphs, and appending its history costs ~10 us more (263 B on disk), against
~200 us of broker CPU per task end to end (bench/tasks.py).  The ring, the worker
registry and the graphs (``broker.state.graphs``) start empty; workers re-register with
their next heartbeat.

Subscribers (SUBSCRIBE, or the admin ``EVENTS`` command) get every event as it
arrives, batched into one EVENT frame per server batch.  A subscriber whose
connection has more than ``SUBSCRIBER_BACKLOG`` bytes unsent loses the events
instead (counted in the next frame's ``dropped``): a slow watcher never stalls
the broker nor grows its memory.  The server tells the state how much a
connection has unsent through ``output_backlog`` (no I/O here).

Remote control (CONTROL_REQUEST, §5.34): brokerd sends a CONTROL frame
``{"control": command, "args": {...}, "reply_id": n}`` to every live
registered worker (or the named ones), gathers their CONTROL_REPLYs, and
answers the requester once every one has answered or the timeout passes: a
deferred reply, like a parked RESULT_GET.

A mixin of BrokerState.  Pure: ``now`` is passed in.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

from sortedcontainers import SortedList

from broker.errors import BadRequest
from broker.state.graphs import TaskGraphs
from client.wire import KiB, control_frame, event_frame, ok_frame

# The ring: the last 10,000 events, about a minute of a worker running ~50 tasks/s (three
# events each), or the whole day of a quiet deployment.  A page or `brokerd-ctl events` that
# connects late can replay them.  An event is ~1 KiB in memory; the ring and the histories share
# them, and with every bound reached brokerd holds ~30 MiB more (measured: 10,000 tasks of 3 events).
MAX_EVENTS = 10_000
# Task histories: the last 10,000 tasks (the page's "recent tasks"), 32 events each at most (a
# task retried ten times has ~32), 30,000 events in all (three per task on average).
MAX_TASKS = 10_000
MAX_TASK_EVENTS = 32
MAX_HISTORY_EVENTS = 30_000
MAX_CHILDREN = 100  # child task ids TASK_INFO lists
# The task list (``tasks_page``: the page's and /api/tasks' paging, sorting and search) looks at every
# kept task, so one request costs at most MAX_TASKS steps, with summaries cached between requests.
# Measured with 10,000 tasks of three events, on the shared 2-core dev box: ~6 ms newest first (any
# page), ~13 ms sorted by runtime, ~21 ms searching args (bench/page_tasks.py).
TASKS_PAGE_MAX = 1000  # rows in one page
SEARCH_MAX = 200  # characters of a search text
TASK_SORTS = ("received", "started", "finished", "runtime", "state", "name", "worker")
# Workers that are not online (lost, offline) are remembered, up to this many, oldest dropped.
MAX_WORKERS = 1_000
# A worker that sends no heartbeat for this many of its own intervals is lost (Celery and Flower
# use the same rule, with the interval the worker announced).
LOST_AFTER = 3
DEFAULT_FREQ = 2.0  # seconds; a worker event without 'freq' is assumed to beat this often
MIN_FREQ = 0.05
MAX_FREQ = 3600.0
# A subscriber with more than this unsent loses events instead of buffering them.
SUBSCRIBER_BACKLOG = 1024 * KiB
# Event size limits, so that the ring's memory is bounded whatever a client sends.
MAX_EVENT_KEYS = 32
MAX_EVENT_TEXT = 4096  # characters of one text value; longer ones are cut (with '…')
MAX_EVENT_LIST = 32  # items of a list value (loadavg, queues); scalars only
MAX_HOSTNAME = 255
# Remote control: how long brokerd waits for the workers' replies.
DEFAULT_CONTROL_TIMEOUT = 1.0  # seconds; Celery's default
MAX_CONTROL_TIMEOUT = 60.0
MAX_COMMAND = 100

TASK_STATES = {
    "task-sent": "PENDING",
    "task-received": "RECEIVED",
    "task-started": "STARTED",
    "task-succeeded": "SUCCESS",
    "task-failed": "FAILURE",
    "task-retried": "RETRY",
    "task-revoked": "REVOKED",
    "task-rejected": "REJECTED",
}
READY_RESULT_STATES = ("SUCCESS", "FAILURE", "REVOKED")
_SCALARS = (str, int, float, bool, type(None))


class WorkerEntry:
    __slots__ = ("hostname", "conn", "state", "reason", "freq", "last_seen", "first_seen", "since", "info")

    def to_wire(self, now: float) -> dict:
        d = {k: v for k, v in self.info.items() if k not in ("type", "ts", "hostname")}
        d.update({
            "hostname": self.hostname,
            "state": self.state,
            "reason": self.reason,
            "conn": self.conn,
            "freq": self.freq,
            "last_heartbeat": self.last_seen,
            "heartbeat_age": max(0.0, now - self.last_seen),
            "first_seen": self.first_seen,
            "since": self.since,
        })
        return d


def summarize(task_id: str, events: list) -> dict:
    """What a task's events say about it (computed when asked: storing an event stays cheap)."""
    d = {"id": task_id, "name": None, "state": None, "args": None, "kwargs": None, "queue": None, "worker": None,
         "retries": None, "received": None, "started": None, "finished": None, "runtime": None, "result": None,
         "exception": None, "traceback": None, "parent_id": None, "root_id": None}
    for ev in events:
        t = ev.get("type")
        ts = ev.get("ts")
        if t == "task-sent":  # from the producer (task_send_sent_event), and it may come after the
            # worker's own events: it fills what is still unknown, never the state or worker they set
            for k in ("name", "args", "kwargs", "queue", "retries", "parent_id", "root_id"):
                if d[k] is None and ev.get(k) is not None:
                    d[k] = ev[k]
            if d["state"] is None:
                d["state"] = "PENDING"
            continue
        d["worker"] = ev.get("hostname")
        st = TASK_STATES.get(t)
        if st is not None:
            d["state"] = st
        if t == "task-received":
            d["received"] = ts
            for k in ("name", "args", "kwargs", "queue", "retries", "parent_id", "root_id"):
                v = ev.get(k)
                if v is not None:
                    d[k] = v
        elif t == "task-started":
            d["started"] = ts
        elif t == "task-succeeded":
            d["finished"], d["runtime"], d["result"] = ts, ev.get("runtime"), ev.get("result")
            d["exception"] = d["traceback"] = None  # of an earlier attempt: the timeline keeps it
        elif t == "task-failed":
            d["finished"], d["runtime"] = ts, ev.get("runtime")
            d["exception"], d["traceback"] = ev.get("exception"), ev.get("traceback")
        elif t == "task-retried":
            d["exception"] = ev.get("exception")
        elif t == "task-revoked" or t == "task-rejected":
            d["finished"] = ts
    return d


class Subscriber:
    __slots__ = ("conn", "dropped", "skip", "total_dropped")

    def __init__(self, conn):
        self.conn = conn
        self.dropped = 0  # events left out since the last EVENT frame sent to it
        self.skip = 0  # events of the current batch it saw already (replayed at subscribe)
        self.total_dropped = 0


class ControlRequest:
    __slots__ = ("id", "conn", "rid", "command", "expected", "replies", "deadline")


_PLAIN = frozenset((int, float, bool, type(None)))


def _check_event(ev, odd: list | None = None) -> str:
    """Validate one event map in place (cutting long text); return its type.  An event that is
    not plain (text keys; short text, numbers, booleans and nulls) is added to ``odd``."""
    if type(ev) is not dict:
        raise BadRequest(f"an event is a map (got {type(ev).__name__})")
    t = ev.get("type")
    if type(t) is not str or not 0 < len(t) <= 100:
        raise BadRequest("an event needs a 'type': text such as \"task-received\"")
    if len(ev) > MAX_EVENT_KEYS:
        raise BadRequest(f"an event has at most {MAX_EVENT_KEYS} keys (got {len(ev)})")
    for k, v in ev.items():  # the common case, fast: text keys, short text and plain values only
        if type(k) is not str:
            break
        if type(v) is str:
            if len(v) > MAX_EVENT_TEXT:
                break
        elif type(v) not in _PLAIN:
            break
    else:
        return _check_ids(ev, t)
    if odd is not None:
        odd.append(ev)
    for k, v in list(ev.items()):  # the rest: cut long text, check lists
        tv = type(v)
        if tv is str:
            if len(v) > MAX_EVENT_TEXT:
                ev[k] = v[: MAX_EVENT_TEXT - 1] + "…"
        elif tv not in _PLAIN and (tv is not list or len(v) > MAX_EVENT_LIST or any(
                type(x) not in _SCALARS or (type(x) is str and len(x) > 256) for x in v)):
            raise BadRequest(f"event value {k!r} must be a number, text, boolean, null or a list of at most "
                               f"{MAX_EVENT_LIST} of those (got {tv.__name__})")
    return _check_ids(ev, t)


def _check_ids(ev: dict, t: str) -> str:
    if t[:5] == "task-":
        u = ev.get("uuid")
        if type(u) is not str or not 0 < len(u) <= 255:
            raise BadRequest(f"a {t} event needs 'uuid': the task id (text, 1 to 255 characters)")
    ts = ev.get("ts")
    if ts is not None and type(ts) is not float and type(ts) is not int:
        raise BadRequest("an event's 'ts' is a number of seconds since the epoch")
    return t


_SEARCHABLE = (str, int, float, bool)  # a stored result shown and searched in the list; others are not


def _contains(d: dict, needle: str, r=None) -> bool:
    """Whether the task's id, name, args, kwargs, result (or stored result, when plain), exception
    or worker contain ``needle`` (casefolded).  Event text is cut to MAX_EVENT_TEXT: each check is
    bounded."""
    for k in ("id", "name", "args", "kwargs", "result", "exception", "worker"):
        v = d[k]
        if k == "result" and v is None and r is not None:
            v = r.value
        if v is None:
            continue
        if type(v) is not str:
            if type(v) not in _SEARCHABLE:
                continue
            v = str(v)
        if needle in v.casefold():
            return True
    return False


# The history file keeps a bounded preview of each text value: args, kwargs, result and the like
# are shown and searched by their first 1,000 characters after a restart (a traceback keeps its
# MAX_EVENT_TEXT: where it failed is what one reads it for).
HISTORY_TEXT = 1000  # characters


def persistable(events: list) -> list:
    """A task's events as written to the history file: long text cut to its preview."""
    out = []
    for ev in events:
        for v in ev.values():  # the common case, fast: nothing long
            if type(v) is str and len(v) > HISTORY_TEXT:
                ev = {k: (v[: HISTORY_TEXT - 1] + "…" if type(v) is str and len(v) > HISTORY_TEXT and k != "traceback"
                          else v) for k, v in ev.items()}
                break
        out.append(ev)
    return out


class EventsMixin:
    def _init_events(self):
        self.events = deque(maxlen=MAX_EVENTS)
        # task id -> its events, oldest first; the task seen first first (popitem(last=False) is O(1))
        self.task_history: OrderedDict[str, list] = OrderedDict()
        self._history_events = 0
        # tasks whose history changed since the server last took them (history_changes), in the
        # order they first changed: a dict used as an ordered set
        self._history_dirty: dict[str, None] = {}
        # task id -> its summary, made when the task list first needs it and dropped with each new
        # event of the task: a list request then summarizes only what changed since the last one
        # (~0.6 KB a task, ~6 MB with MAX_TASKS)
        self._summaries: dict[str, dict] = {}
        self.task_graphs = TaskGraphs()
        self.workers: dict[str, WorkerEntry] = {}
        self._worker_of_conn: dict[int, str] = {}
        self._lost_check = float("inf")  # earliest time an online worker may become lost
        self._subscribers: dict[int, Subscriber] = {}
        self._pending_events: list = []
        self.events_received = 0
        self.events_dropped = 0  # events not sent to slow subscribers, over all subscribers
        self._controls: dict[int, ControlRequest] = {}
        self._control_deadlines = SortedList()  # (deadline, id)
        self._control_ids = itertools.count(1)
        # Unsent bytes of a connection; the server replaces this with its own measure.
        self.output_backlog = lambda conn_id: 0

    # -- receiving events ----------------------------------------------------------------
    def emit_events(self, conn_id: int, hostname, events, now: float, check=None) -> int:
        """Take a batch of events from one worker; returns how many were taken.  ``check`` (the
        handler's encoding check) is called with the events that are not plain (text keys; short
        text, numbers, booleans and nulls: a worker's), before anything changes; it may raise."""
        if type(hostname) is not str or not hostname or len(hostname) > MAX_HOSTNAME:
            raise BadRequest(f"hostname must be text of 1 to {MAX_HOSTNAME} characters")
        if type(events) is not list:
            raise BadRequest("events must be a list of event maps")
        odd = [] if check is not None else None
        types = [_check_event(ev, odd) for ev in events]  # all or nothing
        if odd:
            check(odd)
        ring = self.events
        live = self._pending_events if self._subscribers else None
        for ev, t in zip(events, types):
            ev["hostname"] = hostname
            if "ts" not in ev:
                ev["ts"] = now
            if t[:5] == "task-":
                self._task_event(ev)
                ring.append(ev)
                if t == "task-succeeded" or t == "task-failed":
                    self._graph_task(ev, t, now)
            elif t[:7] == "worker-":
                self._worker_event(conn_id, ev, t, hostname, now)
                if t != "worker-heartbeat":  # heartbeats are live-only: they would flush the ring
                    ring.append(ev)
            else:
                ring.append(ev)  # a custom event: kept and passed on
            if live is not None:
                live.append(ev)
        self.events_received += len(events)
        return len(events)

    def _graph_task(self, ev: dict, t: str, now: float) -> None:
        evs = self.task_history.get(ev["uuid"])
        name = evs[0].get("name") if evs else None  # the name came with task-received, usually first
        if name is None and evs:
            name = next((e["name"] for e in evs if e.get("name") is not None), None)
        self.task_graphs.task_done(now, name, t == "task-succeeded", ev.get("runtime"))

    def _task_event(self, ev: dict) -> None:
        hist = self.task_history
        tid = ev["uuid"]
        dirty = self._history_dirty
        dirty[tid] = None
        if len(dirty) > 2 * MAX_TASKS:  # nobody takes them (no history file): keep only the kept tasks
            self._history_dirty = {t: None for t in dirty if t in hist or t == tid}
        self._summaries.pop(tid, None)
        evs = hist.get(tid)
        if evs is None:
            hist[tid] = [ev]
            if len(hist) > MAX_TASKS:
                self._forget_oldest_task()
        else:
            evs.append(ev)
            if len(evs) > MAX_TASK_EVENTS:
                del evs[0]
                return
        self._history_events += 1
        if self._history_events > MAX_HISTORY_EVENTS:
            while self._history_events > MAX_HISTORY_EVENTS and len(hist) > 1:
                self._forget_oldest_task()

    def _forget_oldest_task(self) -> None:
        tid, evs = self.task_history.popitem(last=False)
        self._history_events -= len(evs)
        self._summaries.pop(tid, None)

    def _worker_event(self, conn_id: int, ev: dict, t: str, hostname: str, now: float) -> None:
        w = self.workers.get(hostname)
        if t == "worker-offline":
            if w is not None:
                w.info.update(ev)
                w.state = "offline"
                w.reason = None
                w.since = now
                w.conn = None
                w.last_seen = now
            if self._worker_of_conn.get(conn_id) == hostname:
                del self._worker_of_conn[conn_id]
            self._control_gone(hostname, now)
            return
        freq = ev.get("freq")
        if type(freq) not in (int, float) or not MIN_FREQ <= freq <= MAX_FREQ:
            freq = w.freq if w is not None else DEFAULT_FREQ
        if w is None:
            w = self.workers[hostname] = WorkerEntry()
            w.hostname = hostname
            w.first_seen = now
            w.info = {}
            w.state = None
            w.conn = None
            w.reason = None
            w.since = now
            self._forget_old_workers()
        if w.state != "online":  # any event from it says it is alive
            w.since = now
            w.state = "online"
            w.reason = None
        if t == "worker-online":
            w.info = dict(ev)
        elif t == "worker-heartbeat":
            w.info.update(ev)
        elif t == "worker-pool-resized" and "size" in ev:  # news between two heartbeats
            w.info["pool_size"] = ev["size"]
        if w.conn is not None and w.conn != conn_id and self._worker_of_conn.get(w.conn) == hostname:
            del self._worker_of_conn[w.conn]
        w.conn = conn_id
        self._worker_of_conn[conn_id] = hostname
        w.freq = float(freq)
        w.last_seen = now
        due = now + LOST_AFTER * w.freq
        if due < self._lost_check:
            self._lost_check = due

    def _forget_old_workers(self) -> None:
        if len(self.workers) <= MAX_WORKERS:
            return
        gone = sorted((w for w in self.workers.values() if w.state != "online"), key=lambda w: w.since)
        for w in gone[: len(self.workers) - MAX_WORKERS]:
            del self.workers[w.hostname]

    def _worker_lost(self, w: WorkerEntry, reason: str, now: float) -> None:
        w.state = "lost"
        w.reason = reason
        w.since = now
        if w.conn is not None and self._worker_of_conn.get(w.conn) == w.hostname:
            del self._worker_of_conn[w.conn]
        w.conn = None
        ev = {"type": "worker-lost", "hostname": w.hostname, "ts": now, "reason": reason}
        self.events.append(ev)
        if self._subscribers:
            self._pending_events.append(ev)
        self._control_gone(w.hostname, now)

    # -- live stream -------------------------------------------------------------------------
    def subscribe(self, conn_id: int, on: bool, replay: int, now: float) -> dict:
        """Start (or stop) sending this connection every event; replay the last ``replay`` first."""
        if type(replay) is not int or replay < 0:
            raise BadRequest(f"replay must be a whole number of events >= 0 (got {replay!r})")
        if not on:
            sub = self._subscribers.pop(conn_id, None)
            return {"subscribed": False, "replayed": 0, "dropped": sub.total_dropped if sub else 0}
        sub = self._subscribers.get(conn_id)
        if sub is None:
            sub = self._subscribers[conn_id] = Subscriber(conn_id)
        sub.skip = len(self._pending_events)  # these are in the ring already: not sent twice
        n = min(replay, len(self.events))
        if n:
            ring = self.events
            evs = [ring[i] for i in range(len(ring) - n, len(ring))]
            self._send(conn_id, event_frame(evs, 0))
        return {"subscribed": True, "replayed": n, "dropped": sub.total_dropped}

    def _push_events(self) -> None:
        """One EVENT frame per subscriber for the events of this batch (called when the effects are taken)."""
        evs = self._pending_events
        self._pending_events = []
        backlog = self.output_backlog
        for sub in self._subscribers.values():
            mine = evs[sub.skip:] if sub.skip else evs
            sub.skip = 0
            if not mine:
                continue
            if backlog(sub.conn) > SUBSCRIBER_BACKLOG:
                sub.dropped += len(mine)
                sub.total_dropped += len(mine)
                self.events_dropped += len(mine)
                continue
            self._send(sub.conn, event_frame(mine, sub.dropped))
            sub.dropped = 0

    # -- queries -------------------------------------------------------------------------------
    def task_info(self, task_id, now: float, sees=None) -> dict | None:
        """What brokerd knows of a task: its history, its stored result, and (not finished yet)
        where its message waits (``waiting``: ``locate_message``, or null when it is not found);
        None if nothing.  ``sees(queue)``: the queues a user may see (the admin TASK)."""
        if type(task_id) is not str or not task_id or len(task_id) > 255:
            raise BadRequest(f"a task id is text of 1 to 255 characters (got {task_id!r})")
        evs = self.task_history.get(task_id)
        r = self.results.get(task_id)
        if r is not None and r.expires <= now:
            r = None
        d = summarize(task_id, evs or ())
        if r is not None and (r.state in READY_RESULT_STATES or d["state"] is None):
            d["state"] = r.state
        waiting = None
        if d["state"] not in READY_RESULT_STATES:  # PENDING, RECEIVED, STARTED, RETRY, REJECTED: where is it?
            loc = self.locate_message(task_id, now, sees=sees)
            waiting = loc if loc["where"] is not None else None
        if evs is None and r is None:
            if waiting is None:
                return None
            d["state"] = "PENDING"
        d["children"] = self._children_of(task_id) if evs else []
        d["events"] = list(evs or ())
        d["result_state"] = r.state if r is not None else None
        d["meta"] = r.meta if r is not None else None
        if r is not None:
            d["result"] = r.value
        d["waiting"] = waiting
        return d

    def _children_of(self, task_id: str) -> list:
        out = []
        for tid, evs in self.task_history.items():
            for ev in evs:
                if ev.get("parent_id") == task_id:
                    out.append(tid)
                    break
            if len(out) >= MAX_CHILDREN:
                break
        return out

    def tasks_recent(self, limit: int = 100, state: str | None = None, name: str | None = None) -> list:
        """Summaries of the most recent tasks (by first event), newest first, optionally of one
        state (RECEIVED, STARTED, SUCCESS...) or task name."""
        out = []
        for tid in reversed(self.task_history):
            d = summarize(tid, self.task_history[tid])
            if (state is None or d["state"] == state) and (name is None or d["name"] == name):
                out.append(d)
                if len(out) >= limit:
                    break
        return out

    def tasks_page(self, now: float, *, offset: int = 0, limit: int = 50, sort: str = "received",
                   desc: bool = True, state: str | None = None, name: str | None = None,
                   search: str | None = None) -> tuple[int, list]:
        """(how many tasks match, one page of their summaries) over the bounded history.

        ``sort``: one of TASK_SORTS, tasks without that value (not started yet...) last either way,
        ties newest first.  ``state``: only that state; ``name``: only that task name; ``search``:
        only tasks whose id, name, args, kwargs, result, exception or worker contain that text
        (case ignored).  A stored result's state wins over the events' when it is final (the
        worker's last event may still be on its way), as in ``task_info``.
        """
        if sort not in TASK_SORTS:
            raise BadRequest(f"sort must be one of {', '.join(TASK_SORTS)} (got {str(sort)[:40]!r})")
        if type(offset) is not int or offset < 0 or type(limit) is not int or not 0 < limit <= TASKS_PAGE_MAX:
            raise BadRequest(f"offset is a whole number >= 0 and limit one from 1 to {TASKS_PAGE_MAX} "
                             f"(got offset={offset!r}, limit={limit!r})")
        if search is not None and (type(search) is not str or len(search) > SEARCH_MAX):
            raise BadRequest(f"search text is at most {SEARCH_MAX} characters")
        needle = search.casefold() if search else None
        results = self.results
        cache = self._summaries
        hist = self.task_history
        rows = []  # (summary, its state with the stored result's, the stored result or None)
        for tid in reversed(hist):  # newest first
            d = cache.get(tid)
            if d is None:
                d = cache[tid] = summarize(tid, hist[tid])
            st = d["state"]
            r = results.get(tid)
            if r is not None and (r.expires <= now or not (st is None or r.state in READY_RESULT_STATES)):
                r = None
            if r is not None:
                st = r.state
            if state is not None and st != state:
                continue
            if name is not None and d["name"] != name:
                continue
            if needle is not None and not _contains(d, needle, r):
                continue
            rows.append((d, st, r))
        if sort == "state":
            has = [x for x in rows if x[1] is not None]
            rows = sorted(has, key=lambda x: x[1], reverse=desc) + [x for x in rows if x[1] is None]
        elif sort != "received" or not desc:  # history order is "received, newest first" already
            has = [x for x in rows if x[0][sort] is not None]
            rows = sorted(has, key=lambda x: x[0][sort], reverse=desc) + [x for x in rows if x[0][sort] is None]
        page = []
        for d, st, r in rows[offset: offset + limit]:
            d = dict(d)  # the cached summary stays as the events say
            d["state"] = st
            if r is not None and d["result"] is None and type(r.value) in _SEARCHABLE:
                d["result"] = r.value
            page.append(d)
        return len(rows), page

    # -- the history's own file (broker.runtime.history does the I/O) ---------------------------
    def history_changes(self) -> list:
        """[[task id, its events], ...] of the tasks whose history changed since the last call, in
        the order they first changed; forgotten tasks are left out.  Events are shared, never
        changed once taken, so the caller may encode them in another thread."""
        dirty = self._history_dirty
        if not dirty:
            return []
        self._history_dirty = {}
        hist = self.task_history
        return [[tid, list(evs)] for tid in dirty if (evs := hist.get(tid)) is not None]

    def history_snapshot(self) -> list:
        """Every kept history, oldest task first (to rewrite the file in one piece)."""
        self._history_dirty = {}
        return [[tid, list(evs)] for tid, evs in self.task_history.items()]

    def restore_history(self, items) -> int:
        """Take back histories read from the file (a later entry of a task replaces its earlier
        one); anything malformed is skipped.  The bounds hold as if they had just arrived.
        Returns how many tasks are kept."""
        hist = self.task_history
        for item in items:
            if type(item) is not list or len(item) != 2:
                continue
            tid, evs = item
            if type(tid) is not str or not 0 < len(tid) <= 255 or type(evs) is not list:
                continue
            evs = [ev for ev in evs if type(ev) is dict][-MAX_TASK_EVENTS:]
            if not evs:
                continue
            old = hist.get(tid)
            self._history_events += len(evs) - (len(old) if old is not None else 0)
            hist[tid] = evs
            self._summaries.pop(tid, None)
            while len(hist) > MAX_TASKS or (self._history_events > MAX_HISTORY_EVENTS and len(hist) > 1):
                self._forget_oldest_task()
        return len(hist)

    def recent_events(self, n: int = MAX_EVENTS) -> list:
        ring = self.events
        n = min(n, len(ring))
        return [ring[i] for i in range(len(ring) - n, len(ring))]

    def workers_list(self, now: float) -> list:
        return [w.to_wire(now) for w in sorted(self.workers.values(), key=lambda w: w.hostname)]

    # -- remote control --------------------------------------------------------------------------
    def control_request(self, conn_id: int, rid: int, command, args, now: float, *,
                        timeout=None, destination=None) -> dict | None:
        """Send a control command to the live workers; the reply is deferred until they answer.

        Returns the reply at once (``{}``) when no worker is there to ask, else None.
        """
        req = self._control_open(conn_id, rid, command, args, now, timeout, destination)
        return None if type(req) is ControlRequest else req

    def _control_open(self, conn_id, rid, command, args, now, timeout, destination):
        """The new request (its CONTROL frames sent), or ``{}`` when there is nobody to ask."""
        if type(command) is not str or not command or len(command) > MAX_COMMAND:
            raise BadRequest(f"a control command is text of 1 to {MAX_COMMAND} characters (got {command!r})")
        if args is not None and type(args) is not dict:
            raise BadRequest("control args must be a map or null")
        if timeout is None:
            timeout = DEFAULT_CONTROL_TIMEOUT
        elif type(timeout) not in (int, float) or not 0 < timeout < float("inf"):
            raise BadRequest(f"timeout must be a number of seconds > 0 (got {timeout!r})")
        if destination is not None:
            if type(destination) is not list or not all(type(h) is str for h in destination):
                raise BadRequest("destination must be a list of worker hostnames")
            destination = set(destination)
        targets = [w for w in self.workers.values()
                   if w.state == "online" and w.conn in self.conns
                   and (destination is None or w.hostname in destination)]
        if not targets:
            return {}
        req = ControlRequest()
        req.id = next(self._control_ids)
        req.conn = conn_id
        req.rid = rid
        req.command = command
        req.expected = {w.hostname for w in targets}
        req.replies = {}
        req.deadline = now + min(float(timeout), MAX_CONTROL_TIMEOUT)
        payload = {"control": command, "args": args or {}, "reply_id": req.id}
        for w in targets:
            self._send(w.conn, control_frame(payload))
        self._controls[req.id] = req
        self._control_deadlines.add((req.deadline, req.id))
        return req

    def control_ask(self, asker: int, command, args, now: float, *, timeout=None,
                    destination=None) -> ControlRequest | None:
        """``control_request`` for an asker inside brokerd (the web page, with a conn id no
        connection has): the pending request, whose ``replies`` fill in as workers answer and
        whose ``expected`` empties; None when no worker was there to ask."""
        req = self._control_open(asker, 0, command, args, now, timeout, destination)
        return req if type(req) is ControlRequest else None

    def control_reply(self, conn_id: int, reply_id, reply, now: float) -> bool:
        """A worker's answer to a control request; False if nobody waits for it any more."""
        if type(reply_id) is not int:
            raise BadRequest("reply_id must be the whole number the CONTROL frame carried")
        req = self._controls.get(reply_id)
        if req is None:
            return False
        conn = self.conns.get(conn_id)
        hostname = self._worker_of_conn.get(conn_id) or (conn.name if conn else f"conn-{conn_id}")
        req.replies[hostname] = reply
        req.expected.discard(hostname)
        if not req.expected:
            self._control_done(req)
        return True

    def _control_done(self, req: ControlRequest) -> None:
        self._controls.pop(req.id, None)
        self._control_deadlines.discard((req.deadline, req.id))
        if req.conn in self.conns:
            self._send(req.conn, ok_frame(req.rid, req.replies))

    def _control_gone(self, hostname: str, now: float) -> None:
        """A worker went away: stop waiting for its replies."""
        if not self._controls:
            return
        for req in list(self._controls.values()):
            if hostname in req.expected:
                req.expected.discard(hostname)
                if not req.expected:
                    self._control_done(req)

    # -- connections and time ------------------------------------------------------------------
    def _events_disconnect(self, conn_id: int, now: float) -> None:
        self._subscribers.pop(conn_id, None)
        hostname = self._worker_of_conn.pop(conn_id, None)
        if hostname is not None:
            w = self.workers.get(hostname)
            if w is not None and w.state == "online" and w.conn == conn_id:
                self._worker_lost(w, "connection closed without worker-offline", now)
        if self._controls:
            for req in list(self._controls.values()):
                if req.conn == conn_id:
                    self._controls.pop(req.id, None)
                    self._control_deadlines.discard((req.deadline, req.id))

    def _tick_events(self, now: float) -> None:
        g = self.task_graphs
        if g.needs_depth(now):  # once per graph bucket: O(queues)
            depth = 0
            for q in self.queues.values():
                depth += q.ready_count + q.delayed_count
            g.sample_depth(now, depth, len(self.inflight))
        if now >= self._lost_check:
            nxt = float("inf")
            for w in list(self.workers.values()):
                if w.state != "online":
                    continue
                due = w.last_seen + LOST_AFTER * w.freq
                if due <= now:
                    self._worker_lost(w, f"no heartbeat for {now - w.last_seen:.1f}s "
                                         f"({LOST_AFTER} intervals of {w.freq:g}s)", now)
                elif due < nxt:
                    nxt = due
            self._lost_check = nxt
        dl = self._control_deadlines
        while dl and dl[0][0] <= now:
            _, cid = dl.pop(0)
            req = self._controls.get(cid)
            if req is not None:
                self._control_done(req)

    def _events_next_wakeup(self) -> float:
        t = self._lost_check
        if self._control_deadlines and self._control_deadlines[0][0] < t:
            t = self._control_deadlines[0][0]
        return t
