"""Celery's app-level surface on our SDK (issue 14 items 1-3): settings read lazily with Celery's
defaults, ``shared_task``, lazy ``autodiscover_tasks``/``include``, every Celery task option
accepted, Celery's router rules, ``routing_key``/``exchange``, ``task_cls``/``app.Task``, and
per-call options honoured or refused by name.  Producer side against a real brokerd; what a
worker does with them is in tests/worker/test_worker_appconf.py."""

import re
import sys
import types

import pytest

from client import wire
from client.app import App, Task, decode_envelope
from client.routing import RoutingError
from tests.support.wireclient import Raw


@pytest.fixture
def app(broker):
    a = App("proj", broker=broker.address)
    yield a
    a.close()


def sent(port, queue, with_headers=False):
    """The envelope of the one task waiting in ``queue``, taken with a raw consumer
    (and the message's headers, which brokerd reads without the body)."""
    r = Raw(port)
    r.ok(wire.OP_CONSUME, [queue], 1)
    (d,) = r.deliveries(1)
    r.close()
    return (decode_envelope(d[5]), d[8] or {}) if with_headers else decode_envelope(d[5])


def fake_module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


# -- settings ------------------------------------------------------------------------------------
def test_an_unset_celery_setting_reads_as_celerys_default_and_an_unknown_one_names_itself():
    a = App("p", broker="127.0.0.1:1")
    assert a.conf.worker_send_task_events is False
    assert a.conf.task_serializer == "json" and a.conf.result_extended is False
    assert a.conf.broker_pool_acquire_timeout is None and a.conf.task_protocol == 2  # Celery 5.7's, read by its tests
    assert a.conf.task_default_queue == "celery" and a.conf.task_acks_late is True  # brokerd's own defaults stay
    with pytest.raises(AttributeError, match="no setting 'task_rutes'"):
        a.conf.task_rutes


def test_config_from_object_module_attr_with_namespace_is_read_lazily_and_live(monkeypatch):
    a = App("p", broker="127.0.0.1:1")
    # the module does not exist yet: Django calls config_from_object while settings still import
    a.config_from_object("late_settings_mod:settings", namespace="CELERY")
    settings = types.SimpleNamespace(CELERY_TASK_DEFAULT_QUEUE="from-settings", CELERY_TASK_ALWAYS_EAGER=False,
                                     task_default_queue="not-namespaced")
    fake_module(monkeypatch, "late_settings_mod", settings=settings)
    assert a.conf.task_default_queue == "from-settings"
    assert a.conf.task_always_eager is False
    settings.CELERY_TASK_ALWAYS_EAGER = True  # a test override after import is seen
    assert a.conf.task_always_eager is True
    a.conf.task_always_eager = False  # a value set on the app wins over the source
    assert a.conf.task_always_eager is False


def test_a_later_change_to_settings_makes_delay_eager(monkeypatch):
    settings = types.SimpleNamespace(CELERY_TASK_ALWAYS_EAGER=False)
    fake_module(monkeypatch, "eager_settings_mod", settings=settings)
    a = App("p", broker="127.0.0.1:1")  # nothing listens: a publish would fail
    a.config_from_object("eager_settings_mod:settings", namespace="CELERY")

    @a.task
    def add(x, y):
        return x + y

    settings.CELERY_TASK_ALWAYS_EAGER = True
    assert add.delay(2, 3).get() == 5


# -- shared_task, autodiscover, include ------------------------------------------------------------
def test_shared_task_defined_before_the_app_binds_to_the_current_app(broker, monkeypatch):
    from client import shared_task

    @shared_task(name="reusable.double")
    def double(x):
        return x * 2

    a = App("proj", broker=broker.address)
    try:
        assert "reusable.double" in a.tasks
        assert double(4) == 8  # a plain call runs it
        res = double.delay(21)
        assert res.app is a
        env = sent(broker.port, "celery")
        assert (env["task"], env["args"]) == ("reusable.double", [21])
        a.conf.task_always_eager = True
        assert double.delay(5).get() == 10  # the current app's settings count
    finally:
        a.close()


def test_shared_task_defined_after_the_app_is_registered_in_it():
    from client.app import shared_task

    a = App("p", broker="127.0.0.1:1")

    @shared_task(bind=True)
    def whoami(self):
        return self.name

    assert whoami.name in a.tasks and whoami() == whoami.name


