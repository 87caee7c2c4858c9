"""The task envelope (protocol.md §8) and the one routing rule, tested as pure functions.

No broker here: ``client.envelope`` takes ``now`` and returns values.  The last
tests check that every way of sending a task (``delay``/``send_task``, a chord's
body, a beat entry) asks the same rule and gets the same answer.
"""

import datetime as dt
import re
from types import SimpleNamespace

import cbor2
import pytest

from client.app import App
from client.beat import schedule_spec
from client.canvas import message_spec, signature
from client.envelope import (
    absolute_times,
    check_encodable,
    decode_envelope,
    encode_envelope,
    lookup_route,
    make_envelope,
    route,
)
from client.exceptions import EncodeError

NO_TASK = None


def task(queue=None, priority=None):
    return SimpleNamespace(queue=queue, priority=priority)


# (why, task name, task_routes, the registered task, the call's queue/priority, expected (queue, priority))
ROUTING_TABLE = [
    ("nothing given: Celery's default queue, priority 0",
     "proj.add", {}, NO_TASK, (None, None), ("celery", 0)),
    ("an exact route gives queue and priority",
     "proj.add", {"proj.add": {"queue": "math", "priority": 4}}, NO_TASK, (None, None), ("math", 4)),
    ("a trailing-star glob matches a prefix (the form that always worked)",
     "proj.email.send", {"proj.email.*": {"queue": "mail"}}, NO_TASK, (None, None), ("mail", 0)),
    ("a star in the middle and a ? match too",
     "proj.reports.send_a", {"proj.*.send_?": {"queue": "out"}}, NO_TASK, (None, None), ("out", 0)),
    ("a glob that does not match leaves the default",
     "proj.email", {"proj.email.*": {"queue": "mail"}}, NO_TASK, (None, None), ("celery", 0)),
    ("an exact name wins over a glob listed before it",
     "proj.email.send", {"proj.*": {"queue": "any"}, "proj.email.send": {"queue": "exact"}}, NO_TASK,
     (None, None), ("exact", 0)),
    ("of two matching globs, the first listed wins",
     "proj.email.send", {"proj.email.*": {"queue": "first"}, "proj.*": {"queue": "second"}}, NO_TASK,
     (None, None), ("first", 0)),
    ("a compiled regular expression is a pattern too",
     "proj.b.run", {re.compile(r"proj\.(a|b)\."): {"queue": "ab"}}, NO_TASK, (None, None), ("ab", 0)),
    ("a route may be just a queue name",
     "proj.add", {"proj.add": "hipri"}, NO_TASK, (None, None), ("hipri", 0)),
    ("a list of route tables is tried in order",
     "proj.add", [{"other": {"queue": "x"}}, {"proj.*": {"queue": "listed"}}], NO_TASK, (None, None),
     ("listed", 0)),
    ("the task's own queue beats its route; the route's priority fills in",
     "proj.add", {"proj.add": {"queue": "routed", "priority": 2}}, task(queue="own"), (None, None), ("own", 2)),
    ("the task's own priority beats its route's",
     "proj.add", {"proj.add": {"priority": 2}}, task(priority=7), (None, None), ("celery", 7)),
    ("the call's queue and priority beat the task's; priority 0 counts as given",
     "proj.add", {"proj.add": {"queue": "routed", "priority": 2}}, task("own", 5), ("call", 0), ("call", 0)),
    ("an empty queue or a None priority in the call means 'not given'",
     "proj.add", {}, task("own", 5), ("", None), ("own", 5)),
    ("a route's priority of None falls through to the default",
     "proj.add", {"proj.add": {"queue": "q", "priority": None}}, NO_TASK, (None, None), ("q", 0)),
]


@pytest.mark.parametrize("why,name,routes,the_task,call,expected", ROUTING_TABLE,
                         ids=[row[0] for row in ROUTING_TABLE])
def test_the_routing_rule_picks_the_first_queue_and_priority_given(why, name, routes, the_task, call, expected):
    assert route(name, routes, task=the_task, queue=call[0], priority=call[1]) == expected


def test_the_app_defaults_apply_when_nothing_else_names_a_queue_or_priority():
    assert route("proj.add", {}, default_queue="low", default_priority=3) == ("low", 3)
    assert route("proj.add", {"proj.add": {"priority": 1}}, default_queue="low", default_priority=3) == ("low", 1)


