"""Frozen read models of the state for admin text, HTTP and the web page.

The HTTP side and the page read the state only through these functions (a layering
test holds them to it); the state's live structures (queues, connections, deliveries,
results) stay behind them.

A view is copied out of the live structures in one pass and never changes
afterwards, so a renderer cannot alter the state nor see it half-way through a
change.  Broker-wide and per-queue figures are the state's own frozen
statistics (``BrokerStatistics``, ``QueueStatistics``).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.state.inspection import QueueStatistics


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


# -- queues --------------------------------------------------------------------------------
# /metrics, /api/queues and the page list queues in pieces (up to 50,000 of them): the names
# are taken once, then each piece reads the figures of its names, so a piece is a snapshot of
# its queues and a queue deleted meanwhile is left out.
def queue_names(state) -> tuple[str, ...]:
    """Every queue's name, in the order the state keeps them."""
    return tuple(state.queues)


def queue_statistics(state, names, now: float) -> list[QueueStatistics]:
    """The frozen figures of those of ``names`` that still exist, in order."""
    queues = state.queues
    stats = state.queue_statistics
    return [stats(q, now) for name in names if (q := queues.get(name)) is not None]


@dataclass(frozen=True, slots=True)
class QueueView:
    """One queue for the page: its figures and where its dead letters go (None: it is one)."""

    stats: QueueStatistics
    dead_letter_queue: str | None


def queue_view(state, name: str, now: float) -> QueueView | None:
    q = state.queues.get(name)
    if q is None:
        return None
    return QueueView(state.queue_statistics(q, now), q.dead_letter_name)


def queue_backlogs(state, match: str = "") -> list[tuple[int, str]]:
    """``(ready + in flight, name)`` of every queue whose name contains ``match``: plain tuples,
    one pass, so the page can pick its largest backlogs among 50,000 queues (~10 ms)."""
    qs = state.queues.values()
    if match:
        return [(q.ready_count + q.inflight_count, q.name) for q in qs if match in q.name]
    return [(q.ready_count + q.inflight_count, q.name) for q in qs]


@dataclass(frozen=True, slots=True)
class QueueTotals:
    """Sums over every queue, and the names given as a custom dead-letter queue."""

    ready: int
    delayed: int
    published: int
    acked: int
    custom_dead_letter_queues: frozenset[str]


def queue_totals(state) -> QueueTotals:
    ready = delayed = published = acked = 0
    custom = set()
    for q in state.queues.values():
        ready += q.ready_count
        delayed += q.delayed_count
        published += q.published
        acked += q.acked
        dl = q.options.dead_letter
        if dl is not None:
            custom.add(dl)
    return QueueTotals(ready, delayed, published, acked, frozenset(custom))


def queue_count(state) -> int:
    return len(state.queues)


@dataclass(frozen=True, slots=True)
class ConnectionCounts:
    connections: int
    consumers: int
    inflight: int


def connection_counts(state) -> ConnectionCounts:
    """Connections, consumers and deliveries in flight: cheap at any number of queues (the
    full ``state.statistics()`` sums over every queue, ~16 ms at 50,000)."""
    return ConnectionCounts(len(state.conns), sum(len(c.consumers) for c in state.conns.values()), len(state.inflight))


def queue_counters(state, names=None) -> dict[str, tuple[int, int]]:
    """``{name: (published, acked)}``, a new dict: of every queue, or of those of ``names`` that exist."""
    queues = state.queues
    if names is None:
        return {q.name: (q.published, q.acked) for q in queues.values()}
    return {n: (q.published, q.acked) for n in names if (q := queues.get(n)) is not None}


# -- dead letters --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MessageView:
    id: object  # the producer's message id
    body: bytes
    attempts: int
    ts: float  # when it was published (Unix time)
    headers: dict | None  # a copy


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """The first ``n`` dead letters of ``queue`` in its dead-letter queue, and how many it holds."""

    queue: str
    dead_letter_queue: str | None
    total: int  # messages ready in the dead-letter queue (all origins)
    messages: tuple[MessageView, ...]


def dead_letters(state, name: str, n: int, scan: int) -> DeadLetterView:
    """Raises NotFound when ``name`` is no queue.  Looks at the first ``scan`` messages of the
    dead-letter queue and keeps the first ``n`` that came from ``name``."""
    q = state.existing_queue(name)
    dl = q.dead_letter_name
    dlq = state.queues.get(dl) if dl is not None else None
    if dlq is None:
        return DeadLetterView(name, dl, 0, ())
    msgs = [m for m in state.peek(dl, scan) if (m.headers or {}).get("x-dead-from", name) == name][:n]
    views = tuple(MessageView(m.id, m.body, m.attempts, m.ts, dict(m.headers) if m.headers else None) for m in msgs)
    return DeadLetterView(name, dl, dlq.ready_count, views)


# -- stored results ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ResultView:
    id: str
    state: str
    value: object
    meta: object
    updated: float  # when it was stored (Unix time)


def _result(r) -> ResultView:
    return ResultView(r.id, r.state, r.value, r.meta, r.updated)


def result(state, task_id, now: float) -> ResultView | None:
    """The stored result of ``task_id``, or None when there is none or it expired."""
    r = state.results.get(task_id)
    return _result(r) if r is not None and r.expires > now else None


def results_without_events(state, now: float, state_filter: str | None, skip, limit: int) -> list[ResultView]:
    """Up to ``limit`` unexpired results, newest first, of tasks that sent no events and are not
    in ``skip``; only those in ``state_filter`` when it is given."""
    history = getattr(state, "task_history", {})
    results = state.results
    out = []
    if limit <= 0:
        return out
    for tid in reversed(results):
        if tid in skip or tid in history:
            continue
        r = results[tid]
        if r.expires <= now or (state_filter and r.state != state_filter):
            continue
        out.append(_result(r))
        if len(out) >= limit:
            break
    return out
