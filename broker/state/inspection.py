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

    def consumers(self) -> list[Consumer]:
        return [c for conn in self.conns.values() for c in conn.consumers.values()]
