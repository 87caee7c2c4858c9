"""The pure parts of Celery's surface (issue 14 items 5-6, naive datetimes): rebuilding a task's
exception from a FAILURE's meta under the import rule, even from hostile metas; client.signals; the
envelope's tags for naive datetimes and times of day."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import sys

import cbor2
import pytest

from client import signals
from client.envelope import check_encodable, decode_envelope, encode_envelope, make_envelope
from client.exceptions import REMOTE_CLASSES_MAX, RemoteError, SoftTimeLimitExceeded, _remote_classes
from client.result import exception_from


class LocalError(Exception):
    pass


class FakeApp:
    """What exception_from reads of an app: its tasks and its include setting."""

    def __init__(self, include=()):
        self.tasks = {}
        self.conf = {"include": list(include)}


def meta(module, qualname, msg="boom", **more):
    return {"exc_type": qualname.rpartition(".")[2], "exc_message": msg, "exc_module": module,
            "exc_qualname": qualname, "traceback": "Traceback ...", **more}


# -- exceptions ------------------------------------------------------------------------------------
def test_an_imported_class_is_rebuilt_with_its_args():
    exc = exception_from(meta(__name__, "LocalError", exc_args=["a", 2]))
    assert type(exc) is LocalError and exc.args == ("a", 2)
    assert exc.remote_traceback == "Traceback ..."


def test_a_module_not_imported_is_never_imported_on_a_result_s_say_so():
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    for mod in ("antigravity", "this"):
        exc = exception_from(meta(mod, "Boom"))
        assert isinstance(exc, RemoteError) and type(exc).__name__ == "Boom" and type(exc).__module__ == mod
        assert mod not in sys.modules


def test_a_module_in_the_app_s_include_is_imported_to_rebuild_the_class():
    mod = "tests.worker_apps.surface_included"
    sys.modules.pop(mod, None)
    assert isinstance(exception_from(meta(mod, "IncludedError")), RemoteError)  # no app: not imported
    assert mod not in sys.modules
    exc = exception_from(meta(mod, "IncludedError"), FakeApp(include=[mod]))
    assert type(exc).__name__ == "IncludedError" and not isinstance(exc, RemoteError)
    assert exc.args == ("boom",)


@pytest.mark.parametrize("bad", [
    meta("os", "system"),  # a function, not a class
    meta("builtins", "SystemExit"),  # never a BaseException that stops the caller
    meta("builtins", "KeyboardInterrupt"),
    meta("os", "path.join"),
    meta(__name__, "LocalError.__class__.__mro__"),
    meta(__name__, "not valid"),
    meta(__name__, "a." * 20 + "b"),
    {"exc_type": 5, "exc_message": ["x"], "exc_module": 7},
    {"exc_type": "SystemExit"},
    {"exc_type": "not an identifier!", "exc_message": "x"},
    "not a map",
])
def test_hostile_metas_give_a_remote_error_and_nothing_else(bad):
    exc = exception_from(bad)
    assert isinstance(exc, (RemoteError, Exception)) and not isinstance(exc, (SystemExit, KeyboardInterrupt))
    if isinstance(bad, dict) and isinstance(bad.get("exc_module"), str) and bad["exc_module"] != "builtins":
        assert isinstance(exc, RemoteError)


def test_a_constructor_that_rejects_the_args_falls_back_to_a_remote_error():
    class Picky(Exception):
        def __init__(self, a, b, c):
            super().__init__(a, b, c)

    sys.modules[__name__].Picky = Picky
    try:
        exc = exception_from(meta(__name__, "Picky", exc_args="not a list"))
        assert isinstance(exc, RemoteError) and type(exc).__name__ == "Picky"
        assert type(exception_from(meta(__name__, "Picky", exc_args=[1, 2, 3]))) is Picky
    finally:
        del sys.modules[__name__].Picky


def test_builtins_and_the_task_layer_s_own_stay_themselves():
    assert type(exception_from({"exc_type": "ValueError", "exc_message": "x"})) is ValueError
    assert type(exception_from({"exc_type": "SoftTimeLimitExceeded", "exc_message": "x"})) is SoftTimeLimitExceeded


def test_remote_classes_are_bounded():
    saved = dict(_remote_classes)
    try:
        for i in range(REMOTE_CLASSES_MAX + 5):
            exception_from(meta("never.imported", f"E{i}"))
        assert len(_remote_classes) <= REMOTE_CLASSES_MAX
        assert type(exception_from(meta("never.imported", "Another"))) is RemoteError  # full: the plain class
    finally:  # later tests in this process get named classes again
        _remote_classes.clear()
        _remote_classes.update(saved)


# -- signals ----------------------------------------------------------------------------------------
def test_connect_as_decorator_with_and_without_options_and_sender_filtering():
    sig = signals.Signal("t")
    got = []

    @sig.connect
    def any_sender(sender=None, **kw):
        got.append(("any", sender, kw["x"]))

    @sig.connect(sender="a")
    def only_a(sender=None, **kw):
        got.append(("a", sender, kw["x"]))

    sig.send(sender="a", x=1)
    sig.send(sender="b", x=2)
    assert got == [("any", "a", 1), ("a", "a", 1), ("any", "b", 2)]
    assert sig.disconnect(only_a, sender="a") and not sig.disconnect(only_a, sender="a")
    assert sig.disconnect(any_sender)
    assert sig.send(sender="a", x=3) == []


def test_dispatch_uid_connects_once_and_weak_receivers_go_away():
    sig = signals.Signal("t")
    calls = []
    sig.connect(lambda **kw: calls.append(1), dispatch_uid="u", weak=False)
    sig.connect(lambda **kw: calls.append(2), dispatch_uid="u", weak=False)
    sig.send(sender=None)
    assert calls == [1]

    class Holder:
        def method(self, **kw):
            calls.append("m")

    h = Holder()
    sig.connect(h.method)  # weak by default: gone with h
    sig.send(sender=None)
    assert calls == [1, 1, "m"]
    del h
    gc.collect()
    sig.send(sender=None)
    assert calls == [1, 1, "m", 1]
    assert sig.disconnect(dispatch_uid="u")


def test_a_receiver_that_raises_is_logged_and_the_others_still_run(caplog):
    sig = signals.Signal("t")
    ran = []

    def bad(**kw):
        raise RuntimeError("receiver broke")

    def good(**kw):
        ran.append(kw["signal"])

    sig.connect(bad)
    sig.connect(good)
    with caplog.at_level(logging.ERROR, logger="brokerd.signals"):
        out = sig.send(sender=None)
    assert ran == [sig]
    assert isinstance(out[0][1], RuntimeError) and "receiver broke" in caplog.text


def test_every_celery_signal_name_is_there():
    for name in ("task_prerun", "task_postrun", "task_success", "task_failure", "task_retry", "task_revoked",
                 "task_received", "task_rejected", "task_unknown", "before_task_publish", "after_task_publish",
                 "worker_init", "worker_process_init", "worker_process_shutdown", "worker_ready", "worker_shutdown",
                 "after_setup_logger", "setup_logging", "celeryd_init", "beat_init"):
        assert isinstance(getattr(signals, name), signals.Signal) and getattr(signals, name).name == name


def test_connect_refuses_what_is_not_a_receiver():
    with pytest.raises(TypeError, match="one receiver"):
        signals.Signal("t").connect(1, 2)
    with pytest.raises(TypeError, match="must be callable"):
        signals.Signal("t").connect(sender="x")(5)


# -- naive datetimes and times of day ---------------------------------------------------------------
def test_naive_datetimes_and_times_round_trip_in_the_envelope():
    naive = dt.datetime(2026, 12, 2, 10, 30, 0, 5)
    aware = dt.datetime(2026, 12, 2, 10, 30, tzinfo=dt.timezone.utc)
    args = [naive, dt.time(10, 30), [{"t": dt.time(8, 0, tzinfo=dt.timezone.utc)}], aware, dt.date(2026, 1, 2)]
    check_encodable("t", args, {"at": naive})  # refused before: "naive datetime encountered"
    env = decode_envelope(encode_envelope(make_envelope("t", "id", args, {"at": naive})))
    assert env["args"] == args and env["kwargs"] == {"at": naive}
    assert env["args"][0].tzinfo is None and env["args"][3].tzinfo is not None


@pytest.mark.parametrize("tag, why", [
    (cbor2.CBORTag(50001, 5), "must hold ISO 8601 text"),
    (cbor2.CBORTag(50001, "x" * 100), "at most 64 characters"),
    (cbor2.CBORTag(50001, "2026-12-02T10:30:00+02:00"), "it has a UTC offset"),
    (cbor2.CBORTag(50001, "yesterday"), "not ISO 8601"),
    (cbor2.CBORTag(50002, "25:00"), "not ISO 8601"),
])
def test_a_bad_datetime_tag_is_a_clear_decode_error(tag, why):
    body = cbor2.dumps({"task": "t", "id": "i", "args": [tag], "kwargs": {}})
    with pytest.raises(ValueError, match=why):
        decode_envelope(body)


def test_a_result_set_of_eager_results_joins_without_a_broker():
    from client.result import EagerResult, ResultSet

    rs = ResultSet([EagerResult("a", 1, "SUCCESS"), EagerResult("b", None, "FAILURE", exc=LocalError("x"))])
    assert rs.ready() and rs.failed() and not rs.successful() and rs.completed_count() == 1
    got = rs.join(propagate=False)
    assert got[0] == 1 and isinstance(got[1], LocalError)
    with pytest.raises(LocalError):
        rs.join_native()
    seen = []
    ResultSet([EagerResult("a", 1, "SUCCESS")]).join(callback=lambda tid, v: seen.append((tid, v)))
    assert seen == [("a", 1)]


def test_app_backend_allows_chords_because_brokerd_counts_them():
    """Celery's canvas code asks ``app.backend.ensure_chords_allowed()`` before a chord (it raises on
    backends that cannot count); brokerd counts every chord itself, so it never refuses."""
    from client.app import App

    a = App("p", broker="127.0.0.1:1")
    assert a.backend.ensure_chords_allowed() is None


class _Results:
    """An app whose brokerd knows these results (task id -> result map); nothing else."""

    def __init__(self, results):
        self.tasks, self.conf = {}, {}
        self.client = self
        self.results = results

    def get_result(self, task_id, wait=None):
        return self.results.get(task_id, {"id": task_id, "state": "PENDING"})


def test_chord_and_chain_errors_are_followed_to_the_first_failure_or_kept_when_it_cannot_be_read():
    from client.exceptions import ChainError, ChordError
    from client.result import AsyncResult

    app = _Results({
        "last": {"state": "FAILURE", "meta": {"exc_type": "ChainError",
                                              "exc_message": "chain step a.body[body-1] failed: ChordError: ..."}},
        "body-1": {"state": "FAILURE", "meta": {"exc_type": "ChordError",
                                                "exc_message": "chord member m-2 failed: KeyError: 'k'"}},
        "m-2": {"state": "FAILURE", "meta": {"exc_type": "KeyError", "exc_message": "'k'", "exc_args": ["k"]}},
        "orphan": {"state": "FAILURE", "meta": {"exc_type": "ChordError",
                                                "exc_message": "chord member gone failed: KeyError: 'k'"}},
        "loop": {"state": "FAILURE", "meta": {"exc_type": "ChordError", "exc_message": "chord member loop failed: x"}},
        "odd": {"state": "FAILURE", "meta": {"exc_type": "ChordError", "exc_message": "chord member [x failed"}},
    })
    with pytest.raises(KeyError) as e:
        AsyncResult("last", app=app).get(timeout=1)
    assert isinstance(e.value.__cause__, ChainError)
    with pytest.raises(ChordError, match="chord member gone failed"):  # the member's result is gone
        AsyncResult("orphan", app=app).get(timeout=1)
    with pytest.raises(ChordError):  # a (hostile) cycle ends after FAILURE_HOPS_MAX lookups
        AsyncResult("loop", app=app).get(timeout=1)
    with pytest.raises(ChordError):
        AsyncResult("odd", app=app).get(timeout=1)
    assert isinstance(AsyncResult("m-2", app=app).get(timeout=1, propagate=False), KeyError)
