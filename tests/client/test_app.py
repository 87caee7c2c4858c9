"""The task API against a real brokerd, with the worker's side played by hand."""

import datetime as dt
import threading
import time

import cbor2
import pytest

from client import wire
from client.app import (
    App,
    AsyncResult,
    EncodeError,
    RemoteError,
    Task,
    TimeoutError,
    decode_envelope,
    exception_from,
)
from tests.support.wireclient import Raw


@pytest.fixture
def app(broker):
    a = App("proj", broker=broker.address)
    yield a
    a.close()


def take(port, queue, n=1):
    r = Raw(port)
    r.ok(wire.OP_CONSUME, [queue], n)
    got = r.deliveries(n)
    return r, got


def test_delay_publishes_the_task_envelope_and_returns_its_id_at_once(app, broker):
    @app.task(queue="emails", priority=7)
    def send(user, subject="hi"):
        return user

    res = send.delay(42, subject="welcome")
    r, (d,) = take(broker.port, "emails")
    env = decode_envelope(d[5])
    assert d[4] == res.id == env["id"]  # message id is the task id
    assert d[6] == 7
    assert (env["task"], env["args"], env["kwargs"]) == (send.name, [42], {"subject": "welcome"})
    assert env["root_id"] == res.id and env["parent_id"] is None and env["retries"] == 0


def test_calling_a_task_directly_runs_it_here(app):
    @app.task(bind=True)
    def whoami(self, x):
        return (self.name, x)

    assert whoami(3) == (whoami.name, 3)


def test_routes_and_send_task_by_name(app, broker):
    app.conf.update(task_routes={"proj.tasks.send_sms": {"queue": "high"}, "proj.reports.*": {"queue": "low"}})
    a = app.send_task("proj.tasks.send_sms", ["+33..."], {})
    b = app.send_task("proj.reports.weekly")
    c = app.send_task("other.thing")
    assert Raw(broker.port).ok(wire.OP_STATS, "high")["ready"] == 1
    assert Raw(broker.port).ok(wire.OP_STATS, "low")["ready"] == 1
    assert Raw(broker.port).ok(wire.OP_STATS, "celery")["ready"] == 1
    assert len({a.id, b.id, c.id}) == 3


def test_countdown_and_eta_are_held_by_the_broker(app, broker):
    @app.task
    def later():
        pass

    later.apply_async(countdown=30)
    later.apply_async(eta=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60))
    st = Raw(broker.port).ok(wire.OP_STATS, "celery")
    assert (st["ready"], st["delayed"]) == (0, 2)


def test_an_argument_cbor_cannot_carry_fails_at_delay_naming_it(app, broker):
    @app.task
    def f(a, b=None):
        pass

    with pytest.raises(EncodeError, match=r"^argument 1 of tests\.client\.test_app\.f \(function\) cannot be sent to a worker: "):
        f.delay(1, lambda: 0)
    with pytest.raises(EncodeError, match=r"^keyword argument 'b' of tests\.client\.test_app\.f \(lock\) cannot be sent to a worker: "):
        f.delay(1, b=threading.Lock())
    assert Raw(broker.port).ok(wire.OP_STATS)["queues"] == {}


def test_get_waits_in_the_broker_and_returns_the_value(app, broker):
    @app.task
    def add(x, y):
        return x + y

    res = add.delay(2, 2)
    assert res.state == "PENDING" and not res.ready()

    def worker():
        r, (d,) = take(broker.port, "celery")
        time.sleep(0.2)  # the producer is already parked in RESULT_GET
        env = decode_envelope(d[5])
        r.ok(wire.OP_RESULT_SET, env["id"], "SUCCESS", sum(env["args"]), None, {"tag": d[2]})

    t = threading.Thread(target=worker)
    t.start()
    assert res.get(timeout=10) == 4
    t.join()
    assert res.successful() and res.state == "SUCCESS" and res.result == 4


def test_get_reraises_builtins_as_themselves_and_others_as_remote_error(app, broker):
    w = Raw(broker.port)
    w.ok(wire.OP_RESULT_SET, "t-builtin", "FAILURE", None,
         {"exc_type": "ZeroDivisionError", "exc_message": "division by zero", "traceback": "Traceback..."}, None)
    w.ok(wire.OP_RESULT_SET, "t-custom", "FAILURE", None,
         {"exc_type": "PaymentDeclined", "exc_message": "card 4242 declined", "traceback": "tb"}, None)
    with pytest.raises(ZeroDivisionError, match=r"^division by zero$"):
        app.AsyncResult("t-builtin").get(timeout=5)
    with pytest.raises(RemoteError, match=r"^PaymentDeclined: card 4242 declined$") as e:
        AsyncResult("t-custom", app=app).get(timeout=5)
    assert e.value.exc_type == "PaymentDeclined" and e.value.traceback == "tb"
    r = app.AsyncResult("t-custom")
    assert r.failed() and r.traceback == "tb" and isinstance(r.get(propagate=False), RemoteError)


