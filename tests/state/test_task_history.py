"""The task history that outlives a restart, the task list's paging/sorting/search, the graphs.

State-level: a BrokerState fed task events as a worker sends them; the history file
(broker.runtime.history) written to and read back from a real data dir, as boot and the
server's writer do.
"""

from __future__ import annotations

import cbor2
import pytest

from broker.errors import BadRequest
from broker.runtime import history
from broker.state import BrokerState
from broker.state import events as ev_mod
from broker.state import graphs
from broker.state.events import HISTORY_TEXT

T0 = 1_700_000_000.0


def run_task(st, tid, name, args="(1, 2)", *, worker="w1@host", t=T0, runtime=0.5, ok=True, result="3"):
    st.emit_events(0, worker, [{"type": "task-received", "uuid": tid, "name": name, "args": args, "kwargs": "{}",
                                "queue": "celery", "ts": t}], t)
    st.emit_events(0, worker, [{"type": "task-started", "uuid": tid, "ts": t + 0.1}], t + 0.1)
    if ok:
        end = {"type": "task-succeeded", "uuid": tid, "runtime": runtime, "result": result, "ts": t + 0.1 + runtime}
    else:
        end = {"type": "task-failed", "uuid": tid, "runtime": runtime, "exception": "ValueError('boom')",
               "traceback": "Traceback...\nValueError: boom", "ts": t + 0.1 + runtime}
    st.emit_events(0, worker, [end], t + 0.1 + runtime)


def flush(st, hf):
    hf.append(st.history_changes())


# -- 1. the history survives a restart ------------------------------------------------------------
def test_history_survives_a_restart_through_its_file(tmp_path):
    st = BrokerState()
    hf = history.HistoryFile(str(tmp_path))
    run_task(st, "a", "proj.add", "(2, 2)", result="4")
    run_task(st, "b", "proj.fail", "('x',)", ok=False, worker="w2@host", t=T0 + 5)
    flush(st, hf)
    st.emit_events(0, "w1@host", [{"type": "task-received", "uuid": "c", "name": "proj.slow", "args": "()",
                                   "ts": T0 + 9}], T0 + 9)
    flush(st, hf)  # a second append: c, received only

    again = BrokerState()  # "restart": a fresh state reads the file back
    assert history.restore(again, history.HistoryFile(str(tmp_path))) == 3
    total, rows = again.tasks_page(T0 + 10)
    assert total == 3
    assert [r["id"] for r in rows] == ["c", "b", "a"]  # newest first, as before the restart
    a = again.task_info("a", T0 + 10)
    assert (a["name"], a["args"], a["state"], a["worker"], a["runtime"], a["result"]) == (
        "proj.add", "(2, 2)", "SUCCESS", "w1@host", 0.5, "4")
    assert [e["type"] for e in a["events"]] == ["task-received", "task-started", "task-succeeded"]
    b = again.task_info("b", T0 + 10)
    assert b["state"] == "FAILURE" and "boom" in b["exception"] and b["traceback"].endswith("ValueError: boom")
    assert again.task_info("c", T0 + 10)["state"] == "RECEIVED"
    assert again.history_changes() == []  # what was read back is not written again


@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 70_000])
def test_the_file_holds_each_history_as_its_own_cbor_item_for_any_batch_size(n):
    # encode() writes the batch as one array less its head: every head width must come off whole
    items = [[f"t{i}", [{"type": "task-received", "uuid": f"t{i}", "ts": 1.5, "args": "x" * (i % 3)}]]
             for i in range(n)]
    assert history.HistoryFile.encode(items) == b"".join(cbor2.dumps(it) for it in items)


def test_a_later_entry_of_a_task_replaces_its_earlier_one(tmp_path):
    st = BrokerState()
    hf = history.HistoryFile(str(tmp_path))
    st.emit_events(0, "w", [{"type": "task-received", "uuid": "a", "name": "n", "ts": T0}], T0)
    st.emit_events(0, "w", [{"type": "task-received", "uuid": "b", "name": "n", "ts": T0 + 1}], T0 + 1)
    flush(st, hf)
    st.emit_events(0, "w", [{"type": "task-succeeded", "uuid": "a", "runtime": 1.0, "ts": T0 + 2}], T0 + 2)
    flush(st, hf)
    again = BrokerState()
    history.restore(again, history.HistoryFile(str(tmp_path)))
    assert list(again.task_history) == ["a", "b"]  # a is still the older one
    assert again.task_info("a", T0)["state"] == "SUCCESS"
    assert again._history_events == 3


