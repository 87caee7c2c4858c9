"""Schedules, revokes and chords kept by the broker, with a controlled clock."""

import datetime as dt
import shutil
from zoneinfo import ZoneInfo

import cbor2
import pytest

from broker.errors import NotFound, RequestError
from broker.state import BrokerState
from broker.state import log_records as R
from broker.state.cron import Crontab
from broker.wal import WriteAheadLog
from tests.wal.test_durability import Rig

W = 1
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc).timestamp()


def utc(*a):
    return dt.datetime(*a, tzinfo=dt.timezone.utc).timestamp()


def local(zone, *a, fold=0):
    return dt.datetime(*a, tzinfo=ZoneInfo(zone), fold=fold).timestamp()


@pytest.fixture
def s():
    st = BrokerState()
    st.connect(W)
    return st


def fired_ids(state, queue="celery"):
    return [m.id for m in state.peek(queue, 1000)] if queue in state.queues else []


# -- crontab next-fire times ------------------------------------------------------------

CRON_CASES = [
    # (expr, tz, after, expected next)
    ("0 * * * *", "UTC", utc(2026, 1, 31, 23, 30), utc(2026, 2, 1, 0, 0)),          # month end
    ("0 0 31 * *", "UTC", utc(2026, 4, 1), utc(2026, 5, 31)),                       # skips 30-day months
    ("0 0 29 2 *", "UTC", utc(2026, 3, 1), utc(2028, 2, 29)),                       # leap day
    ("*/15 9-17 * * mon-fri", "UTC", utc(2026, 11, 27, 17, 50), utc(2026, 11, 30, 9, 0)),  # Fri evening → Mon
    ("30 2 * * *", "UTC", utc(2026, 12, 31, 3, 0), utc(2027, 1, 1, 2, 30)),         # year end
    ("0 0 1-7 * mon", "UTC", utc(2026, 1, 1), utc(2026, 1, 5)),                     # dom AND dow, Celery's reading
    ("0 12 * * 0", "UTC", utc(2026, 11, 23), utc(2026, 11, 29, 12)),               # 0 = Sunday
    ("0 12 * * 7", "UTC", utc(2026, 11, 23), utc(2026, 11, 29, 12)),               # 7 = Sunday too
    ("0 9 * jan,jul *", "UTC", utc(2026, 2, 1), utc(2026, 7, 1, 9)),
    # DST in Europe/Paris: 2026-03-29 02:00 local jumps to 03:00; 2026-10-25 03:00 falls back to 02:00
    ("30 2 * * *", "Europe/Paris", utc(2026, 3, 28, 12), local("Europe/Paris", 2026, 3, 29, 3, 0)),  # in the gap: first instant after
    ("30 2 * * *", "Europe/Paris", utc(2026, 10, 24, 12), local("Europe/Paris", 2026, 10, 25, 2, 30, fold=0)),  # twice: first
    ("0 9 * * *", "Europe/Paris", utc(2026, 3, 29, 0), local("Europe/Paris", 2026, 3, 29, 9, 0)),
]


@pytest.mark.parametrize("expr,tz,after,want", CRON_CASES)
def test_crontab_next_fire_times(expr, tz, after, want):
    assert Crontab(expr, tz).next_after(after) == want


def test_a_repeated_autumn_hour_fires_once():
    c = Crontab("30 2 * * *", "Europe/Paris")
    first = c.next_after(utc(2026, 10, 24, 12))
    assert c.next_after(first) > first + 23 * 3600  # the second 02:30 is not another tick


@pytest.mark.parametrize("expr,message", [
    ("0 25 * * *", r"^crontab field hour: 25 is out of range 0-23$"),
    ("* * * *", r"^a crontab has 5 fields \(minute hour day-of-month month day-of-week\), got 4 in '\* \* \* \*'$"),
    ("0 0 * foo *", r"^crontab field month_of_year: 'foo' is not a number or a name$"),
    ("*/0 * * * *", r"^crontab field minute: step must be >= 1$"),
    ("0 0 5-1 * *", r"^crontab field day_of_month: range '5-1' runs backwards$"),
])
def test_a_bad_crontab_is_refused_naming_the_field(s, expr, message):
    with pytest.raises(RequestError, match=message):
        s.schedule_put("bad", {"cron": expr, "body": {"task": "t"}}, T0)
    assert "bad" not in s.schedules