def test_autodiscover_tasks_is_lazy_and_takes_a_callable(monkeypatch, tmp_path):
    pkg = tmp_path / "discpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text("import builtins\nbuiltins.DISCOVERED = getattr(builtins, 'DISCOVERED', 0) + 1\n")
    (tmp_path / "notaskspkg").mkdir()
    (tmp_path / "notaskspkg" / "__init__.py").write_text("")  # a package without tasks: skipped
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins

    monkeypatch.setattr(builtins, "DISCOVERED", 0, raising=False)
    calls = []

    def packages():
        calls.append(1)
        return ["discpkg", "notaskspkg"]

    a = App("p", broker="127.0.0.1:1")
    a.autodiscover_tasks(packages)
    assert calls == [] and builtins.DISCOVERED == 0  # nothing at call time (AppRegistryNotReady in Django)
    a.finalize()
    assert calls == [1] and builtins.DISCOVERED == 1


def test_include_is_imported_when_the_app_is_finalized(monkeypatch, tmp_path):
    (tmp_path / "included_tasks_mod.py").write_text(
        "from client.app import current_app\n"
        "@current_app().task(name='inc.t')\n"
        "def t():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    a = App("p", broker="127.0.0.1:1", include=["included_tasks_mod"])
    assert "inc.t" not in a.tasks
    a.finalize()
    assert "inc.t" in a.tasks
    sys.modules.pop("included_tasks_mod", None)


# -- Celery's task options --------------------------------------------------------------------------
CELERY_DECORATOR_OPTIONS = dict(
    rate_limit="10/m", serializer="json", reject_on_worker_lost=True, throws=(KeyError,), trail=False,
    store_errors_even_if_ignored=True, typing=False, send_events=True, compression="gzip", delivery_mode=2,
    acks_on_failure_or_timeout=True, resultrepr_maxsize=100, autoregister=True, lazy=True,
    exchange=None, routing_key=None, pydantic=False, track_started=True, expires=60,
)


def test_every_celery_task_option_is_accepted_by_the_decorator():
    a = App("p", broker="127.0.0.1:1")

    @a.task(**CELERY_DECORATOR_OPTIONS)
    def t():
        return 1

    assert t.rate_limit == "10/m" and t.throws == (KeyError,) and t.reject_on_worker_lost is True


@pytest.mark.parametrize("value, per_second", [("10/s", 10.0), ("120/m", 2.0), ("3600/h", 1.0), (5, 5.0), ("0", None)])
def test_rate_limit_takes_celerys_syntax_and_is_carried_to_brokerd(app, broker, value, per_second):
    """The task's rate travels in the x-rate-limit header brokerd enforces (protocol.md §5.2.1),
    as tasks per second; "0" is no limit (no header)."""
    @app.task(rate_limit=value, queue=f"rl-{str(value).replace('/', '-')}")
    def t():
        return 1

    t.delay()
    env, headers = sent(broker.port, t.queue, with_headers=True)
    assert headers.get("x-rate-limit") == per_second
    assert headers["x-task"] == t.name


@pytest.mark.parametrize("value", ["10/d", "ten/s", "-1/s", True, [1]])
def test_a_bad_rate_limit_is_refused_at_import_naming_it(value):
    a = App("p", broker="127.0.0.1:1")
    with pytest.raises(ValueError, match="rate_limit"):
        a.task(rate_limit=value)(lambda: None)


def test_app_backend_answers_celerys_result_calls_from_brokerd(app):
    app.backend.store_result("bk-1", {"n": 1}, "SUCCESS")
    assert app.backend.get_state("bk-1") == "SUCCESS"
    assert app.backend.get_result("bk-1") == {"n": 1}
    assert app.backend.get_task_meta("bk-1")["result"] == {"n": 1}
    app.backend.forget("bk-1")
    assert app.backend.get_state("bk-1") == "PENDING"


def test_set_default_makes_an_app_the_one_shared_tasks_use():
    from client.app import shared_task

    a = App("a", broker="127.0.0.1:1")
    App("b", broker="127.0.0.1:2")
    a.set_default()

    @shared_task(name="dflt.t")
    def t():
        return 1

    assert t.app is a


def test_a_serializer_other_than_a_data_one_is_refused_saying_what_we_do_instead(app):
    with pytest.raises(ValueError, match=r"serializer is 'pickle': brokerd sends every task as CBOR, which carries "
                                         r"everything JSON does and more"):
        app.task(serializer="pickle")(lambda: None)

    @app.task(serializer="json")
    def ok():
        return 1

    with pytest.raises(ValueError, match="serializer is 'pickle'"):
        ok.apply_async(serializer="pickle")
    app.conf.task_serializer = "pickle"
    with pytest.raises(ValueError, match="the setting task_serializer is 'pickle'"):
        ok.delay()


def test_typing_checks_the_arguments_at_delay_like_celery(app):
    @app.task
    def add(x, y):
        return x + y

    with pytest.raises(TypeError, match=r"add\(\) missing a required argument: 'y'"):
        add.delay(5)

    @app.task(bind=True)
    def bound(self, x):
        return x

    with pytest.raises(TypeError, match="too many positional arguments"):
        bound.delay(1, 2)

    @app.task(typing=False)
    def loose(x, y):
        return x

    loose.delay(5)  # typing=False: no check, sent as given


def test_pydantic_validates_and_converts_arguments_and_dumps_a_returned_model():
    pydantic = pytest.importorskip("pydantic", reason="pydantic is not installed")

    class Item(pydantic.BaseModel):
        name: str
        qty: int

    a = App("p", broker="127.0.0.1:1")

    @a.task(pydantic=True)
    def restock(item: Item, extra: int) -> Item:
        return Item(name=item.name, qty=item.qty + extra)

    assert restock({"name": "nut", "qty": "3"}, "2") == {"name": "nut", "qty": 5}
    with pytest.raises(pydantic.ValidationError):
        restock({"name": "nut"}, 1)


def test_pydantic_string_annotations_are_resolved_even_when_the_model_comes_later():
    """``data: "Model"`` (or ``from __future__ import annotations``) is validated like the class itself;
    resolved at the first run, so the model may be defined below the task, as in Celery's tasks.py."""
    pytest.importorskip("pydantic", reason="pydantic is not installed")
    ns = {"__name__": "strann_tasks"}
    exec("import pydantic\n"
         "def restock(item: 'Item', extra: 'int') -> 'Item':\n"
         "    return Item(name=item.name, qty=item.qty + extra)\n"
         "class Item(pydantic.BaseModel):\n"
         "    name: str\n"
         "    qty: int\n", ns)
    a = App("p", broker="127.0.0.1:1")
    restock = a.task(pydantic=True)(ns["restock"])
    assert restock({"name": "nut", "qty": "3"}, "2") == {"name": "nut", "qty": 5}


def test_a_pydantic_tasks_models_are_sent_as_data_from_a_signature_too(app, broker):
    pydantic = pytest.importorskip("pydantic", reason="pydantic is not installed")

    class Item(pydantic.BaseModel):
        name: str
        qty: int

    @app.task(pydantic=True, queue="pyd")
    def restock(item: Item) -> Item:
        return item

    restock.s(Item(name="nut", qty=3)).delay()  # was an EncodeError: only delay() dumped models
    assert sent(broker.port, "pyd")["args"] == [{"name": "nut", "qty": 3}]


# -- per-call options ----------------------------------------------------------------------------------
def test_an_unknown_call_option_is_refused_naming_it_instead_of_being_stored(app):
    @app.task
    def t():
        return 1

    with pytest.raises(TypeError, match=r"apply_async\(\) of .* got an option brokerd does not know: 'retries'"):
        t.apply_async(retries=3)
    with pytest.raises(TypeError, match="'colour'"):
        app.send_task("x.y", colour="blue")


def test_per_call_ignore_result_and_shadow_are_carried_and_noops_are_dropped(app, broker):
    @app.task(queue="carry")
    def t():
        return 1

    t.apply_async(ignore_result=True, shadow="t-for-42", compression="zlib", retry=True, add_to_parent=False)
    opts = sent(broker.port, "carry")["options"]
    assert opts == {"ignore_result": True, "shadow": "t-for-42"}
    with pytest.raises(TypeError, match="ignore_result must be True or False"):
        t.apply_async(ignore_result="yes")


# -- routing ----------------------------------------------------------------------------------------
def test_task_routes_as_a_function_and_a_list_first_match_wins(app, broker):
    seen = []

    def router(name, args, kwargs, options, task=None, **kw):
        seen.append((name, args, kwargs))
        if name.endswith(".big") and args and args[0] > 100:
            return {"queue": "bulk", "priority": 2}
        return None

    app.conf.task_routes = [router, {re.compile(r".*\.big$"): "small", "*.other": {"queue": "others"}},
                            {"x.big": "never"}]
    app.send_task("x.big", (500,))
    app.send_task("x.big", (1,))
    app.send_task("x.other")
    assert seen[0] == ("x.big", (500,), {})
    assert sent(broker.port, "bulk")["args"] == [500]
    assert sent(broker.port, "small")["args"] == [1]
    assert sent(broker.port, "others")["task"] == "x.other"
    app.conf.task_routes = "tests.client.test_appconf.path_router"  # a dotted path to a router
    app.send_task("x.any")
    assert sent(broker.port, "by-path")["task"] == "x.any"


def path_router(name, args, kwargs, options, task=None, **kw):
    return "by-path"


def test_routing_key_names_the_queue_and_a_foreign_exchange_is_refused(app, broker):
    @app.task
    def t():
        return 1

    t.apply_async(routing_key="video")
    assert sent(broker.port, "video")["task"] == t.name
    t.apply_async(routing_key="audio", exchange="audio")  # Celery's per-queue exchange: the same name
    assert sent(broker.port, "audio")["task"] == t.name
    app.conf.task_routes = {t.name: {"routing_key": "from-route"}}
    t.delay()
    assert sent(broker.port, "from-route")["task"] == t.name
    with pytest.raises(RoutingError, match="exchange 'media', which brokerd cannot honour"):
        t.apply_async(exchange="media", routing_key="media.video")
    app.conf.task_routes = {t.name: {"exchange": "media", "routing_key": "media.video"}}
    with pytest.raises(RoutingError, match="task_routes route of .* exchange 'media'"):
        t.delay()


def test_task_cls_and_app_Task_are_the_base_of_the_apps_tasks():
    calls = []

    class ContextTask(Task):
        def __call__(self, *args, **kwargs):
            calls.append(self.name)  # Flask's pattern: `with app.app_context(): return self.run(...)`
            return self.run(*args, **kwargs)

    a = App("p", broker="127.0.0.1:1", task_cls=ContextTask)

    @a.task(bind=True)
    def bound(self, x):
        return (self.name, x)

    assert bound(1) == (bound.name, 1) and calls == [bound.name]
    b = App("q", broker="127.0.0.1:1")
    b.Task = ContextTask

    @b.task
    def plain(x):
        return x

    assert isinstance(plain, ContextTask) and plain(2) == 2 and calls[-1] == plain.name
    c = App("r", broker="127.0.0.1:1", task_cls="tests.client.test_appconf:PathTask")

    @c.task
    def other():
        return 3

    assert isinstance(other, PathTask)


class PathTask(Task):
    pass


def test_eager_calls_accept_the_routing_options_and_refuse_unknown_ones():
    a = App("p", broker="127.0.0.1:1", task_always_eager=True)

    @a.task
    def t(x):
        return x

    assert t.apply_async((3,), routing_key="video", exchange="video", ignore_result=True).get() == 3
    with pytest.raises(TypeError, match="'colour'"):
        t.apply_async((3,), colour="blue")


def test_a_setting_a_source_gets_later_is_seen_even_after_its_default_was_read(monkeypatch):
    settings = types.SimpleNamespace()
    fake_module(monkeypatch, "routes_settings_mod", settings=settings)
    a = App("p", broker="127.0.0.1:1")
    a.config_from_object("routes_settings_mod:settings", namespace="CELERY")
    assert a.conf.task_routes == {}
    settings.CELERY_TASK_ROUTES = {"x.y": "later"}  # Django's override_settings in a test
    assert a.conf.task_routes == {"x.y": "later"}


def test_a_soft_time_limit_above_the_hard_one_is_refused_at_the_call():
    a = App("p", broker="127.0.0.1:1")

    @a.task(soft_time_limit=2, time_limit=1)
    def never_soft():
        return 1

    with pytest.raises(ValueError, match="soft_time_limit must be less than or equal to time_limit"):
        never_soft.apply_async()

    @a.task
    def free():
        return 1

    with pytest.raises(ValueError, match="soft 30 s, hard 10 s"):
        free.apply_async(time_limit=10, soft_time_limit=30)


def test_apply_inside_a_task_makes_it_the_parent_and_shares_its_root():
    a = App("p", broker="127.0.0.1:1")

    @a.task(bind=True)
    def child(self):
        return [self.request.id, self.request.parent_id, self.request.root_id]

    @a.task(bind=True)
    def parent(self):
        return [self.request.id, self.request.parent_id, self.request.root_id, child.apply().get()]

    pid, p_parent, p_root, (cid, c_parent, c_root) = parent.apply().get()
    assert (p_parent, p_root) == (None, pid)
    assert (c_parent, c_root) == (pid, pid) and cid != pid
