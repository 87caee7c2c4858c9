"""A worker's results read together (a run of RESULT_SETs in one read) against a real brokerd: the
consumer is refilled after the run, whether the run ends the read or another frame follows it,
and every result is stored and its delivery acked."""

from __future__ import annotations

from client import wire
from tests.support.wireclient import Raw


def results(frames_of, tail=()):
    return wire.encode_many([*frames_of, *tail])


def test_a_run_of_results_in_one_read_refills_the_consumer(broker):
    p = Raw(broker.port)
    for i in range(8):
        p.ok(wire.OP_PUBLISH, "q", b"x", f"m{i}", 0, None)
    r = Raw(broker.port, version=2)  # a worker's protocol: replies by range, deliveries in batches
    r.ok(wire.OP_CONSUME, ["q"], 2, {"slots": 2})
    got = r.deliveries(2)
    rids = []

    def run(ds, tail=()):
        frames = []
        for d in ds:
            rid = r.next_rid()
            rids.append(rid)
            frames.append([wire.OP_RESULT_SET, rid, d[4], "SUCCESS", None, None, {"ttl": 60, "tag": d[2]}])
        r.send_raw(results(frames, tail))

    run(got)  # the run ends the read
    for rid in rids:
        assert r.reply(rid)[0] in (wire.OP_OK, wire.OP_CONFIRM_RANGE)
    got = r.deliveries(2)
    assert [d[4] for d in got] == ["m2", "m3"]
    stats_rid = r.rid + 3
    run(got, tail=[[wire.OP_STATS, stats_rid, "q"]])  # another frame follows the run in the same read
    r.rid = stats_rid
    assert r.reply(stats_rid)[0] == wire.OP_OK
    got = r.deliveries(2)
    assert [d[4] for d in got] == ["m4", "m5"]
    stats = r.ok(wire.OP_STATS, "q")
    assert stats["acked"] == 4 and stats["inflight"] == 2
    for i in range(4):
        res = r.ok(wire.OP_RESULT_GET, f"m{i}", None)
        assert res["state"] == "SUCCESS", res
    r.close()
    p.close()
