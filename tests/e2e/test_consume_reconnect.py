"""consume() after a lost connection reconnects (issue 16 item 5: workers resubscribe), as every
other call of a client with reconnect on does: a consumer ended by a kill -9 of its brokerd is
replaced by calling consume() again, without another call to reconnect first.  (Found by
bench/failover_soak.py: its consumers met ConnectionLost on every consume after the first
failover, and consumed nothing more.)

A real brokerd on loopback with a real data dir, killed and restarted by pid.
"""

from __future__ import annotations

import pytest

from client import Client
from client.errors import ConnectionLost
from tests.support.broker import BrokerProcess

WAIT = 20.0  # seconds any wait here may take at most


def test_consume_after_the_broker_was_killed_reconnects_and_gets_what_was_confirmed(tmp_path):
    b = BrokerProcess(tmp_path / "b").start()
    try:
        c = Client(b.address, timeout=5)
        c.publish("q", b"one")
        cons = c.consume("q", prefetch=1)
        first = cons.get(WAIT)
        assert first is not None and first.body == b"one"
        b.kill()
        b.restart()
        with pytest.raises(ConnectionLost):
            cons.get(WAIT)  # this consumer ended with its connection
        again = c.consume("q", prefetch=1)  # the call itself reconnects
        assert c.reconnects == 1
        d = again.get(WAIT)
        assert d is not None and d.body == b"one" and d.redelivered  # never acked: it comes back
        d.ack(wait=True)
        c.close()
    finally:
        b.kill()