def test_restored_history_keeps_the_bounds(tmp_path, monkeypatch):
    monkeypatch.setattr(ev_mod, "MAX_TASKS", 5)
    st = BrokerState()
    hf = history.HistoryFile(str(tmp_path))
    for i in range(12):
        run_task(st, f"t{i}", "n", t=T0 + i)
    flush(st, hf)
    assert len(st.task_history) == 5
    again = BrokerState()
    assert history.restore(again, history.HistoryFile(str(tmp_path))) == 5
    assert list(again.task_history) == [f"t{i}" for i in range(7, 12)]
    assert again._history_events == 15


def test_long_values_are_kept_as_a_preview(tmp_path):
    st = BrokerState()
    hf = history.HistoryFile(str(tmp_path))
    run_task(st, "a", "n", args="x" * 4000, result="y" * 3000)
    flush(st, hf)
    again = BrokerState()
    history.restore(again, history.HistoryFile(str(tmp_path)))
    a = again.task_info("a", T0)
    assert len(a["args"]) == HISTORY_TEXT and a["args"].endswith("…") and a["args"].startswith("xxx")
    assert len(a["result"]) == HISTORY_TEXT
    assert st.task_info("a", T0)["args"] == "x" * 4000  # the live history is not cut


def test_a_torn_tail_costs_only_itself(tmp_path):
    st = BrokerState()
    hf = history.HistoryFile(str(tmp_path))
    run_task(st, "a", "n")
    flush(st, hf)
    with open(hf.path, "ab") as f:
        f.write(b"\x82\x61b\x9f\xa1")  # a crash in the middle of an append
    again = BrokerState()
    hf2 = history.HistoryFile(str(tmp_path))
    assert history.restore(again, hf2) == 1
    run_task(again, "b", "n")  # appends after the kept part: readable next time
    flush(again, hf2)
    third = BrokerState()
    assert history.restore(third, history.HistoryFile(str(tmp_path))) == 2


def test_hostile_items_in_the_file_are_skipped(tmp_path):
    import cbor2
    (tmp_path / history.FILE_NAME).write_bytes(b"".join(cbor2.dumps(x) for x in (
        "text", [1, []], ["", [{"type": "task-received"}]], ["ok", [{"type": "task-received", "uuid": "ok",
                                                                   "name": "n"}, 7]], ["z", "no"])))
    st = BrokerState()
    assert history.restore(st, history.HistoryFile(str(tmp_path))) == 1
    assert st.task_info("ok", T0)["name"] == "n"


