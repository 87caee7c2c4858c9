"""Flow control in BrokerState (issue 15): rate limits, concurrency caps, tenants; the clock passed in."""

import pytest

from broker.errors import BadRequest
from broker.state import BrokerState
from broker.state import log_records as R
from broker.state.flow import parse_rate
from client.wire import OP_DELIVER

P, C, C2 = 1, 2, 3


def deliveries(state, conn):
    return [f for f in state.take_outbox().get(conn, []) if f[0] == OP_DELIVER]


def bodies(frames):
    return [f[5] for f in frames]


@pytest.fixture
def s():
    st = BrokerState()
    for c in (P, C, C2):
        st.connect(c)
    return st


def pub(s, body, now=0.0, queue="q", prio=0, **headers):
    h = {k.replace("_", "-"): v for k, v in headers.items()} or None
    return s.publish(P, queue, body, None, prio, now, headers=h)


def run_clock(s, conn, until):
    """Tick the state from 0 to ``until`` as the server would, acking each delivery at once;
    [(time, body)] of what was delivered."""
    got = []
    t = 0.0

    def drain():
        while True:
            ds = deliveries(s, conn)
            if not ds:
                return
            for d in ds:
                got.append((t, d[5]))
                s.ack(conn, d[2], t)

    while True:
        drain()
        nxt = s.tick(t)
        drain()
        if nxt > until:
            return got
        t = max(nxt, t + 0.001)


# -- rate limits ---------------------------------------------------------------------------------
def test_parse_rate_reads_celerys_syntax():
    assert parse_rate("10/s") == (10.0, "10/s")
    assert parse_rate("120/m") == (2.0, "120/m")
    assert parse_rate("3600/h") == (1.0, "3600/h")
    assert parse_rate(5) == (5.0, "5/s")
    assert parse_rate("0") == (None, None) and parse_rate(None) == (None, None)
    for bad in ("ten/s", "10/d", "-1/s", "inf/s", [1]):
        with pytest.raises(BadRequest):
            parse_rate(bad)


def test_a_task_rate_limit_paces_deliveries_with_a_burst_of_one(s):
    for i in range(50):
        pub(s, b"%d" % i, x_task="sms", x_rate_limit="10/s")
    s.consume(C, ["q"], 100, 0.0)
    got = run_clock(s, C, 2.95)
    # burst 1: one at once, then one every 0.1 s: 30 in [0, 2.95]
    assert len(got) == 30
    times = [t for t, _ in got]
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(times, times[1:]))
    assert [b for _, b in got] == [b"%d" % i for i in range(30)]  # FIFO kept through the parking
    s.check_invariants()


def test_an_unlimited_task_is_not_delayed_behind_a_limited_one(s):
    for i in range(20):
        pub(s, b"slow%d" % i, x_task="sms", x_rate_limit="1/m")
    for i in range(5):
        pub(s, b"fast%d" % i, x_task="mail")
    s.consume(C, ["q"], 2, 0.0)
    got = run_clock(s, C, 0.01)
    assert [b for _, b in got] == [b"slow0"] + [b"fast%d" % i for i in range(5)]
    assert s.queues["q"].waiting_count == 19 and s.queues["q"].ready_count == 0
    s.check_invariants()


def test_a_queue_rate_limit_from_declare_paces_every_message_of_the_queue(s):
    s.declare("q", {"rate_limit": "5/s"}, 0.0)
    for i in range(20):
        pub(s, b"%d" % i)
    s.consume(C, ["q"], 100, 0.0)
    assert len(run_clock(s, C, 0.95)) == 5


def test_a_limit_set_live_takes_effect_at_once_and_wins_over_the_tasks_own(s):
    for i in range(100):
        pub(s, b"%d" % i, x_task="sms", x_rate_limit="1/m")
    s.consume(C, ["q"], 100, 0.0)
    assert len(deliveries(s, C)) == 1
    assert s.rate_limit("sms", "20/s", None, 0.5) == {"kind": "task", "name": "sms", "limit": "20/s",
                                                      "previous": "1/m"}
    got = []
    t = 0.5
    while t < 1.5:
        got += deliveries(s, C)
        t = max(s.tick(t), t + 0.001)
    assert 18 <= len(got) <= 21
    pub(s, b"late", x_task="sms", x_rate_limit="1/m")  # the decorator's value does not undo a live one
    assert s._task_rates["sms"].text == "20/s"
    s.rate_limit("sms", 0, None, 2.0)  # lifted: everything held goes at once
    assert len(deliveries(s, C)) == 100 - 1 - len(got)


