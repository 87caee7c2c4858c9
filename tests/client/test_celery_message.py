"""client/celery/message.py: the mapping between kombu's messages and brokerd's (pure, no broker)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("kombu", reason="kombu is not installed (pip install 'brokerd[celery]')")

from client.celery import message as M  # noqa: E402


def kombu_message(eta=None, priority=None, args=(2, 3)):
    headers = {"lang": "py", "task": "proj.add", "id": "t-1", "eta": eta, "retries": 0}
    props = {"correlation_id": "t-1", "delivery_info": {"exchange": "", "routing_key": "celery"},
             "delivery_tag": "kombu-tag", "body_encoding": None}
    if priority is not None:
        props["priority"] = priority
    body = json.dumps([list(args), {}, {"callbacks": None}])
    return {"body": body, "content-type": "application/json", "content-encoding": "utf-8",
            "headers": headers, "properties": props}


def delivery(p, attempts=1, extra=None):
    headers = dict(p["headers"], **(extra or {}))
    return SimpleNamespace(body=p["body"], headers=headers, tag=7, queue="celery", priority=p["priority"],
                           attempts=attempts, id=p["id"])


def test_publish_keeps_the_body_bytes_the_task_id_and_the_task_name_on_top():
    p = M.to_brokerd(kombu_message(priority=7))
    assert p["body"] == kombu_message()["body"].encode() and p["id"] == "t-1" and p["priority"] == 7
    assert p["headers"]["task"] == "proj.add" and p["eta"] is None
    back = M.from_delivery(delivery(p, attempts=2))
    assert back["headers"]["id"] == "t-1" and back["properties"]["delivery_tag"] == 7
    assert back["properties"]["delivery_info"]["redelivered"] is True


def test_eta_is_brokerds_and_the_worker_sees_the_eta_it_was_sent_with():
    """brokerd holds the message until due; at delivery Celery's task.request.eta is what was sent
    (Celery's test_group_or_task_countdown_delays_header reads it)."""
    p = M.to_brokerd(kombu_message(eta="2030-01-01T00:00:00+00:00"))
    assert p["eta"] == 1893456000.0
    assert p["headers"][M.ETA_KEY] == "2030-01-01T00:00:00+00:00"
    assert p["headers"][M.KOMBU_KEY]["headers"]["eta"] is None  # what brokerd stores: no second timer
    assert M.from_delivery(delivery(p))["headers"]["eta"] == "2030-01-01T00:00:00+00:00"
    assert M.from_delivery(delivery(M.to_brokerd(kombu_message())))["headers"]["eta"] is None


@pytest.mark.parametrize("given,sent", [(None, 0), (0, 0), (9, 9), (255, 255), (1000, 255), (-3, 0), ("high", 0)])
def test_priority_is_brokerds_unchanged_and_clamped_to_its_range(given, sent):
    assert M.to_brokerd(kombu_message(priority=given))["priority"] == sent


def test_chord_results_replace_the_placeholder_first_argument():
    p = M.to_brokerd(kombu_message(args=([], "extra")))
    out = M.from_delivery(delivery(p, extra={M.CHORD_RESULTS: [1, {"a": 2}]}))
    assert json.loads(out["body"])[0] == [[1, {"a": 2}], "extra"]
    kept = M.from_delivery(delivery(p, extra={M.CHORD_RESULTS: [1], M.IMMUTABLE: True}))
    assert json.loads(kept["body"])[0] == [[], "extra"]


def test_a_chord_bodys_parent_is_the_member_that_completed_the_chord():
    """As on Celery's own backends, where that member's worker sends the body (test_parent_ids)."""
    p = M.to_brokerd(kombu_message(args=([],)))
    out = M.from_delivery(delivery(p, extra={M.CHORD_RESULTS: [1], M.CHORD_LAST: "member-3"}))
    assert out["headers"]["parent_id"] == "member-3"
    assert "parent_id" not in M.from_delivery(delivery(p, extra={M.CHORD_RESULTS: [1]}))["headers"]
    assert "parent_id" not in M.from_delivery(delivery(p, extra={M.CHORD_LAST: 5}))["headers"]


@pytest.mark.parametrize("headers,why", [
    (None, "not published through kombu"),
    ({M.KOMBU_KEY: "x"}, "not published through kombu"),
    ({M.KOMBU_KEY: {"content-type": "application/json", "headers": [1]}}, "must be maps"),
    ({M.KOMBU_KEY: {"content-type": "application/json", "headers": {"task": "t"}}}, "without headers.id"),
])
def test_a_message_not_from_kombu_is_refused_with_what_is_missing(headers, why):
    d = SimpleNamespace(body=b"\xff", headers=headers, tag=1, queue="celery", priority=0, attempts=1, id="x")
    with pytest.raises(ValueError, match=why):
        M.from_delivery(d)


def test_a_scheduled_firing_is_unpacked_with_brokerds_id_as_the_task_id():
    p = kombu_message()
    packed = M.scheduled_body(p)
    d = SimpleNamespace(body=packed, headers={"x-schedule": "tick", "x-tick": 1.0}, tag=3, queue="celery",
                        priority=0, attempts=1, id="tick@1.000")
    out = M.from_delivery(d)
    assert out["headers"]["id"] == "tick@1.000" and out["properties"]["correlation_id"] == "tick@1.000"
    assert out["body"] == p["body"].encode()
    d.body = b"\x01not cbor map"
    with pytest.raises(ValueError, match="not a packed Celery message"):
        M.from_delivery(d)