def test_the_file_is_rewritten_from_memory_past_its_bound(tmp_path, monkeypatch):
    st = BrokerState()
    hf = history.HistoryFile(str(tmp_path))
    for i in range(50):
        run_task(st, f"t{i}", "n", t=T0 + i)
        flush(st, hf)
    big = hf.size
    monkeypatch.setattr(history, "FILE_MAX", big // 2)  # the newest tasks within FILE_MAX / 2
    hf.rewrite(st.history_snapshot())
    assert 0 < hf.size <= big // 4
    again = BrokerState()
    kept = history.restore(again, history.HistoryFile(str(tmp_path)))
    assert 0 < kept < 50 and list(again.task_history)[-1] == "t49"


# -- 2. paging, sorting, search ---------------------------------------------------------------------
@pytest.fixture
def many():
    st = BrokerState()
    for i in range(30):
        run_task(st, f"id{i:02d}", ["proj.add", "proj.mul", "other.send"][i % 3], args=f"({i}, 'k{i}')",
                 worker=f"w{i % 2}@h", t=T0 + i, runtime=(i * 7 % 11) / 10, ok=i % 5 != 0, result=f"r{i}")
    return st


def test_paging_walks_every_task_once(many):
    seen = []
    for off in range(0, 40, 7):
        total, rows = many.tasks_page(T0, offset=off, limit=7)
        assert total == 30
        seen += [r["id"] for r in rows]
    assert seen == [f"id{i:02d}" for i in range(29, -1, -1)]


@pytest.mark.parametrize("sort", ["runtime", "name", "state", "started", "worker", "received"])
@pytest.mark.parametrize("desc", [True, False])
def test_sorting(many, sort, desc):
    _, rows = many.tasks_page(T0, limit=1000, sort=sort, desc=desc)
    keys = [r[sort] for r in rows]
    assert keys == sorted(keys, reverse=desc)
    assert len(rows) == 30


def test_sorting_puts_unknown_values_last(many):
    many.emit_events(0, "w", [{"type": "task-received", "uuid": "new", "name": "n", "ts": T0 + 99}], T0 + 99)
    for desc in (True, False):
        _, rows = many.tasks_page(T0, limit=1000, sort="runtime", desc=desc)
        assert rows[-1]["id"] == "new"


def test_search_by_name_args_result_worker_and_state(many):
    assert {r["id"] for r in many.tasks_page(T0, search="'K7'")[1]} == {"id07"}  # args, any case
    assert {r["id"] for r in many.tasks_page(T0, search="r13")[1]} == {"id13"}  # result
    total, rows = many.tasks_page(T0, search="w1@", limit=1000)  # worker
    assert total == 15 and all(r["worker"] == "w1@h" for r in rows)
    total, rows = many.tasks_page(T0, search="proj.", limit=1000)  # name
    assert total == 20
    total, rows = many.tasks_page(T0, state="FAILURE", limit=1000)
    assert {r["id"] for r in rows} == {f"id{i:02d}" for i in range(0, 30, 5)}
    assert many.tasks_page(T0, search="boom", name="proj.add")[0] == 2  # exception text, and one name
    assert many.tasks_page(T0, search="nothing-like-it") == (0, [])


@pytest.mark.parametrize("kw, word", [({"sort": "color"}, "sort"), ({"limit": 0}, "limit"), ({"offset": -1}, "offset"),
                                      ({"limit": 10**6}, "limit"), ({"search": "x" * 201}, "200 characters")])
def test_bad_page_requests_are_named(many, kw, word):
    with pytest.raises(BadRequest, match=word):
        many.tasks_page(T0, **kw)


# -- 3. graphs -------------------------------------------------------------------------------------
def test_graphs_count_throughput_failures_and_runtime_percentiles():
    st = BrokerState()
    for i in range(100):  # one bucket: 100 tasks, 10 failures, runtimes 0.01 .. 1.00 s
        run_task(st, f"t{i}", "proj.add", t=T0, runtime=(i + 1) / 100, ok=i % 10 != 0)
    st.tick(T0 + 1)  # samples the queue depth
    g = st.task_graphs.series(T0 + 1)
    assert len(g["start"]) == graphs.GRAPH_BUCKETS and g["bucket_s"] == graphs.GRAPH_BUCKET_S
    assert g["succeeded_per_s"][-1] == pytest.approx(90 / graphs.GRAPH_BUCKET_S)
    assert g["failed_per_s"][-1] == pytest.approx(10 / graphs.GRAPH_BUCKET_S)
    assert sum(g["succeeded_per_s"][:-1]) == 0 and g["queue_depth"][-1] == 0
    rt = g["runtime_s"]["proj.add"]
    accuracy = graphs.RT_RATIO ** 0.5
    assert 0.5 / accuracy <= rt["p50"][-1] <= 0.5 * accuracy
    assert 0.95 / accuracy <= rt["p95"][-1] <= 0.95 * accuracy
    assert rt["p50"][0] is None


def test_graphs_keep_the_last_hour_only():
    st = BrokerState()
    for k in range(graphs.GRAPH_BUCKETS + 50):
        t = T0 + k * graphs.GRAPH_BUCKET_S
        run_task(st, f"t{k}", f"name{k % 30}", t=t, runtime=0.01)
    assert len(st.task_graphs.buckets) == graphs.GRAPH_BUCKETS
    g = st.task_graphs.series(t, names=3)
    assert all(v == pytest.approx(0.1) for v in g["succeeded_per_s"])
    assert len(g["runtime_s"]) == 3


def test_graphs_bound_task_names_per_bucket():
    st = BrokerState()
    for i in range(graphs.GRAPH_NAMES + 10):
        run_task(st, f"t{i}", f"name{i}", t=T0, runtime=0.01)
    b = st.task_graphs.buckets[-1]
    assert len(b.runtimes) == graphs.GRAPH_NAMES + 1 and sum(b.runtimes[graphs.OTHER]) == 10


def test_queue_depth_is_sampled_per_bucket():
    st = BrokerState()
    for i in range(3):
        st.publish(0, "q", b"x", f"m{i}", 0, T0)
    st.tick(T0)
    assert st.task_graphs.series(T0)["queue_depth"][-1] == 3


def test_a_new_event_shows_on_the_next_page_request():
    st = BrokerState()
    st.emit_events(0, "w", [{"type": "task-received", "uuid": "a", "name": "n", "ts": T0}], T0)
    assert st.tasks_page(T0)[1][0]["state"] == "RECEIVED"  # the summary is cached now
    st.emit_events(0, "w", [{"type": "task-succeeded", "uuid": "a", "runtime": 0.2, "result": "ok", "ts": T0 + 1}], T0)
    row = st.tasks_page(T0)[1][0]
    assert (row["state"], row["result"], row["runtime"]) == ("SUCCESS", "ok", 0.2)
    row["state"] = "MUTATED"  # a caller changing its row does not change the cache
    assert st.tasks_page(T0)[1][0]["state"] == "SUCCESS"


def test_a_stored_final_result_wins_over_the_events(many):
    many.emit_events(0, "w", [{"type": "task-received", "uuid": "x", "name": "n", "ts": T0 + 50}], T0 + 50)
    many.result_set(0, "x", "SUCCESS", 42, {}, T0 + 51)
    total, rows = many.tasks_page(T0 + 52, state="SUCCESS", search="42")
    assert [(r["id"], r["result"]) for r in rows] == [("x", 42)]


# -- the page's worker controls: a public way to ask and read the replies ------------------------
def test_control_ask_returns_the_pending_request_and_its_replies_fill_in():
    st = BrokerState()
    assert st.control_ask(-1, "pool_grow", {"n": 1}, T0, timeout=5.0, destination=["w@h"]) is None  # nobody
    st.connect(7, "w@h")
    st.emit_events(7, "w@h", [{"type": "worker-online", "freq": 2.0}], T0)
    st.take_effects()
    req = st.control_ask(-1, "pool_grow", {"n": 1}, T0, timeout=5.0, destination=["w@h"])
    assert req is not None and req.expected == {"w@h"} and req.replies == {}
    frames = st.take_effects().frames[7]
    reply_id = frames[0][1]["reply_id"]
    assert st.control_reply(7, reply_id, {"ok": "pool now 3"}, T0)
    assert req.replies == {"w@h": {"ok": "pool now 3"}} and not req.expected
    with pytest.raises(BadRequest, match="control command"):
        st.control_ask(-1, "", None, T0)


# -- the list against a plain model (hypothesis) -----------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

_task = hs.tuples(hs.sampled_from(["a.x", "a.y", "b.z"]), hs.integers(0, 5), hs.booleans(),
                  hs.sampled_from(["w1", "w2"]), hs.booleans())


@settings(max_examples=60, deadline=None)
@given(tasks=hs.lists(_task, max_size=25), sort=hs.sampled_from(ev_mod.TASK_SORTS), desc=hs.booleans(),
       offset=hs.integers(0, 30), limit=hs.integers(1, 10), needle=hs.sampled_from([None, "a.", "3", "w2", "zz"]),
       state=hs.sampled_from([None, "SUCCESS", "FAILURE", "STARTED"]))
def test_page_matches_a_plain_model(tasks, sort, desc, offset, limit, needle, state):
    st = BrokerState()
    model = []
    for i, (name, rt, ok, worker, finished) in enumerate(tasks):
        tid = f"t{i}"
        st.emit_events(0, worker, [{"type": "task-received", "uuid": tid, "name": name, "args": f"({i},)", "ts": T0 + i},
                                   {"type": "task-started", "uuid": tid, "ts": T0 + i}], T0)
        d = {"id": tid, "name": name, "worker": worker, "received": T0 + i, "started": T0 + i, "state": "STARTED",
             "runtime": None, "finished": None, "text": f"{tid} {name} ({i},) {worker}"}
        if finished:
            st.emit_events(0, worker, [{"type": "task-succeeded" if ok else "task-failed", "uuid": tid,
                                        "runtime": rt / 10, "ts": T0 + i + rt}], T0)
            d.update(state="SUCCESS" if ok else "FAILURE", runtime=rt / 10, finished=T0 + i + rt)
        model.append(d)
    # the model searches id, name, args and worker (these events carry no result or exception)
    rows = [d for d in reversed(model) if (state is None or d["state"] == state)
            and (needle is None or needle in d["text"])]
    has = [d for d in rows if d[sort] is not None]
    if sort != "received" or not desc:
        rows = sorted(has, key=lambda d: d[sort], reverse=desc) + [d for d in rows if d[sort] is None]
    total, page = st.tasks_page(T0, offset=offset, limit=limit, sort=sort, desc=desc, state=state, search=needle)
    assert total == len(rows)
    assert [r["id"] for r in page] == [d["id"] for d in rows[offset: offset + limit]]


def test_changed_marks_stay_bounded_when_nobody_takes_them(monkeypatch):
    monkeypatch.setattr(ev_mod, "MAX_TASKS", 10)
    st = BrokerState()  # a state with no history file: history_changes is never called
    for i in range(100):
        st.emit_events(0, "w", [{"type": "task-received", "uuid": f"t{i}", "name": "n"}], T0)
        assert len(st._history_dirty) <= 2 * 10 + 1
    assert [tid for tid, _ in st.history_changes()] == [f"t{i}" for i in range(90, 100)]