def test_an_unknown_time_zone_is_refused(s):
    with pytest.raises(RequestError, match=r"^unknown time zone 'Mars/Base'"):
        s.schedule_put("x", {"cron": "0 0 * * *", "tz": "Mars/Base", "body": {}}, T0)


# -- firing ---------------------------------------------------------------------------------

def put_every(s, name="tick", every=10.0, catchup="latest", **extra):
    return s.schedule_put(name, {"every": every, "body": {"task": "proj.tick", "args": [], "kwargs": {}},
                                 "catchup": catchup, **extra}, T0)


def test_an_interval_entry_fires_once_per_tick_never_early(s):
    put_every(s)
    s.tick(T0 + 9.999)
    assert fired_ids(s) == []
    s.tick(T0 + 10.0)
    assert fired_ids(s) == [f"tick@{T0 + 10:.3f}"]
    s.tick(T0 + 10.5)
    s.tick(T0 + 19.9)
    assert len(fired_ids(s)) == 1
    s.tick(T0 + 20.2)
    assert len(fired_ids(s)) == 2
    env = cbor2.loads(s.peek("celery")[1].body)
    assert env["task"] == "proj.tick" and env["id"] == env["root_id"] == f"tick@{T0 + 20:.3f}"


@pytest.mark.parametrize("policy,expected", [
    ("latest", [T0 + 100]),
    ("all", [T0 + 10 * k for k in range(1, 11)]),
    ("skip", []),
])
def test_after_downtime_each_catchup_policy_fires_what_it_promises(s, policy, expected):
    put_every(s, catchup=policy)
    s.tick(T0 + 108.0)  # down until 8 s after the 10th tick: all ten were missed
    assert fired_ids(s) == [f"tick@{t:.3f}" for t in expected]
    assert s.schedules["tick"].last_tick == T0 + 100
    s.tick(T0 + 110.5)  # then on time again, whatever the policy
    assert fired_ids(s)[-1] == f"tick@{T0 + 110:.3f}"


def test_expires_makes_a_late_firing_drop_instead_of_pile_up(s):
    put_every(s, expires=5.0)
    s.tick(T0 + 10)
    s.tick(T0 + 16)  # nobody consumed it within 5 s
    assert s.queues["celery"].ready_count == 0 and s.queues["celery"].expired == 1


def test_putting_the_same_entry_again_changes_nothing(s):
    put_every(s)
    s.tick(T0 + 10)
    before = s.schedules["tick"].to_wire()
    put_every(s)
    assert s.schedules["tick"].to_wire() == before and len(s.schedules) == 1


def test_a_paused_entry_skips_its_ticks(s):
    put_every(s)
    s.schedule_pause("tick", True, T0 + 5)
    s.tick(T0 + 35)
    assert fired_ids(s) == []
    s.schedule_pause("tick", False, T0 + 35)
    s.tick(T0 + 40)
    assert fired_ids(s) == [f"tick@{T0 + 40:.3f}"]


def test_crash_at_every_byte_never_fires_a_tick_twice(tmp_path):
    rig = Rig(tmp_path / "wal")
    s = rig.state
    rig.op(s.schedule_put, "tick", {"every": 10.0, "body": {"task": "t"}, "catchup": "all"}, T0)
    for k in range(1, 7):
        rig.op(s.tick, T0 + 10 * k)
    rig.wal.close()
    (seg,) = sorted((tmp_path / "wal").glob("*.wal"))
    data = seg.read_bytes()
    cut_dir = tmp_path / "cut"
    for cut in range(24, len(data) + 1, 3):
        shutil.rmtree(cut_dir, ignore_errors=True)
        cut_dir.mkdir()
        (cut_dir / seg.name).write_bytes(data[:cut])
        wal = WriteAheadLog(str(cut_dir), fsync="never")
        st = BrokerState()
        st.replay(((r.lsn, r.type, cbor2.loads(r.payload)) for r in wal.open()), T0 + 60)
        wal.close()
        before = fired_ids(st)
        st.tick(T0 + 60)  # the broker comes back at the time of the 6th tick
        after = fired_ids(st)
        assert len(after) == len(set(after)), f"cut at {cut}: a tick fired twice: {after}"
        assert after[: len(before)] == before
        if "tick" in st.schedules:
            assert after[-1] == f"tick@{T0 + 60:.3f}", f"cut at {cut}: the current tick was lost"


