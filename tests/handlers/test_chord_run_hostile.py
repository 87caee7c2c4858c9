"""CHORD's field 6 (``{run}``, protocol.md §5.27 "Runs") through the binary handler: a hostile
value costs its own request (BAD_REQUEST naming what was wrong), declares nothing, and the next
healthy CHORD on the same state works."""

import cbor2
import pytest

from broker.handlers.binary import handle
from broker.state import BrokerState
from client import wire

BODY = {"queue": "q", "body": {"task": "proj.tsum", "id": "body-1", "args": [], "kwargs": {}}}


@pytest.fixture
def s():
    s = BrokerState()
    s.connect(1)
    return s


@pytest.mark.parametrize("options, words", [
    ({"run": 5}, "chord run must be a text string"),
    ({"run": ""}, "chord run must be a text string"),
    ({"run": "r" * 100_000}, "chord run must be a text string"),
    ({"run": cbor2.CBORTag(55799, "r1")}, "chord run must be a text string"),
    ({"run": [[[[["deep"]]]]]}, "chord run must be a text string"),
    ({"run": "r1", "speed": 1}, "unknown CHORD option 'speed'"),
    ([("run", "r1")], "options"),
    ("run", "options"),
])
def test_a_hostile_chord_run_costs_only_its_request(s, options, words):
    r = handle(s, 1, [wire.OP_CHORD, 7, "c1", ["a", "b"], BODY, None, options], 0.0)
    assert r[0] == wire.OP_ERROR and r[2] == "BAD_REQUEST" and words in r[3], r
    assert "c1" not in s.chords
    ok = handle(s, 1, [wire.OP_CHORD, 8, "c1", ["a", "b"], BODY, None, {"run": "r\x00\x1b1"}], 0.0)
    assert ok[0] == wire.OP_OK, ok  # control characters are text like any other: declared
    assert "c1" in s.chords
    assert handle(s, 1, [wire.OP_PING, 9], 0.0)[0] == wire.OP_OK
