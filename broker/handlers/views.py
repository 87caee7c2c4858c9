"""Frozen read models of the state for admin text, HTTP and the web page.

A view is copied out of the live structures in one pass and never changes
afterwards, so a renderer cannot alter the state nor see it half-way through a
change.  Broker-wide and per-queue figures are the state's own frozen
statistics (``BrokerStatistics``, ``QueueStatistics``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConsumerView:
    tag: int
    conn: int  # connection id
    client: str  # the name its connection gave in HELLO ("" before)
    queues: tuple[str, ...]  # preference order
    prefetch: int
    unacked: int


def consumers(state) -> list[ConsumerView]:
    """Every consumer, in the order the state lists them."""
    names = state.connection_names()
    return [
        ConsumerView(c.tag, c.conn, names.get(c.conn, ""), tuple(q.name for q in c.queues), c.prefetch, c.unacked)
        for c in state.consumers()
    ]