def test_removing_an_entry_stops_it(s):
    put_every(s)
    assert s.schedule_remove("tick", T0) is True
    s.tick(T0 + 100)
    assert fired_ids(s) == [] and s.schedule_remove("tick", T0) is False


def test_schedule_tick_cost_does_not_grow_with_idle_entries(s):
    for i in range(2000):
        s.schedule_put(f"e{i}", {"every": 3600.0 + i, "body": {"task": "t"}}, T0)
    s.tick(T0 + 1)
    assert len(s._sched_due) == 2000 and fired_ids(s) == []


# -- revokes --------------------------------------------------------------------------------

def test_a_revoked_task_is_never_delivered_and_is_revoked(s):
    s.publish(W, "celery", b"x", "t1", 0, T0, delay=30)
    s.publish(W, "celery", b"y", "t2", 0, T0)
    s.revoke(["t1", "t2"], T0)
    assert s.result_get(W, 1, "t1", T0)["state"] == "REVOKED"
    s.connect(2)
    s.consume(2, ["celery"], 10, T0)
    s.tick(T0 + 31)
    assert s.take_outbox().get(2) is None
    assert s.queues["celery"].ready_count == 0


def test_a_revoke_leaves_a_started_task_its_state_unless_it_terminates(s):
    """As Celery's own revoke: a task a worker has started (STARTED, or its own state such as
    PROGRESS) runs on without terminate, and its worker stores the outcome; one not started is
    REVOKED at once; a finished one keeps its result."""
    s.result_set(W, "started", "STARTED", None, {"hostname": "other@host"}, T0)
    s.result_set(W, "progress", "PROGRESS", {"done": 3}, None, T0)
    s.result_set(W, "retrying", "RETRY", None, None, T0)
    s.result_set(W, "done", "SUCCESS", 2, None, T0)
    s.revoke(["started", "progress", "retrying", "done", "unknown"], T0)
    state = {t: s.result_get(W, 1, t, T0)["state"] for t in ("started", "progress", "retrying", "done", "unknown")}
    assert state == {"started": "STARTED", "progress": "PROGRESS", "retrying": "REVOKED", "done": "SUCCESS",
                     "unknown": "REVOKED"}
    s.revoke(["started", "progress", "done"], T0, terminate=True)  # stopped where it runs: REVOKED now
    assert [s.result_get(W, 1, t, T0)["state"] for t in ("started", "progress", "done")] == [
        "REVOKED", "REVOKED", "SUCCESS"]