def test_rate_limits_are_logged_and_come_back_on_replay_and_after_compaction():
    s = BrokerState()
    s.enable_log()
    s.connect(P)
    s.declare("q", {"rate_limit": "5/s"}, 0.0)
    s.rate_limit("sms", "7/m", None, 0.0)
    s.rate_limit("q", "2/s", "queue", 0.0)
    recs = [(i + 1, t, p) for i, (t, p) in enumerate(s.take_records())]
    assert (R.RATE, ["task", "sms", "7/m"]) in [(t, p) for _, t, p in recs]
    again = BrokerState()
    again.replay(recs, 1.0)
    assert again._task_rates["sms"].text == "7/m" and again.queues["q"].rate_gate.text == "2/s"
    again.enable_log()
    again.last_lsn = len(recs)
    again.compact(len(recs))
    compacted = [(i + 1, t, p) for i, (t, p) in enumerate(again.take_records())]
    third = BrokerState()
    third.replay(compacted, 2.0)
    assert third._task_rates["sms"].text == "7/m" and third.queues["q"].rate_gate.text == "2/s"


def test_parked_messages_survive_compaction_and_replay():
    s = BrokerState()
    s.enable_log()
    s.connect(P)
    s.connect(C)
    for i in range(5):
        pub(s, b"%d" % i, x_task="sms", x_rate_limit="1/m")
    s.consume(C, ["q"], 10, 0.0)
    assert s.queues["q"].waiting_count == 4
    recs = [(i + 1, t, p) for i, (t, p) in enumerate(s.take_records())]
    s.compact(len(recs))
    compacted = [(len(recs) + i + 1, t, p) for i, (t, p) in enumerate(s.take_records())]
    again = BrokerState()
    again.replay(compacted, 1.0)
    assert again.queues["q"].ready_count == 5  # the four parked and the one in flight
    assert again._task_rates["sms"].text == "1/m"  # from the messages' own header


def test_bad_flow_headers_are_refused_by_name_and_store_nothing(s):
    for headers, words in [
        ({"x-tenant": 42}, "x-tenant"),
        ({"x-tenant": "a", "x-tenant-weight": 0}, "x-tenant-weight"),
        ({"x-task": "t", "x-rate-limit": "fast"}, "x-rate-limit"),
        ({"x-rate-limit": "1/s"}, "x-task"),
        ({"x-task": "t", "x-max-concurrency": -1}, "x-max-concurrency"),
        ({"x-concurrency-key": "k"}, "x-max-concurrency"),
        ({"x-task": "t" * 300}, "200 bytes"),
        ({"x-tenant": ["a"]}, "x-tenant"),
    ]:
        with pytest.raises(BadRequest, match=words):
            s.publish(P, "q", b"x", None, 0, 0.0, headers=headers)
    assert s.queues["q"].published == 0 and s.queues["q"].length == 0


# -- concurrency caps ---------------------------------------------------------------------------
def test_a_concurrency_cap_holds_in_flight_to_its_limit_across_consumers(s):
    for i in range(10):
        pub(s, b"%d" % i, x_task="api", x_max_concurrency=3)
    pub(s, b"other", x_task="free")
    s.consume(C, ["q"], 4, 0.0)
    s.consume(C2, ["q"], 4, 0.0)
    a, b = deliveries(s, C), deliveries(s, C2)
    assert sorted(bodies(a + b)) == sorted([b"0", b"1", b"2", b"other"])
    held = [d for d in a + b if d[5] != b"other"]
    s.ack(C if held[0] in a else C2, held[0][2], 0.0)  # a slot frees: exactly one more goes
    more = deliveries(s, C) + deliveries(s, C2)
    assert bodies(more) == [b"3"]
    s.check_invariants()


def test_a_cap_slot_comes_back_on_nack_and_on_disconnect(s):
    for i in range(4):
        pub(s, b"%d" % i, x_task="api", x_max_concurrency=1, x_concurrency_key="partner")
    s.consume(C, ["q"], 4, 0.0)
    (d,) = deliveries(s, C)
    s.nack(C, d[2], 0.0, requeue=False)
    (d,) = deliveries(s, C)
    assert d[5] == b"1"
    s.connect(9)
    s.consume(9, ["q"], 4, 0.0)
    assert deliveries(s, 9) == []
    s.disconnect(C, 0.0)
    assert bodies(deliveries(s, 9)) == [b"1"]
    s.check_invariants()


# -- tenants ---------------------------------------------------------------------------------
def test_a_small_tenant_is_not_starved_by_a_big_one(s):
    for i in range(1000):
        pub(s, b"A%d" % i, x_tenant="A")
    for i in range(10):
        pub(s, b"B%d" % i, x_tenant="B")
    s.consume(C, ["q"], 20, 0.0)
    first = bodies(deliveries(s, C))
    assert sum(1 for b in first if b.startswith(b"B")) == 10
    assert [b for b in first if b.startswith(b"A")] == [b"A%d" % i for i in range(10)]  # FIFO within


