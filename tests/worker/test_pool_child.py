"""A process-pool child runs from the envelope the main loop decoded (``process._jobs_frame``), not from
the message body: what a task sees and what its outcome is must be what decoding the body gave.  Jobs
and outcomes cross by marshal where it carries them exactly, else by pickle."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import socket
import threading
import uuid

import cbor2
import pytest

from client.app import App, make_envelope
from client.envelope import decode_envelope, encode_envelope
from client.worker.pools import process as pp
from client.worker.pools.base import Job
from client.worker.outcome import S_ACK, S_RETRY
from client.worker.runner import Runner, check_envelope

app = App("pool-child-test", broker="127.0.0.1:1", task_default_queue="q")
HOST = "child@test"


@app.task(bind=True, name="t.fields")
def fields(self, *args, **kwargs):
    r = self.request
    return {"id": r.id, "args": repr(r.args), "kwargs": repr(r.kwargs), "retries": r.retries,
            "delivery_info": r.delivery_info, "eta": r.eta, "expires": r.expires, "parent_id": r.parent_id,
            "root_id": r.root_id, "headers": repr(r.headers), "hostname": r.hostname, "task": r.task,
            "group": r.group, "origin": r.origin, "time_limit": list(r.timelimit), "argsrepr": r.argsrepr,
            "kwargsrepr": r.kwargsrepr, "stamps": r.stamps, "stamped_headers": r.stamped_headers,
            "properties": r.properties, "callbacks": r.callbacks}


@app.task(name="t.boom")
def boom(x):
    raise ValueError(f"no {x}")


@app.task(bind=True, name="t.again", max_retries=3)
def again(self):
    raise self.retry(countdown=7)


class _D:
    """What a Job needs of a delivery."""

    def __init__(self, body, queue="q", priority=4, attempts=2, headers=None):
        self.body = body
        self.id = str(uuid.uuid4())
        self.queue = queue
        self.priority = priority
        self.attempts = attempts
        self.headers = headers


def _job(seq, env, **kw):
    body = encode_envelope(env)
    d = _D(body, **kw)
    decoded = decode_envelope(body)
    check_envelope(decoded)
    return Job(seq, d, 1, decoded["id"], decoded["task"], decoded, None, None)


class _W:
    hostname = HOST


def _run_in_child_loop(jobs):
    """The jobs through the real ``_child_loop`` over a socketpair, as the pool sends them: the outcomes."""
    a, b = socket.socketpair()
    parent, child = a.detach(), b.detach()
    runner = Runner(app, HOST, alarm=False)  # alarm=True wants the main thread
    t = threading.Thread(target=pp._child_loop, args=(child, _W(), runner))
    t.start()
    try:
        frame = pp._jobs_frame(jobs)
        pp._write_all(parent, frame)
        buf, out = b"", []
        while len(out) < len(jobs):
            data = os.read(parent, 1 << 20)
            assert data, "the child loop ended early"
            buf += data
            while len(buf) >= 4 and len(buf) - 4 >= pp.FRAME.unpack_from(buf, 0)[0]:
                (n,) = pp.FRAME.unpack_from(buf, 0)
                out.append(pp._load(buf[4:4 + n]))
                buf = buf[4 + n:]
    finally:
        os.close(parent)  # EOF: the child loop returns
        t.join(10)
        os.close(child)
    return frame, out


def _from_body(job):
    """The outcome of the job as the child computed it before: decoding the message body itself."""
    return Runner(app, HOST, alarm=False).execute(job.to_runner(False))


def test_a_child_sees_the_request_it_would_have_decoded_from_the_body():
    now = 1_700_000_000.5
    envs = [
        make_envelope("t.fields", str(uuid.uuid4()), (1, "two", [3.0, None], dt.datetime(2024, 5, 6, 7, 8, 9)),
                      {"k": {"nested": b"bytes"}}, eta=now, expires=now + 60, parent_id="p-1", root_id="r-1",
                      headers={"origin": "gen@host", "stamped_headers": ["s"], "stamps": {"s": "v"}},
                      options={"argsrepr": "(secret)", "group_id": "g-1", "time_limit": 30, "soft_time_limit": 20}),
        make_envelope("t.fields", str(uuid.uuid4()), (), {}),
    ]
    jobs = [_job(1, envs[0], headers={"retries": 2}), _job(2, envs[1], priority=0, attempts=1)]
    frame, out = _run_in_child_loop(jobs)
    sent = pp._load(frame[4:])
    assert [type(j[1]) for j in sent] == [dict, dict]  # the decoded envelopes, not the bodies
    assert frame[4:5] == pp.PICKLED  # a datetime: marshal cannot carry it, pickle can
    assert [o[0] for o in out] == [1, 2]
    for job, (_, outcome, runtime) in zip(jobs, out):
        assert outcome == _from_body(job)
        assert outcome[1] == "SUCCESS" and runtime >= 0
    first = out[0][1][2]
    assert first["retries"] == 2 and first["argsrepr"] == "(secret)" and first["group"] == "g-1"
    assert first["args"] == repr([1, "two", [3.0, None], dt.datetime(2024, 5, 6, 7, 8, 9)])
    assert first["delivery_info"] == {"queue": "q", "priority": 4, "redelivered": True, "attempts": 2,
                                      "exchange": "", "routing_key": "q"}
    assert first["stamps"] == {"s": "v"} and first["origin"] == "gen@host" and first["time_limit"] == [30, 20]


def test_failures_and_retries_from_a_decoded_envelope_are_those_from_the_body():
    jobs = [_job(1, make_envelope("t.boom", str(uuid.uuid4()), ("x",), {})),
            _job(2, make_envelope("t.again", str(uuid.uuid4()), (), {}), headers={"retries": 1})]
    _, out = _run_in_child_loop(jobs)
    failed, retried = out[0][1], out[1][1]
    assert failed[:3] == (S_ACK, "FAILURE", None)
    assert failed[3]["exc_type"] == "ValueError" and failed[3]["exc_message"] == "no x"
    assert failed[3]["exc_args"] == ["no x"]
    before = _from_body(jobs[0])
    assert {k: v for k, v in failed[3].items() if k != "traceback"} == {
        k: v for k, v in before[3].items() if k != "traceback"}
    assert retried[0] == S_RETRY and retried[4] == 7.0 and retried[5] == 2  # retries header 1 -> 2
    assert retried[:3] == _from_body(jobs[1])[:3] and retried[4:] == _from_body(jobs[1])[4:]


def test_an_envelope_pickle_cannot_carry_goes_as_the_body_and_the_child_decodes_it():
    tagged = cbor2.CBORTag(40404, "kept as a tag")  # a tag nobody registered: decoded as a CBORTag
    env = make_envelope("t.fields", str(uuid.uuid4()), (tagged,), {})
    job = _job(1, env)
    with pytest.raises(Exception):
        pickle.dumps(job.env)  # the premise: pickle cannot carry it
    frame, out = _run_in_child_loop([job, _job(2, make_envelope("t.boom", str(uuid.uuid4()), (1,), {}))])
    sent = pp._load(frame[4:])
    assert [type(j[1]) for j in sent] == [bytes, bytes] and frame[4:5] == pp.PICKLED
    assert out[0][1][1] == "SUCCESS" and out[0][1][2]["args"] == repr([tagged])
    assert out[1][1][1] == "FAILURE" and out[1][1][3]["exc_message"] == "no 1"


def test_plain_envelopes_cross_by_marshal_and_arrive_as_they_were():
    envs = [make_envelope("t.fields", str(uuid.uuid4()), (1, 2.5, "s", b"b", None, True, [1, {"a": [2]}], 2 ** 80),
                          {"k": -0.0}, headers={"stamped_headers": ["s"], "stamps": {"s": 1}}),
            make_envelope("t.fields", str(uuid.uuid4()), (), {})]
    jobs = [_job(1, envs[0], headers={"retries": 3}), _job(2, envs[1])]
    frame, out = _run_in_child_loop(jobs)
    assert frame[4:5] == pp.MARSHAL
    sent = pp._load(frame[4:])
    assert sent == [job.to_runner(True) for job in jobs]
    assert [[type(a) for a in j[1]["args"]] for j in sent] == [[type(a) for a in jobs[0].env["args"]], []]
    for job, (_, outcome, _) in zip(jobs, out):
        assert outcome == _from_body(job)


class Color(int):
    pass


@pytest.mark.parametrize("value, marshalled", [
    (None, True), (7, True), (2 ** 70, True), ("text", True), (1.5, True), (False, True),
    (bytearray(b"x"), False), (Color(3), False), ([1, 2], False), ({"a": 1}, False), (b"raw", False),
])
def test_an_outcome_crosses_as_itself(value, marshalled):
    outcome = (S_ACK, "SUCCESS", value, None, None, None)
    payload = pp._outcome_payload(9, outcome, 0.25, "m-1", HOST)
    assert (payload[:1] == pp.MARSHAL) is marshalled
    seq, got, runtime = pp._load(payload)
    assert (seq, got, runtime) == (9, outcome, 0.25) and type(got[2]) is type(value)


def test_an_outcome_pickle_cannot_carry_is_a_failure_naming_the_task():
    payload = pp._outcome_payload(4, (S_ACK, "SUCCESS", [threading.Lock()], None, None, None), 0.1, "m-9", HOST)
    seq, got, _ = pp._load(payload)
    assert seq == 4 and got[:3] == (S_ACK, "FAILURE", None) and got[3]["exc_type"] == "EncodeError"
    assert "result of task m-9 cannot cross to the worker process" in got[3]["exc_message"]


def test_request_for_puts_every_field_where_it_belongs():
    """request_for passes Request's parameters by position: each field must still land in its own place."""
    from client.worker.runner import request_for

    env = make_envelope("t.fields", "id-1", (1, 2), {"k": 3}, eta=11.5, expires=22.5, parent_id="parent-1",
                        root_id="root-1",
                        headers={"origin": "origin@h", "stamped_headers": ["s1"], "stamps": {"s1": "v1"},
                                 "replaced_task_nesting": 4},
                        options={"time_limit": 30, "soft_time_limit": 20, "argsrepr": "(A)", "kwargsrepr": "{K}",
                                 "group_id": "group-1", "app_id": "app-1"})
    env["chord"] = {"task": "chord.body"}
    env["link"] = [{"task": "on.ok"}]
    env["link_error"] = [{"task": "on.err"}]
    r = request_for(decode_envelope(encode_envelope(env)), fields, "queue-1", 7, 3, 5, "host-1")
    assert (r.id, r.args, r.kwargs, r.retries) == ("id-1", [1, 2], {"k": 3}, 5)
    assert r.delivery_info == {"queue": "queue-1", "priority": 7, "redelivered": True, "attempts": 3, "exchange": "",
                               "routing_key": "queue-1"}
    assert (r.eta, r.expires, r.parent_id, r.root_id) == (11.5, 22.5, "parent-1", "root-1")
    assert r.headers == env["headers"] and r.hostname == "host-1" and r.is_eager is False and r.task == "t.fields"
    assert (r.group, r.chord, r.reply_to, r.origin) == ("group-1", {"task": "chord.body"}, None, "origin@h")
    assert (r.time_limit, r.soft_time_limit, r.timelimit) == (30, 20, (30, 20))
    assert (r.callbacks, r.errbacks) == ([{"task": "on.ok"}], [{"task": "on.err"}])
    assert r.properties == {"correlation_id": "id-1", "reply_to": None, "priority": 7,
                            "delivery_info": {"routing_key": "queue-1"}, "app_id": "app-1"}
    assert (r.replaced_task_nesting, r.stamped_headers, r.stamps) == (4, ["s1"], {"s1": "v1"})
    assert (r.argsrepr, r.kwargsrepr, r.correlation_id) == ("(A)", "{K}", "id-1")

    bare = request_for(decode_envelope(encode_envelope(make_envelope("t.fields", "id-2", (), {}))), fields, "q", 0, 1,
                       0, "h")
    assert (bare.root_id, bare.group, bare.origin, bare.timelimit, bare.callbacks, bare.errbacks) == (
        "id-2", None, None, (None, None), None, None)
    assert (bare.stamped_headers, bare.stamps, bare.replaced_task_nesting, bare.headers) == ([], {}, 0, {})
    assert bare.properties == {"correlation_id": "id-2", "reply_to": None, "priority": 0,
                               "delivery_info": {"routing_key": "q"}}
    assert bare.argsrepr == "()" and bare.kwargsrepr == "{}"