def test_revokes_survive_replay_and_expire(s):
    s.enable_log()
    s.revoke("t1", T0, ttl=100)
    recs = [(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(s.take_records())]
    fresh = BrokerState()
    fresh.replay(recs, T0 + 50)
    assert "t1" in fresh.revoked
    fresh.tick(T0 + 100)
    assert "t1" not in fresh.revoked


# -- chords ---------------------------------------------------------------------------------

def body_spec(task="proj.tsum", tid="body-1"):
    return {"queue": "celery", "body": {"task": task, "id": tid, "args": [], "kwargs": {}}}


def test_a_chord_body_runs_once_with_the_results_in_member_order(s):
    s.chord_declare("c1", ["m1", "m2", "m3"], body_spec(), None, T0)
    for m, v in (("m3", 3), ("m1", 1), ("m1", 1), ("m2", 2)):  # m1 twice: a redelivered member
        s.result_set(W, m, "SUCCESS", v, None, T0)
    (msg,) = s.peek("celery")
    env = cbor2.loads(msg.body)
    assert env["id"] == "body-1" and env["args"] == [[1, 2, 3]]
    assert "c1" not in s.chords


def test_a_failed_member_calls_the_error_callback_and_not_the_body(s):
    err = {"queue": "errors", "body": {"task": "proj.on_chord_error", "args": [], "kwargs": {}}}
    s.chord_declare("c1", ["m1", "m2"], body_spec(), err, T0)
    s.result_set(W, "m1", "FAILURE", None, {"exc_type": "ValueError", "exc_message": "bad"}, T0)
    s.result_set(W, "m2", "SUCCESS", 2, None, T0)
    assert "celery" not in s.queues or s.queues["celery"].ready_count == 0
    (msg,) = s.peek("errors")
    assert cbor2.loads(msg.body)["args"] == ["m1", "ValueError", "bad"]
    body = s.result_get(W, 1, "body-1", T0)
    assert body["state"] == "FAILURE" and body["meta"]["exc_type"] == "ChordError"


def test_a_chord_whose_last_result_was_logged_but_not_its_firing_fires_once_after_restart(s):
    s.enable_log()
    s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0)
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    s.result_set(W, "m2", "SUCCESS", 2, None, T0)
    recs = [(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(s.take_records())]
    from broker.state import log_records as R

    # the crash cut the log right after the last member's RESULT
    cut = [r for r in recs if r[1] != R.CHORD_FIRE]
    for records, label in ((recs, "complete log"), (cut, "firing lost")):
        fresh = BrokerState()
        fresh.enable_log()
        fresh.replay(records, T0)
        bodies = [m for m in fresh.live_messages() if m.id == "body-1"]
        assert len(bodies) == 1, label
        # what replay decided (the firing) is logged, so a second restart does not fire again
        decided = [(0, t2, cbor2.loads(cbor2.dumps(p2))) for t2, p2 in fresh.take_records()]
        third = BrokerState()
        third.replay([(i + 1, t, p) for i, (_, t, p) in enumerate(records + decided)], T0)
        assert len([m for m in third.live_messages() if m.id == "body-1"]) == 1, label


def test_bad_chords_are_refused(s):
    with pytest.raises(RequestError, match=r"^chord members must be distinct task ids$"):
        s.chord_declare("c", ["a", "a"], body_spec(), None, T0)
    with pytest.raises(RequestError, match=r"^chord body must be a map with 'queue' and 'body'"):
        s.chord_declare("c", ["a"], {"queue": "q"}, None, T0)


def raw_spec(mid="body-1", body=b'[[], {}, {}]'):
    return {"queue": "celery", "priority": 3,
            "message": {"body": body, "id": mid, "headers": {"task": "proj.tsum", "kombu": {"x": 1}}}}


def test_a_raw_chord_body_is_published_verbatim_with_the_results_in_a_header(s):
    """The raw variant (Celery's messages): body bytes and headers untouched, results in x-chord-results."""
    s.chord_declare("c1", ["m1", "m2"], raw_spec(), None, T0)
    s.result_set(W, "m2", "SUCCESS", {"b": 2}, None, T0)
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    (msg,) = s.peek("celery")
    assert msg.body == b'[[], {}, {}]' and msg.id == "body-1" and msg.priority == 3
    # x-chord-last: the member whose result completed it (Celery makes that task the body's parent)
    assert msg.headers == {"task": "proj.tsum", "kombu": {"x": 1}, "x-chord-results": [1, {"b": 2}],
                           "x-chord-last": "m1"}


def test_a_raw_chord_fails_its_body_and_sends_the_raw_error_message_once(s):
    err = {"queue": "errors", "message": {"body": b"e", "id": "err-1"}}
    s.chord_declare("c1", ["m1", "m2"], raw_spec(), err, T0)
    s.result_set(W, "m1", "FAILURE", None, {"exc_type": "ValueError", "exc_message": "bad"}, T0)
    s.result_set(W, "m2", "FAILURE", None, {"exc_type": "KeyError", "exc_message": "k"}, T0)
    assert "celery" not in s.queues or s.queues["celery"].ready_count == 0
    (msg,) = s.peek("errors")
    assert msg.body == b"e" and msg.headers["x-chord-error"] == {"member": "m1", "exc_type": "ValueError", "exc_message": "bad"}
    body = s.result_get(W, 1, "body-1", T0)
    assert body["state"] == "FAILURE" and "chord member m1 failed" in body["meta"]["exc_message"]


def test_a_raw_chord_fires_once_after_replay(s):
    s.enable_log()
    s.chord_declare("c1", ["m1"], raw_spec(), None, T0)
    s.result_set(W, "m1", "SUCCESS", 5, None, T0)
    recs = [(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(s.take_records())]
    fresh = BrokerState()
    fresh.replay(recs, T0)
    (msg,) = [m for m in fresh.live_messages() if m.id == "body-1"]
    assert msg.headers["x-chord-results"] == [5] and msg.body == b'[[], {}, {}]'


@pytest.mark.parametrize("message,error", [
    ({"body": "text"}, r"^chord body 'message' must be a map with 'body' \(a byte string\)$"),
    ({"body": b"x", "id": ""}, r"^chord body message id must be a text string of 1 to 255 characters$"),
    ({"body": b"x", "headers": [1]}, r"^chord body message headers must be a map$"),
    ({"body": b"x", "queue": "q"}, r"^chord body 'message' has unknown key\(s\) 'queue'; known: body, id, headers$"),
])
def test_bad_raw_chord_messages_are_refused_with_what_is_wrong(s, message, error):
    with pytest.raises(RequestError, match=error):
        s.chord_declare("c", ["a"], {"queue": "q", "message": message}, None, T0)
    assert "c" not in s.chords


@pytest.mark.parametrize("spec,message", [
    ({"every": 10, "anchor": "soon", "body": {}}, r"^anchor must be a Unix time in seconds \(got 'soon'\)$"),
    ({"cron": "0 0 * * *", "tz": 5, "body": {}}, r"^tz must be an IANA time zone name"),
    ({"cron": "0 0 30 2 *", "body": {}}, r"never matches a date"),
    ({"every": 0.0001, "body": {}}, r"^every must be a number of seconds >= 0.001"),
    ({"every": 1, "owner": 7, "body": {}}, r"^owner must be a text string"),
])
def test_bad_schedule_fields_get_a_clear_error_not_an_internal_one(s, spec, message):
    with pytest.raises(RequestError, match=message):
        s.schedule_put("x", spec, T0)


def test_a_future_anchor_is_the_first_tick(s):
    s.schedule_put("a", {"every": 60, "anchor": T0 + 30, "body": {}}, T0)
    assert s.schedules["a"].next == T0 + 30


def test_a_long_downtime_with_a_tiny_interval_catches_up_in_bounded_work(s):
    s.schedule_put("fast", {"every": 0.001, "body": {"task": "t"}, "catchup": "all"}, T0)
    s.tick(T0 + 86400)  # a day of 1 ms ticks: 86 million; at most MAX_CATCHUP fire
    from broker.state.schedules import MAX_CATCHUP

    assert 0 < len(fired_ids(s)) <= MAX_CATCHUP


def test_a_retried_chord_declaration_after_its_body_fired_does_not_fire_again(s):
    s.chord_declare("c1", ["m1"], body_spec(), None, T0)
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    assert s.chord_declare("c1", ["m1"], body_spec(), None, T0) == {"chord": "c1", "pending": 0}
    assert len(s.peek("celery")) == 1


def test_members_finished_before_the_declaration_still_count_after_a_restart(s):
    s.enable_log()
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)  # finished before the chord existed
    s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0)
    recs = [(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(s.take_records())]
    fresh = BrokerState()
    fresh.enable_log()
    fresh.replay(recs, T0)
    fresh.connect(W)
    fresh.result_set(W, "m2", "SUCCESS", 2, None, T0)
    (msg,) = fresh.peek("celery")
    assert cbor2.loads(msg.body)["args"] == [[1, 2]]


def test_a_revoked_member_fails_the_chord(s):
    s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0)
    s.revoke("m1", T0)
    s.result_set(W, "m2", "SUCCESS", 2, None, T0)
    assert "celery" not in s.queues or not s.peek("celery")
    assert s.result_get(W, 1, "body-1", T0)["meta"]["exc_type"] == "ChordError"


