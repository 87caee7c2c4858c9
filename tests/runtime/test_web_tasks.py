"""The page's task list and graphs over HTTP, against a real brokerd: paging, sorting, search,
the graphs' JSON, and the history surviving a restart (clean stop and kill -9).

Task events are sent as a worker sends them (EMIT_EVENTS through client.Client), so the test
controls names, args, runtimes and results exactly.
"""

from __future__ import annotations

import os
import time

import pytest

from broker.runtime import history
from client import Client
from tests.runtime.test_web import get_json, wait_for

N = 12


def send_tasks(address: str, n: int = N, prefix: str = "t") -> list[str]:
    """n tasks of three names, runtimes 0.1 .. n/10 s (shuffled), every fourth a failure."""
    ids = [f"{prefix}{i:02d}" for i in range(n)]
    now = time.time()
    with Client(address, name="fake-worker") as c:
        for i, tid in enumerate(ids):
            rt = ((i * 5) % n + 1) / 10
            end = ({"type": "task-failed", "uuid": tid, "runtime": rt, "exception": f"KeyError('k{i}')"} if i % 4 == 3
                   else {"type": "task-succeeded", "uuid": tid, "runtime": rt, "result": f"'res-{i}'"})
            c.emit_events(f"w{i % 2}@box", [
                {"type": "task-received", "uuid": tid, "name": ("app.add", "app.mul", "app.mail")[i % 3],
                 "args": f"({i}, 'needle-{i}')", "kwargs": "{}", "queue": "celery", "ts": now + i},
                {"type": "task-started", "uuid": tid, "ts": now + i + 0.01}, {**end, "ts": now + i + rt}])
    return ids


@pytest.fixture
def fed(broker_factory):
    b = broker_factory()
    ids = send_tasks(b.address)
    wait_for(lambda: get_json(b.http_port, "/api/tasks")[1]["total"] == N, what="the task events")
    return b, ids


def page(port, query=""):
    status, d = get_json(port, "/api/tasks?" + query)
    assert status == 200, d
    return d


def test_paging_has_no_fifty_row_cap_and_walks_every_task_once(fed):
    b, ids = fed
    seen = []
    offset = 0
    while True:
        d = page(b.http_port, f"limit=5&offset={offset}")
        assert d["total"] == N and d["limit"] == 5
        seen += [t["id"] for t in d["tasks"]]
        if not d["more"]:
            break
        offset += 5
    assert seen == ids[::-1]  # newest first, each once
    assert len(page(b.http_port, "limit=1000")["tasks"]) == N


@pytest.mark.parametrize("sort", ["runtime", "name", "state", "received", "started", "worker"])
def test_sorting_both_ways(fed, sort):
    b, _ = fed
    for order in ("asc", "desc"):
        d = page(b.http_port, f"sort={sort}&order={order}&limit=100")
        keys = [t[sort] for t in d["tasks"]]
        assert keys == sorted(keys, reverse=order == "desc") and len(keys) == N
    d = page(b.http_port, "sort=runtime&order=desc&limit=2")
    assert [t["runtime"] for t in d["tasks"]] == [1.2, 1.1]


def test_search_in_name_args_result_and_worker(fed):
    b, _ = fed
    assert [t["id"] for t in page(b.http_port, "q=NEEDLE-7")["tasks"]] == ["t07"]  # args, case ignored
    assert [t["id"] for t in page(b.http_port, "q=res-10")["tasks"]] == ["t10"]  # result
    assert [t["id"] for t in page(b.http_port, "q=k11")["tasks"]] == ["t11"]  # exception
    d = page(b.http_port, "q=w1%40box&limit=100")  # worker
    assert d["total"] == N // 2 and {t["worker"] for t in d["tasks"]} == {"w1@box"}
    d = page(b.http_port, "q=app.m&limit=100")  # name (mul and mail)
    assert d["total"] == 8
    d = page(b.http_port, "state=failure&name=app.add&limit=100")
    assert [t["id"] for t in d["tasks"]] == ["t03"]  # failures are t03, t07, t11; app.add is every third
    d = page(b.http_port, "q=needle&sort=runtime&order=asc&limit=3&offset=3")  # all at once
    assert [t["runtime"] for t in d["tasks"]] == [0.4, 0.5, 0.6] and d["more"]


