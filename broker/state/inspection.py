"""Read-only questions about the state: peek, per-queue and broker-wide statistics (frozen).

Part of ``BrokerState`` (a mixin sharing its fields); nothing here changes the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.state.queue import (
    Message,
    Queue,
)

if TYPE_CHECKING:  # for annotations only: core imports this module
    from broker.state.core import Consumer


# Where a task's message waits (TASK_INFO's "waiting", the admin TASK): the state keeps no index by
# message id (a dict entry per message, ~100 B and a hash insert and delete on every publish and
# ack, for an inspection), so the search reads at most this many messages: ready ones first
# (queues without a consumer first: the usual reason a task waits), then those in flight, then
# the delayed ones.  Measured: ~17 ms on the event loop for the whole budget
# (tests/runtime/test_task_waiting.py, test_scan_cost prints it).
TASK_SCAN_LIMIT = 100_000  # messages


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    name: str
    ready: int
    delayed: int
    waiting: int  # held back by a rate limit or a concurrency cap (broker.state.flow)
    inflight: int
    consumers: int
    dead: int  # messages waiting in this queue's dead-letter queue
    paused: bool
    published: int
    delivered: int
    acked: int
    nacked: int
    redelivered: int
    expired: int
    dead_lettered: int
    rejected: int
    released: int  # deliveries given back unstarted (RELEASE, protocol.md §5.43)
    recalled: int  # deliveries brokerd asked back from a busy consumer (RECALL, §5.44)
    oldest_ready_age: float  # seconds; 0 when nothing is ready
    options: dict


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    queues: int
    connections: int
    consumers: int
    ready: int
    delayed: int
    inflight: int
    published: int
    delivered: int
    acked: int


class InspectionMixin:
    # -- inspection --------------------------------------------------------------
    def peek(self, name: str, n: int = 10) -> list[Message]:
        q = self.existing_queue(name)
        out = []
        for msg in q.iter_ready():
            out.append(msg)
            if len(out) >= n:
                break
        return out

    def queue_statistics(self, q: Queue, now: float) -> QueueStatistics:
        dl = q.dead_letter_name
        dlq = self.queues.get(dl) if dl else None
        oldest = 0.0
        for msg in q.iter_ready():  # cheap: oldest of the highest priority is a fine proxy
            oldest = max(0.0, now - msg.ts)
            break
        return QueueStatistics(
            name=q.name,
            ready=q.ready_count,
            delayed=q.delayed_count,
            waiting=q.waiting_count,
            inflight=q.inflight_count,
            consumers=len(q.consumers),
            dead=dlq.ready_count if dlq is not None else 0,
            paused=q.paused,
            published=q.published,
            delivered=q.delivered,
            acked=q.acked,
            nacked=q.nacked,
            redelivered=q.redelivered,
            expired=q.expired,
            dead_lettered=q.dead_lettered,
            rejected=q.rejected,
            released=q.released,
            recalled=q.recalled,
            oldest_ready_age=oldest,
            options=q.options.to_wire(),
        )

    def statistics(self) -> BrokerStatistics:
        qs = self.queues.values()
        return BrokerStatistics(
            queues=len(self.queues),
            connections=len(self.conns),
            consumers=sum(len(c.consumers) for c in self.conns.values()),
            ready=sum(q.ready_count for q in qs),
            delayed=sum(q.delayed_count for q in qs),
            inflight=len(self.inflight),
            published=sum(q.published for q in qs),
            delivered=sum(q.delivered for q in qs),
            acked=sum(q.acked for q in qs),
        )

    def connection_names(self) -> dict[int, str]:
        """conn id -> the name it gave in HELLO ("" before), for every open connection."""
        return {cid: c.name for cid, c in self.conns.items()}

    def locate_message(self, task_id: str, now: float, queue: str | None = None, sees=None) -> dict:
        """Where the message of ``task_id`` waits: a map for TASK_INFO's ``waiting`` (protocol.md
        §3.3) with ``where`` = "ready", "in flight" or "delayed", its ``queue``, that queue's
        ``consumers`` and ``paused``, the details of where it is, a ``text`` sentence and a
        ``hint`` (or null); ``where`` null (and ``read``: messages read) when it is not among the
        first TASK_SCAN_LIMIT read.  ``queue``: look only there (NOT_FOUND when it does not exist);
        ``sees(name)``: only the queues a user may see."""
        if queue is not None:
            only = self.existing_queue(queue)
            queues = [only]
        else:
            only = None
            queues = sorted((q for q in self.queues.values() if sees is None or sees(q.name)),
                            key=lambda q: (len(q.consumers) > 0, q.name))
        read = 0
        for q in queues:
            if not q.ready_count:
                continue
            for pos, msg in enumerate(q.iter_ready(), 1):
                if msg.id == task_id:
                    return self._waiting(q, "ready", {"position": pos, "ready": q.ready_count})
                read += 1
                if read >= TASK_SCAN_LIMIT:
                    return _not_found(read, queue)
        for d in self.inflight.values():
            msg = d.msg
            if msg.id == task_id and (only is None or msg.queue is only) and (sees is None or sees(msg.queue.name)):
                conn = self.conns.get(d.conn)
                return self._waiting(msg.queue, "in flight", {
                    "attempts": msg.attempts, "connection": conn.name if conn is not None else None,
                    "deadline": d.deadline})
            read += 1
            if read >= TASK_SCAN_LIMIT:
                return _not_found(read, queue)
        for ready_at, _, msg in self._delayed:
            if msg.id == task_id and (only is None or msg.queue is only) and (sees is None or sees(msg.queue.name)):
                return self._waiting(msg.queue, "delayed", {"ready_at": ready_at, "in_s": round(ready_at - now, 3)})
            read += 1
            if read >= TASK_SCAN_LIMIT:
                return _not_found(read, queue)
        return _not_found(read, queue)

    def _waiting(self, q: Queue, where: str, detail: dict) -> dict:
        n = len(q.consumers)
        consumers = f"{n} consumer{'s' if n != 1 else ''}"
        name = q.name
        if where == "ready":
            text = f"queued in `{name}`, {consumers} (position {detail['position']} of {detail['ready']} ready)"
        elif where == "delayed":
            text = f"delayed in `{name}`, due in {max(0.0, detail['in_s']):.1f}s, {consumers}"
        else:
            who = detail["connection"] or "a consumer"
            text = f"in flight from `{name}` to {who!s} (attempt {detail['attempts']}), not acked yet"
        hint = None
        if n == 0 and where != "in flight":
            hint = f"no worker reads `{name}`: start one with -Q {name} (or add it to -Q)"
        elif q.paused and where != "in flight":
            hint = f"`{name}` is paused: RESUME {name}"
        return {"where": where, "queue": name, "consumers": n, "paused": q.paused, **detail, "text": text,
                "hint": hint}

    def consumers(self) -> list[Consumer]:
        return [c for conn in self.conns.values() for c in conn.consumers.values()]


def _not_found(read: int, queue: str | None) -> dict:
    where = f"queue {queue!r}" if queue is not None else "any queue"
    return {"where": None, "queue": queue, "read": read, "hint": None,
            "text": f"not among the {read} ready, in-flight and delayed messages read in {where} (at most "
                    f"{TASK_SCAN_LIMIT}): an unknown id, or not yet published"}