def test_a_chord_message_priority_is_checked(s):
    with pytest.raises(RequestError, match=r"^chord body priority must be a whole number from 0 to 255 \(got 'high'\)$"):
        s.chord_declare("c", ["a"], {**body_spec(), "priority": "high"}, None, T0)


# -- CHORD_ADD: a chord that grows while it waits (Celery's add_to_chord, protocol.md §5.49) --------

def test_added_members_are_waited_for_and_their_results_follow_in_order(s):
    s.chord_declare("c1", ["m1"], raw_spec(), None, T0)
    # m1 is running and adds two tasks before it finishes (Celery's self.add_to_chord)
    assert s.chord_add("c1", ["a1", "a2"], T0) == {"chord": "c1", "pending": 3}
    s.result_set(W, "m1", "SUCCESS", 0, None, T0)
    s.result_set(W, "a2", "SUCCESS", 7, None, T0)
    assert "celery" not in s.queues or not s.peek("celery")  # without the added members it fired here
    s.result_set(W, "a1", "SUCCESS", 5, None, T0)
    (msg,) = s.peek("celery")
    assert msg.headers["x-chord-results"] == [0, 5, 7] and msg.headers["x-chord-last"] == "a1"


def test_an_added_member_that_already_finished_counts_and_a_repeat_changes_nothing(s):
    s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0)
    s.result_set(W, "a1", "SUCCESS", 9, None, T0)  # the added task ran before its CHORD_ADD arrived
    assert s.chord_add("c1", ["a1"], T0) == {"chord": "c1", "pending": 2}
    assert s.chord_add("c1", ["a1", "m2"], T0) == {"chord": "c1", "pending": 2}  # a retried CHORD_ADD
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    s.result_set(W, "m2", "SUCCESS", 2, None, T0)
    (msg,) = s.peek("celery")
    assert cbor2.loads(msg.body)["args"] == [[1, 2, 9]]


