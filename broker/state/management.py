"""Queue management: declare, delete, purge, pause and resume, requeue dead letters.

Part of ``BrokerState`` (a mixin sharing its fields): the operations an
operator or a DECLARE/DELETE/PURGE frame runs on a whole queue, each logged.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from broker.errors import (
    PreconditionFailed,
)
from broker.state import log_records as R
from broker.state.queue import (
    DELAYED,
    GONE,
    Message,
    Queue,
    QueueOptions,
    validate_queue_name,
)


class ManagementMixin:
    # -- queue management --------------------------------------------------------
    def declare(self, name: str, options, now: float, temporary_owner: int | None = None) -> dict:
        """Create a queue, or check an existing one has these options.  With
        ``temporary_owner`` (a connection id) the queue dies with that connection
        (broker/state/exchanges.py)."""
        self._refuse_if_log_failed()
        validate_queue_name(name)
        opts = options if isinstance(options, QueueOptions) else QueueOptions.from_wire(options)
        q = self.queues.get(name)
        if q is not None and q.owner != temporary_owner and (q.declared or q.owner is not None):
            raise PreconditionFailed(
                f"queue {name!r} already exists as a "
                f"{'lasting queue' if q.owner is None else 'temporary queue of another connection'}; "
                f"declare it {'without' if temporary_owner is None else 'with'} temporary, or use another name")
        if temporary_owner is not None and (q is None or q.owner is None):
            self._own_temporary_queue(temporary_owner, name)
        if q is None:
            q = self.queues[name] = Queue(name, opts, declared=True)
            self._spill_setup(q)
            q.owner = temporary_owner
            fresh = True
        elif temporary_owner is not None and q.owner is None:
            q.owner = temporary_owner  # an undeclared queue (made by a publish) becomes temporary
            fresh = True
            q.options = opts
            q.declared = True
        elif q.declared and q.options != opts:
            raise PreconditionFailed(
                f"queue {name!r} already exists with options {q.options.to_wire()}; "
                "declare it with the same options, or delete it first")
        else:
            fresh = not q.declared  # declaring again with the same options keeps a rate set live since
            q.options = opts
            q.declared = True
        if fresh and opts.rate_limit is not None:
            self.set_queue_rate(q, opts.rate_limit)
        if temporary_owner is None:
            self._log(R.DECLARE, [name, opts.to_wire()])
        else:
            self._log(R.DECLARE, [name, opts.to_wire(), True])
        return opts.to_wire()

    def delete(self, name: str, now: float) -> int:
        self._refuse_if_log_failed()
        q = self.existing_queue(name)
        if q.consumers or q.inflight_count:
            raise PreconditionFailed(
                f"queue {name!r} has {len(q.consumers)} consumers and {q.inflight_count} messages "
                "in flight; cancel the consumers and settle the messages first")
        n = self._purge(q)
        del self.queues[name]
        if self.exchanges:
            self._unbind_queue(name)
        if q.owner is not None:
            self._temp_queues.get(q.owner, set()).discard(name)
        if q.rate_gate is not None:
            self._regate()
        self._log(R.DELETE, name)
        return n

    def _purge(self, q: Queue) -> int:
        n = 0
        for msg in q.take_all_ready():
            msg.state = GONE
            n += 1
        if q.delayed_count:
            keep = []
            for entry in self._delayed:
                msg = entry[2]
                if msg.queue is q and msg.state == DELAYED:
                    msg.state = GONE
                    n += 1
                else:
                    keep.append(entry)
            self._delayed = SortedList(keep)
            q.delayed_count = 0
        return n + self._drop_parked(q)

    def purge(self, name: str, now: float) -> int:
        """Drop every waiting (ready or delayed) message; in-flight ones stay."""
        self._refuse_if_log_failed()
        q = self.existing_queue(name)
        n = self._purge(q)
        self._log(R.PURGE, name)
        return n

    def pause(self, name: str, paused: bool, now: float) -> None:
        q = self.existing_queue(name)
        if q.paused == paused:
            return
        q.paused = paused
        self._log(R.PAUSE, [name, paused])
        if not paused:
            if self._gated:
                self._flow_consumer_came([q])
                self._flow_woke.discard(q)
            self._dispatch_queue(q, now)
            for c in list(q.consumers):
                self._dispatch_consumer(c, now)
            if self._flow_woke:
                self._dispatch_many(self._flow_take_woke(), now)

    def requeue_dead(self, name: str, now: float) -> int:
        """Move every message in name's dead-letter queue back to name, attempts reset."""
        self._refuse_if_log_failed()
        q = self.existing_queue(name)
        dl = q.dead_letter_name
        dlq = self.queues.get(dl) if dl else None
        if dlq is None:
            return 0
        n = 0
        keep = []
        for msg in dlq.take_all_ready():
            if (msg.headers or {}).get("x-dead-from", name) != name:
                keep.append(msg)  # a shared dead-letter queue: only this queue's go back
                continue
            msg.state = GONE
            headers = msg.headers
            if headers:
                headers = {k: v for k, v in headers.items() if k not in ("x-dead-reason", "x-dead-from", "x-dead-attempts")} or None
            new = Message(self._next_seq(), msg.id, q, msg.body, msg.priority, headers, 0, None, None, now)
            self._log_created(new, R.MOVE, [msg.seq, R.message_payload(new)])
            q.push_ready(new)
            n += 1
        for msg in keep:
            dlq.push_ready(msg)
        self._dispatch_queue(q, now)
        return n