def test_bad_queries_get_a_400_naming_what_is_wrong(fed):
    b, _ = fed
    for query, word in (("sort=colour", "sort must be one of"), ("order=sideways", "order is asc or desc"),
                        ("q=" + "x" * 201, "200 characters")):
        status, d = get_json(b.http_port, "/api/tasks?" + query)
        assert status == 400 and d["error"] == "BAD_REQUEST" and word in d["message"], (query, d)
    # hostile numbers are clamped, never an error or a huge page
    d = page(b.http_port, "limit=99999999&offset=-5")
    assert d["limit"] == 1000 and d["offset"] == 0 and len(d["tasks"]) == N
    assert page(b.http_port, "offset=100000")["tasks"] == []


def test_html_list_has_a_pager_and_sortable_heads(fed):
    b, _ = fed
    html = page(b.http_port, "html=1&limit=5&offset=5&sort=runtime&order=asc")["html"]["tasks"]
    assert "tasks 6–10 of 12 kept, by runtime ↑" in html
    assert 'data-task-offset="0"' in html and 'data-task-offset="10"' in html
    assert 'data-sort="runtime" data-order="desc"' in html  # the active column flips the order


def test_graphs_json_and_svg(fed):
    b, _ = fed
    status, d = get_json(b.http_port, "/api/graphs?html=1")
    assert status == 200
    g = d["graphs"]
    assert g["bucket_s"] == 10.0 and len(g["succeeded_per_s"]) == 360
    # 9 successes and 3 failures landed in the last bucket or two
    assert round(sum(g["succeeded_per_s"][-2:]) * 10) == 9 and round(sum(g["failed_per_s"][-2:]) * 10) == 3
    assert set(g["runtime_s"]) == {"app.add", "app.mul", "app.mail"}
    assert any(v is not None for v in g["runtime_s"]["app.add"]["p95"][-2:])
    assert g["queue_depth"][-1] == 0
    assert d["html"]["graphs"].count("<svg") == 3 and "app.mul p95" in d["html"]["graphs"]


def test_history_survives_a_clean_restart_and_a_kill(fed):
    b, ids = fed
    b.terminate()
    hf = os.path.join(b.data_dir, history.FILE_NAME)
    assert os.path.getsize(hf) > 0
    b.restart()
    d = page(b.http_port, "limit=100")
    assert [t["id"] for t in d["tasks"]] == ids[::-1]
    t7 = next(t for t in d["tasks"] if t["id"] == "t07")
    assert (t7["name"], t7["args"], t7["worker"], t7["state"]) == ("app.mul", "(7, 'needle-7')", "w1@box", "FAILURE")
    status, info = get_json(b.http_port, "/api/task/t05")
    assert [e["type"] for e in info["task"]["events"]] == ["task-received", "task-started", "task-succeeded"]

    # kill -9: what the writer appended (every history.FLUSH_EVERY s) is kept
    size = os.path.getsize(hf)
    more = send_tasks(b.address, 3, prefix="k")
    wait_for(lambda: os.path.getsize(hf) > size, timeout=3 * history.FLUSH_EVERY + 10, what="the history append")
    b.kill()
    b.restart()
    assert [t["id"] for t in page(b.http_port, "limit=100")["tasks"]] == (ids + more)[::-1]


def test_task_page_says_where_a_waiting_task_is(broker_factory):
    b = broker_factory()
    with Client(b.address, name="producer") as c:
        c.publish("nobody-reads", b"x", id="t-waits")
    status, d = get_json(b.http_port, "/api/task/t-waits?html=1")
    assert status == 200 and d["task"]["waiting"]["where"] == "ready"
    assert "queued in `nobody-reads`, 0 consumers" in d["html"]["task"] and "-Q nobody-reads" in d["html"]["task"]