def test_a_failed_added_member_fails_the_chord(s):
    s.chord_declare("c1", ["m1"], body_spec(), None, T0)
    s.chord_add("c1", ["a1"], T0)
    s.result_set(W, "a1", "FAILURE", None, {"exc_type": "ValueError", "exc_message": "bad"}, T0)
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    assert "celery" not in s.queues or not s.peek("celery")
    assert "chord member a1 failed" in s.result_get(W, 1, "body-1", T0)["meta"]["exc_message"]


@pytest.mark.parametrize("cid,members,error", [
    ("c1", [], r"^CHORD_ADD members must be a non-empty list of task ids \(non-empty text strings\)$"),
    ("c1", "a1", r"^CHORD_ADD members must be a non-empty list of task ids"),
    ("c1", ["a1", 5], r"^CHORD_ADD members must be a non-empty list of task ids"),
    ("c1", ["a1", ""], r"^CHORD_ADD members must be a non-empty list of task ids"),
    ("c1", [["a1"]], r"^CHORD_ADD members must be a non-empty list of task ids"),
    ("c1", ["a1", "a1"], r"^CHORD_ADD members must be distinct task ids$"),
    ("", ["a1"], r"^a chord id is a non-empty text string$"),
    (None, ["a1"], r"^a chord id is a non-empty text string$"),
    ("c1", ["o1"], r"^task 'o1' is already a member of chord 'c2'; a task counts toward one chord$"),
    ("nope", ["a1"], r"^chord 'nope' is not waiting: it was never declared \(CHORD\)"),
])
def test_hostile_chord_adds_are_refused_naming_what_is_wrong_and_change_nothing(s, cid, members, error):
    s.chord_declare("c1", ["m1"], body_spec(), None, T0)
    s.chord_declare("c2", ["o1"], body_spec(tid="body-2"), None, T0)
    with pytest.raises((RequestError, NotFound), match=error):
        s.chord_add(cid, members, T0)
    assert s.chords["c1"]["members"] == ["m1"] and s.chords["c1"]["pending"] == {"m1"}


def test_adding_to_a_fired_chord_is_refused(s):
    s.chord_declare("c1", ["m1"], body_spec(), None, T0)
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    with pytest.raises(NotFound, match=r"^chord 'c1' is not waiting: it has already fired"):
        s.chord_add("c1", ["a1"], T0)
    assert len(s.peek("celery")) == 1


def test_added_members_survive_replay_and_compaction(s):
    from broker.state import log_records as R

    s.enable_log()
    s.chord_declare("c1", ["m1"], raw_spec(), None, T0)
    s.chord_add("c1", ["a1", "a2"], T0)
    s.result_set(W, "a1", "SUCCESS", 5, None, T0)
    recs = [(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(s.take_records())]
    assert [p for _, t, p in recs if t == R.CHORD_ADD] == [["c1", ["a1", "a2"]]]  # its own record
    replayed = BrokerState()
    replayed.enable_log()
    replayed.replay(recs, T0)
    # compaction rewrites the waiting chord with every member, the added ones included
    replayed.compact(len(recs))
    compacted = [(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(replayed.take_records())]
    for records, label in ((recs, "replayed"), (compacted, "compacted")):
        fresh = BrokerState()
        fresh.replay(records, T0)
        fresh.connect(W)
        assert fresh.chords["c1"]["pending"] == {"m1", "a2"}, label
        fresh.result_set(W, "m1", "SUCCESS", 0, None, T0)
        assert "celery" not in fresh.queues or not fresh.peek("celery"), label
        fresh.result_set(W, "a2", "SUCCESS", 7, None, T0)
        (msg,) = fresh.peek("celery")
        assert msg.headers["x-chord-results"] == [0, 5, 7], label


# -- chord runs: a frozen chord applied again (CHORD field 6, protocol.md §5.27 "Runs"; log record CHORD_RUN) --

def _records(state, start=0):
    return [(start + i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(state.take_records())]


def _bodies(state, queue="celery"):
    return [cbor2.loads(m.body)["args"] for m in state.peek(queue, 1000)] if queue in state.queues else []


def test_a_new_run_of_a_fired_chord_waits_for_new_results_and_fires_the_body_again(s):
    s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0)
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    s.result_set(W, "m2", "SUCCESS", 2, None, T0)
    assert _bodies(s) == [[[1, 2]]]
    # the same chord id again, as a new run: the stored results are the first run's and do not count
    assert s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0, run="r2") == {"chord": "c1", "pending": 2}
    assert s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0, run="r2") == {"chord": "c1", "pending": 2}
    s.result_set(W, "m2", "SUCCESS", 20, None, T0)
    assert _bodies(s) == [[[1, 2]]]  # without the run it would not wait; it waits for m1's new result
    s.result_set(W, "m1", "SUCCESS", 10, None, T0)
    assert _bodies(s) == [[[1, 2]], [[10, 20]]]
    # a retried CHORD of the run that fired, or one without a run, fires nothing
    assert s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0, run="r2") == {"chord": "c1", "pending": 0}
    assert s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0) == {"chord": "c1", "pending": 0}
    assert len(_bodies(s)) == 2