def test_weighted_tenants_get_their_share(s):
    for i in range(600):
        pub(s, b"A", x_tenant="A", x_tenant_weight=3)
        pub(s, b"B", x_tenant="B")
    s.consume(C, ["q"], 400, 0.0)
    got = bodies(deliveries(s, C))
    assert abs(got.count(b"A") / 400 - 0.75) < 0.075


def test_priority_comes_before_tenant_turns(s):
    pub(s, b"A-low", x_tenant="A")
    pub(s, b"B-high", prio=5, x_tenant="B")
    pub(s, b"A-high", prio=5, x_tenant="A")
    s.consume(C, ["q"], 10, 0.0)
    assert bodies(deliveries(s, C))[:2] == [b"B-high", b"A-high"]


def test_untenanted_messages_already_waiting_keep_their_turn(s):
    for i in range(3):
        pub(s, b"plain%d" % i)
    pub(s, b"T0", x_tenant="T")
    s.consume(C, ["q"], 10, 0.0)
    assert bodies(deliveries(s, C)) == [b"plain0", b"T0", b"plain1", b"plain2"]
    assert s.queues["q"].tenants() == {}  # nothing ready: idle tenants are not kept


def test_what_a_task_gate_holds_for_an_idle_queue_does_not_hold_up_another_queue(s):
    s.rate_limit("sms", "10/s", None, 0.0)
    for i in range(5):
        s.publish(P, "idle", b"idle%d" % i, None, 0, 0.0, headers={"x-task": "sms"})
    s.consume(C2, ["idle"], 5, 0.0)
    s.cancel(C2, 1)  # the idle queue's consumer went away, holding idle0: four are parked
    (d,) = deliveries(s, C2)
    assert s.queues["idle"].waiting_count == 4
    for i in range(3):
        s.publish(P, "busy", b"busy%d" % i, None, 0, 0.0, headers={"x-task": "sms"})
    s.consume(C, ["busy"], 10, 0.0)
    got = [b for _, b in run_clock(s, C, 0.35)]
    assert got == [b"busy0", b"busy1", b"busy2"]  # one per token; none went to the idle queue
    assert s.queues["idle"].waiting_count == 4


def test_a_fast_rate_far_above_the_traffic_holds_nothing_back_within_one_batch(s):
    s.rate_limit("bulk", "100000/s", None, 0.0)
    for i in range(500):
        pub(s, b"%d" % i, x_task="bulk")
    s.consume(C, ["q"], 1000, 0.0)  # 500 deliveries at one `now`, as one batch of frames
    assert len(deliveries(s, C)) == 500 and s.queues["q"].waiting_count == 0


def test_task_rate_limits_are_bounded_and_the_one_too_many_is_refused_whole(s, monkeypatch):
    import broker.state.flowcontrol as fc

    monkeypatch.setattr(fc, "MAX_TASK_RATES", 3)
    for i in range(3):
        pub(s, b"x", x_task=f"t{i}", x_rate_limit="1/s")
    with pytest.raises(BadRequest, match="at most 3 task names"):
        pub(s, b"x", x_task="t3", x_rate_limit="1/s")
    assert s.queues["q"].published == 3
    pub(s, b"x", x_task="t0", x_rate_limit="2/s")  # a known task may still change its own
    with pytest.raises(BadRequest, match="at most 3 task names"):
        s.rate_limit("t4", "1/s", None, 0.0)


def test_the_pages_tenant_table_is_bounded_and_busiest_first(s):
    """tenant_table (the page's "Tenants per queue"): only queues in tenant turns, the busiest tenants
    first, at most ``tenants_max`` each and ``queues_max`` queues, with the full count kept."""
    pub(s, b"plain", queue="untenanted")
    for i in range(30):
        for _ in range(i % 4 + 1):
            pub(s, b"x", queue="q", **{"x-tenant": f"t{i:02d}"})
    pub(s, b"x", queue="other", **{"x-tenant": "solo", "x-tenant-weight": 2})
    rows = s.tenant_table(tenants_max=5)
    assert [r["queue"] for r in rows] == ["q", "other"]  # most ready first; the untenanted queue absent
    q = rows[0]
    assert q["tenants"] == 30 and len(q["top"]) == 5
    assert [t["ready"] for t in q["top"]] == [4, 4, 4, 4, 4]
    assert rows[1]["top"] == [{"tenant": "solo", "ready": 1, "weight": 2}]
    assert len(s.tenant_table(queues_max=1)) == 1