def test_routes_of_the_wrong_shape_are_refused_naming_what_to_write():
    with pytest.raises(TypeError, match=r"^task_routes must be a dict \(or a list of dicts\), not str$"):
        lookup_route("proj.add", "proj.add")
    with pytest.raises(TypeError, match=r"^task_routes entry 'proj\.add' must be a dict such as \{'queue': 'high'\} "
                                        r"or a queue name, not int$"):
        lookup_route({"proj.add": 5}, "proj.add")


# -- one rule, every sender ------------------------------------------------------------------
class RecordingClient:
    """Stands in for the blocking Client: keeps what would be published."""

    def __init__(self):
        self.published = []

    def publish(self, queue, body, *, priority=0, eta=None, id=None, confirm=True, headers=None):
        self.published.append((queue, priority, cbor2.loads(body)))


class RecordingApp(App):
    @property
    def client(self):
        return self.recorder


AGREEMENT = [row for row in ROUTING_TABLE if isinstance(row[2], dict)]


@pytest.mark.parametrize("why,name,routes,the_task,call,expected", AGREEMENT, ids=[row[0] for row in AGREEMENT])
def test_delay_send_task_chord_bodies_and_beat_entries_route_alike(why, name, routes, the_task, call, expected):
    app = RecordingApp("proj", task_routes=routes)
    app.recorder = RecordingClient()
    queue, priority = call
    if the_task is not None:
        registered = app.task(name=name, queue=the_task.queue, priority=the_task.priority)(lambda: None)
        registered.apply_async(queue=queue, priority=priority)
        app.recorder.published.clear()
        registered.s().set(queue=queue, priority=priority).apply_async()
    else:
        app.send_task(name, queue=queue, priority=priority)
    published = app.recorder.published[-1][:2]
    opts = {"queue": queue, "priority": priority}
    chord_body = message_spec(app, signature(name, options=opts, app=app))
    beat = schedule_spec(app, "every ten seconds", {"task": name, "schedule": 10.0, "options": opts})
    assert published == expected
    assert (chord_body["queue"], chord_body["priority"]) == expected
    assert (beat["queue"], beat["priority"]) == expected


# -- the envelope ------------------------------------------------------------------------------
def test_an_envelope_round_trips_through_its_bytes():
    env = make_envelope("proj.add", "t-1", (2, 3), {"x": 1}, eta=5.0, parent_id="p", headers={"h": 1},
                        options={"time_limit": 3})
    assert decode_envelope(encode_envelope(env)) == {
        "v": 1, "task": "proj.add", "id": "t-1", "args": [2, 3], "kwargs": {"x": 1}, "retries": 0, "eta": 5.0,
        "expires": None, "parent_id": "p", "root_id": "t-1", "headers": {"h": 1}, "options": {"time_limit": 3},
    }


@pytest.mark.parametrize("body,message", [
    (b"\xff", r"^task body is not CBOR: "),
    (cbor2.dumps([1]), r"^task body must be a CBOR map \(the task envelope\)$"),
    (cbor2.dumps({"id": "t", "args": [], "kwargs": {}}), r"^task envelope field 'task' is missing or not a str$"),
    (cbor2.dumps({"task": "a", "id": "t", "args": {}, "kwargs": {}}),
     r"^task envelope field 'args' is missing or not a list$"),
    (cbor2.dumps({"v": 2, "task": "a", "id": "t", "args": [], "kwargs": {}}),
     r"^task envelope version 2 is not supported \(this worker reads 1\)$"),
])
def test_a_bad_envelope_is_refused_naming_what_is_wrong(body, message):
    with pytest.raises(ValueError, match=message):
        decode_envelope(body)


def test_countdown_and_relative_expires_count_from_now_and_datetimes_become_unix_seconds():
    now = 1_700_000_000.0
    assert absolute_times(now, countdown=10) == (now + 10, None)
    assert absolute_times(now, countdown=10, eta=5.0) == (now + 10, None)  # countdown wins
    assert absolute_times(now, expires=60) == (None, now + 60)
    assert absolute_times(now, expires=now + 5) == (None, now + 5)  # a Unix time stays as it is
    at = dt.datetime(2030, 1, 1)  # naive means UTC
    assert absolute_times(now, eta=at, expires=at) == (at.replace(tzinfo=dt.timezone.utc).timestamp(),) * 2


def test_an_argument_cbor_cannot_carry_is_named_in_the_error():
    with pytest.raises(EncodeError, match=r"^keyword argument 'f' of proj\.add \(function\) cannot be sent"):
        check_encodable("proj.add", (1,), {"f": lambda: 0})