def test_a_first_declaration_with_a_run_counts_what_already_finished(s):
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    assert s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0, run="r1") == {"chord": "c1", "pending": 1}
    s.result_set(W, "m2", "SUCCESS", 2, None, T0)
    assert _bodies(s) == [[[1, 2]]]


def test_a_new_run_of_a_waiting_chord_drops_its_counts(s):
    s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0, run="r1")
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    assert s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0, run="r2") == {"chord": "c1", "pending": 2}
    s.result_set(W, "m2", "SUCCESS", 2, None, T0)
    assert _bodies(s) == []
    s.result_set(W, "m1", "SUCCESS", 3, None, T0)
    assert _bodies(s) == [[[3, 2]]]


def test_a_bad_chord_run_is_refused(s):
    for bad in ("", 5, "x" * 256):
        with pytest.raises(RequestError, match=r"^chord run must be a text string of 1 to 255 characters$"):
            s.chord_declare("c", ["a"], body_spec(), None, T0, run=bad)
    assert "c" not in s.chords


def test_chord_runs_replay_and_compact_to_the_same_state(s):
    s.enable_log()
    s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0)
    s.result_set(W, "m1", "SUCCESS", 1, None, T0)
    s.result_set(W, "m2", "SUCCESS", 2, None, T0)
    s.chord_declare("c1", ["m1", "m2"], body_spec(), None, T0, run="r2")
    s.result_set(W, "m2", "SUCCESS", 20, None, T0)  # counted in run r2; m1 still pending
    s.chord_declare("c2", ["n1"], body_spec(tid="body-2"), None, T0, run="q1")
    s.result_set(W, "n1", "SUCCESS", 5, None, T0)  # c2 fired in run q1
    recs = _records(s)
    assert R.NAMES[R.CHORD_RUN] == "CHORD_RUN" and R.CHORD_RUN == 34
    assert [t for _, t, _ in recs].count(R.CHORD_RUN) == 2
    again = BrokerState()
    again.enable_log()
    again.replay(recs, T0)
    assert _chords_view(again) == _chords_view(s)
    again.take_records()
    again.compact(len(recs))
    third = BrokerState()
    third.replay(_records(again, len(recs)), T0)
    assert _chords_view(third) == _chords_view(s)
    for state in (again, third):  # the retried CHORD of q1 still fires nothing; m1's new result fires r2
        state.connect(W)
        assert state.chord_declare("c2", ["n1"], body_spec(tid="body-2"), None, T0, run="q1")["pending"] == 0
        state.result_set(W, "m1", "SUCCESS", 10, None, T0)
        assert [m.id for m in state.peek("celery", 10)][-1] == "body-1"
        (last,) = [cbor2.loads(m.body)["args"] for m in state.peek("celery", 10) if m.id == "body-1"][-1:]
        assert last == [[10, 20]]


def _chords_view(state):
    return ({cid: (ch["members"], sorted(ch["pending"]), ch["results"], ch["run"]) for cid, ch in state.chords.items()},
            dict(state._fired_chords), dict(state._chord_of))
