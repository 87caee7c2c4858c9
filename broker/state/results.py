"""Task results kept by the broker, by task id, with a TTL and long-poll waits.

A result is ``(state, value, meta)``: state is one of STATES, value any CBOR
value (the task's return value), meta a map (exception type, message and
traceback for a FAILURE; anything a task sets with update_state).  An id the
broker does not know is PENDING, as in Celery.

``result_get(..., wait=s)`` does not poll: if the result is not ready the
caller's request is parked, and the reply goes out when a ready state
(SUCCESS, FAILURE, REVOKED) is stored or when the wait runs out (then with the
state as it is, e.g. PENDING or STARTED).

Storing a result can ack the delivery that produced it in the same log
record, so "the task's result is stored" and "its message is done" can never
be split by a crash.

A mixin of BrokerState: it uses the state's outbox, log and inflight table.
Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import re
from collections import deque

from sortedcontainers import SortedList

from broker.errors import BadRequest, StaleDelivery
from broker.state import log_records as R
from broker.state.queue import GONE

STATES = ("PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED", "REJECTED")
# REJECTED: a task that refused itself (Celery's Reject(requeue=False)); final, so waiters wake.
READY_STATES = frozenset(("SUCCESS", "FAILURE", "REVOKED", "REJECTED"))
DEFAULT_RESULT_TTL = 24 * 3600.0  # seconds; Celery's result_expires default is one day
MAX_WAIT = 3600.0  # seconds a RESULT_GET may park
MAX_TASK_ID = 255
# A task may also store a state of its own (Celery's update_state, e.g. PROGRESS):
# capital letters, digits and _, up to 32; never ready, never acks.
CUSTOM_STATE = re.compile(r"[A-Z][A-Z0-9_]{0,31}")


class Result:
    __slots__ = ("id", "state", "value", "meta", "expires", "updated", "lsn")

    def __init__(self, id, state, value, meta, expires, updated):
        self.id = id
        self.state = state
        self.value = value
        self.meta = meta
        self.expires = expires
        self.updated = updated
        self.lsn = 0

    def to_wire(self) -> dict:
        return {"id": self.id, "state": self.state, "result": self.value, "meta": self.meta, "updated": self.updated}


def pending(task_id) -> dict:
    return {"id": task_id, "state": "PENDING", "result": None, "meta": None, "updated": None}


def check_task_id(task_id) -> str:
    if type(task_id) is not str or not task_id or len(task_id) > MAX_TASK_ID:
        raise BadRequest(f"a task id must be a text string of 1 to {MAX_TASK_ID} characters (got {task_id!r})")
    return task_id


class ResultsMixin:
    def _init_results(self):
        self.results: dict[str, Result] = {}
        # (expires, id) of every result stored, oldest expiry first.  Nearly every result expires
        # after the default TTL from now, so their expiries come in order: those go to a deque
        # (an append, against ~2 us for a SortedList add per task), the others to the SortedList.
        # An entry whose result was replaced or forgotten stays until its time and is skipped
        # then (its expiry no longer matches): at most one per result stored within the TTL.
        self._result_fifo: deque = deque()
        self._result_ttl = SortedList()
        self._waiters: dict[str, list] = {}  # id -> [(conn, rid)]
        self._wait_deadlines = SortedList()  # (deadline, n, conn, rid, id)
        self._wait_n = 0
        self.default_result_ttl = DEFAULT_RESULT_TTL

    def result_set(
        self, conn_id: int, task_id, state, value, meta, now: float, *, ttl=None, tag=None
    ) -> dict:
        """Store a task's state; with ``tag``, ack that delivery in the same record."""
        self._refuse_if_log_failed()
        check_task_id(task_id)
        if state not in STATES or state == "PENDING":  # a custom state, or a mistake
            if type(state) is not str or state == "PENDING" or not CUSTOM_STATE.fullmatch(state):
                raise BadRequest(
                    f"state must be one of {', '.join(STATES[1:])}, or a custom state of up to 32 capital "
                    f"letters, digits and _ such as PROGRESS (got {state!r})"
                )
        if meta is not None and type(meta) is not dict:
            raise BadRequest("meta must be a map or null")
        if ttl is not None and (type(ttl) not in (int, float) or ttl <= 0):
            raise BadRequest(f"ttl must be a number of seconds > 0 (got {ttl!r})")
        acked_seq = None
        acked = False
        if tag is not None and state not in READY_STATES:
            raise BadRequest(
                f"a result in state {state} cannot ack its delivery: the task is not finished "
                "(only SUCCESS, FAILURE, REVOKED and REJECTED may carry a tag)"
            )
        if tag is not None:
            try:
                d = self._settle(conn_id, tag)
            except StaleDelivery:
                pass
            else:
                msg = d.msg
                msg.state = GONE
                msg.queue.acked += 1
                acked_seq = msg.seq
                acked = True
                c = d.consumer
        expires = now + (ttl if ttl is not None else self.default_result_ttl)
        r = self._store_result(task_id, state, value, meta, expires, now)
        r.lsn = self._log(R.RESULT, [task_id, state, value, meta, expires, now, acked_seq])
        if self._unique_of and state in READY_STATES:
            self._unique_event(task_id, started=False)  # "until finished" (broker/state/unique.py)
        if acked and c.unacked < c.prefetch:
            if self._settled is not None:  # refilled after the run of results (hold_settles)
                self._settled[c] = None
            else:
                self._dispatch_consumer(c, now)
                if c.unacked < c.slots:  # a free slot and nothing came: idle (RECALL, broker/state/core.py)
                    self._maybe_recall(c, now)
        return {"acked": acked}

    def _store_result(self, task_id, state, value, meta, expires, now) -> Result:
        r = self.results.get(task_id)
        if r is None:
            r = self.results[task_id] = Result(task_id, state, value, meta, expires, now)
        else:
            r.state, r.value, r.meta, r.expires, r.updated = state, value, meta, expires, now
        fifo = self._result_fifo
        if not fifo or fifo[-1][0] <= expires:
            fifo.append((expires, task_id))
        else:
            self._result_ttl.add((expires, task_id))
        if state in READY_STATES and self._chord_of:
            if task_id in self._chord_of:
                ch = self.chords.get(self._chord_of[task_id])
                if ch is not None and not ch["done"]:
                    self._chord_member_done(ch, task_id, state, value, meta, now, self._replaying)
        if state in READY_STATES:
            waiters = self._waiters.pop(task_id, None)
            if waiters:
                reply = r.to_wire()
                for conn, rid in waiters:
                    self._send(conn, [64, rid, reply])
        return r

    def result_get(self, conn_id: int, rid: int, task_id, now: float, wait=None):
        """The result as a map, or None if the request is parked until it is ready."""
        check_task_id(task_id)
        if wait is not None and (type(wait) not in (int, float) or wait < 0):
            raise BadRequest(f"wait must be a number of seconds >= 0 (got {wait!r})")
        r = self.results.get(task_id)
        if r is not None and r.expires <= now:
            self._drop_result(r)
            r = None
        if (r is not None and r.state in READY_STATES) or not wait:
            return r.to_wire() if r is not None else pending(task_id)
        self._waiters.setdefault(task_id, []).append((conn_id, rid))
        self._wait_n += 1
        self._wait_deadlines.add((now + min(wait, MAX_WAIT), self._wait_n, conn_id, rid, task_id))
        return None

    def result_forget(self, task_id, now: float) -> bool:
        self._refuse_if_log_failed()
        check_task_id(task_id)
        r = self.results.get(task_id)
        if r is None:
            return False
        self._drop_result(r)
        self._log(R.FORGET, task_id)
        return True

    def _drop_result(self, r: Result) -> None:
        self.results.pop(r.id, None)
        self._result_ttl.discard((r.expires, r.id))  # (an entry in _result_fifo is skipped at its time)

    def _drop_waiters_of(self, conn_id: int) -> None:
        for task_id in list(self._waiters):
            left = [w for w in self._waiters[task_id] if w[0] != conn_id]
            if left:
                self._waiters[task_id] = left
            else:
                del self._waiters[task_id]

    def _tick_results(self, now: float) -> None:
        for ttl in (self._result_fifo, self._result_ttl):
            while ttl and ttl[0][0] <= now:
                expires, task_id = ttl.popleft() if type(ttl) is deque else ttl.pop(0)
                r = self.results.get(task_id)
                if r is not None and r.expires == expires:
                    del self.results[task_id]
        dl = self._wait_deadlines
        while dl and dl[0][0] <= now:
            _, _, conn, rid, task_id = dl.pop(0)
            waiters = self._waiters.get(task_id)
            if not waiters or (conn, rid) not in waiters:
                continue
            waiters.remove((conn, rid))
            if not waiters:
                del self._waiters[task_id]
            r = self.results.get(task_id)
            if conn in self.conns:
                self._send(conn, [64, rid, r.to_wire() if r is not None else pending(task_id)])

    def _results_next_wakeup(self) -> float:
        t = float("inf")
        if self._result_fifo:
            t = self._result_fifo[0][0]
        if self._result_ttl and self._result_ttl[0][0] < t:
            t = self._result_ttl[0][0]
        if self._wait_deadlines and self._wait_deadlines[0][0] < t:
            t = self._wait_deadlines[0][0]
        return t

    def _replay_result(self, p, lsn, msgs) -> None:
        task_id, state, value, meta, expires, ts, acked_seq = p
        r = self._store_result(task_id, state, value, meta, expires, ts)
        r.lsn = lsn
        if acked_seq is not None:
            m = msgs.pop(acked_seq, None)
            if m is not None:
                m.queue.acked += 1

    def _compact_results(self, through_lsn: int) -> None:
        for r in list(self.results.values()):
            if r.lsn <= through_lsn:
                r.lsn = self._log(R.RESULT, [r.id, r.state, r.value, r.meta, r.expires, r.updated, None])
