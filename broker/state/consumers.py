"""Who holds what: a connection, its consumers, and the deliveries in flight to them (plain data).

``BrokerState`` keeps ``conns`` (conn id -> Conn) and ``inflight`` (delivery tag
-> Delivery); a consumer's credit is its prefetch minus what it holds unacked.
"""

from __future__ import annotations


class Consumer:
    __slots__ = ("tag", "conn", "queues", "prefetch", "unacked", "slots", "asked_at", "fed", "recalled_at",
                 "recall_pending")

    def __init__(self, tag, conn, queues, prefetch, slots=0):
        self.tag = tag
        self.conn = conn
        self.queues = queues  # list[Queue], preference order
        self.prefetch = prefetch
        self.unacked = 0
        # CONSUME option "slots" (protocol.md §5.3): it runs at most this many deliveries at
        # once and answers RECALL; 0: it never said (a version-1 client), so it is never recalled.
        self.slots = slots
        self.asked_at = -1e18  # when it last asked others to give back (it was idle), by `now`
        self.fed = False  # it received released deliveries since it last asked: it may ask again now
        self.recalled_at = -1e18  # when it was last sent a RECALL ...
        self.recall_pending = False  # ... and that RECALL is not answered by a RELEASE yet

    @property
    def credit(self):
        return self.prefetch - self.unacked


class Delivery:
    __slots__ = ("tag", "msg", "consumer", "conn", "deadline")

    def __init__(self, tag, msg, consumer, conn, deadline):
        self.tag = tag
        self.msg = msg
        self.consumer = consumer
        self.conn = conn
        self.deadline = deadline


class Conn:
    __slots__ = ("id", "name", "consumers", "deliveries")

    def __init__(self, id, name):
        self.id = id
        self.name = name
        self.consumers: dict[int, Consumer] = {}
        self.deliveries: dict[int, Delivery] = {}