def test_get_times_out_when_nothing_finishes(app):
    with pytest.raises(TimeoutError, match=r"did not finish within 0.3s \(state PENDING\)"):
        app.AsyncResult("never").get(timeout=0.3)


def test_forget_drops_the_result(app, broker):
    Raw(broker.port).ok(wire.OP_RESULT_SET, "t1", "SUCCESS", 1, None, None)
    r = app.AsyncResult("t1")
    assert r.get(timeout=5) == 1
    r.forget()
    assert app.AsyncResult("t1").state == "PENDING"


def test_configuration_the_celery_ways():
    class Settings:
        task_default_queue = "work"
        CELERY_TASK_ROUTES = {"x": {"queue": "y"}}
        ignored_Mixed = 1

    a = App("p", broker="127.0.0.1:1", task_default_priority=3)
    a.config_from_object(Settings)
    assert a.conf.task_default_queue == "work" and a.conf.task_default_priority == 3
    a.config_from_object(Settings, namespace="CELERY")
    assert a.conf.task_routes == {"x": {"queue": "y"}}
    a.conf.update(task_acks_late=False)
    assert a.conf["task_acks_late"] is False


def test_unknown_task_options_are_refused():
    a = App("p", broker="127.0.0.1:1")
    with pytest.raises(TypeError, match=r"^@app.task got an unknown option 'retries' \(for "):
        a.task(retries=3)(lambda: None)


def test_base_class_hooks_and_options_are_inherited():
    class Base(Task):
        max_retries = 9

        def on_success(self, retval, task_id, args, kwargs):
            return "hooked"

    a = App("p", broker="127.0.0.1:1")

    @a.task(base=Base)
    def t():
        pass

    assert isinstance(t, Base) and t.max_retries == 9 and t.on_success(1, "i", (), {}) == "hooked"


def test_retry_backoff_is_exponential_capped_and_jittered():
    a = App("p", broker="127.0.0.1:1")

    @a.task(retry_backoff=2, retry_backoff_max=10, retry_jitter=False)
    def t():
        pass

    assert [t.retry_delay(n) for n in range(5)] == [2, 4, 8, 10, 10]

    @a.task(retry_backoff=True)
    def j():
        pass

    assert all(0 <= j.retry_delay(3) <= 8 for _ in range(50))


def test_exception_from_meta():
    assert isinstance(exception_from({"exc_type": "KeyError", "exc_message": "'k'"}), KeyError)
    e = exception_from({"exc_type": "SystemExit", "exc_message": "x"})
    assert isinstance(e, RemoteError)  # never raise SystemExit in a web app


def test_eager_mode_runs_in_process(broker):
    a = App("p", broker=broker.address, task_always_eager=True)

    @a.task
    def mul(x, y):
        return x * y

    assert mul.delay(3, 4).get() == 12
    assert Raw(broker.port).ok(wire.OP_STATS)["queues"] == {}


def test_bodies_are_cbor_maps_another_language_can_read(app, broker):
    @app.task
    def f(*a, **k):
        pass

    f.apply_async((1, "two", b"\x03"), {"k": [1.5, None]}, headers={"trace": "abc"}, expires=60)
    r, (d,) = take(broker.port, "celery")
    env = cbor2.loads(d[5])
    assert set(env) >= {"v", "task", "id", "args", "kwargs", "retries", "eta", "expires", "parent_id", "root_id", "headers"}
    assert env["args"] == [1, "two", b"\x03"] and env["headers"] == {"trace": "abc"}
    assert env["expires"] > time.time() + 50


def test_get_timing_out_on_a_queue_without_consumer_says_so(app):
    @app.task
    def lonely():
        pass

    r = lonely.delay()
    with pytest.raises(TimeoutError) as exc:
        r.get(timeout=0.3)
    assert str(exc.value) == (
        f"task {r.id} did not finish within 0.3s (state PENDING); it is queued in 'celery', which has no "
        "consumer: start a worker that reads it (brokerd-worker MODULE:APP -Q celery)"
    )


def test_get_without_a_timeout_warns_once_why_it_may_wait_for_ever(app, broker, caplog, monkeypatch):
    import client.result

    monkeypatch.setattr(client.result, "SLOW_GET_WARNING", 0.3)

    @app.task
    def later():
        pass

    r = later.apply_async(queue="nobody.reads")
    threading.Timer(1.0, lambda: app.client.store_result(r.id, "SUCCESS", 7)).start()
    with caplog.at_level("WARNING", logger="brokerd.client"):
        assert r.get() == 7
    warnings = [m.getMessage() for m in caplog.records if m.name == "brokerd.client"]
    assert len(warnings) == 1 and warnings[0].startswith(f"still waiting for task {r.id} after ")
    assert "it is queued in 'nobody.reads', which has no consumer" in warnings[0]
