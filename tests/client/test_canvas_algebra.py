"""The canvas algebra, pure: what each composition produces (Celery's celery/canvas.py 5.x rules), how a
chain is normalized before it runs, where callbacks land, and how signatures travel as maps.  No broker."""

import cbor2
import pytest

from client import App
from client.canvas import (
    Signature,
    _final_ids,
    callbacks_extra,
    chain,
    chord,
    errback_takes_request,
    group,
    maybe_signature,
)

app = App("algebra")


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(xs):
    return sum(xs)


@app.task
def new_style(request, exc, traceback):
    pass


@app.task
def old_style(task_id):
    pass


@app.task(bind=True)
def bound(self, task_id, exc=None, tb=None):
    pass


def kinds(c):
    return [type(x).__name__ for x in c.tasks]


def test_pipes_make_chains_and_a_chain_of_a_chain_is_flattened_when_it_runs():
    c = add.s(1, 1) | add.s(2) | add.s(3)
    assert isinstance(c, chain) and kinds(c) == ["Signature"] * 3
    nested = chain(add.s(4, 4) | add.s(8))  # the Next Steps guide's spelling
    assert isinstance(nested, chain) and kinds(nested) == ["chain"]
    assert [s.name for s in nested.steps()] == [add.name, add.name]
    assert kinds(chain(add.s(1, 1), add.s(2) | add.s(3))) == ["Signature"] * 3  # chain | chain is flat


def test_a_group_followed_by_a_task_is_a_chord_and_sig_then_group_is_a_chain():
    c = add.s(2, 2) | group(add.s(1), add.s(2)) | tsum.s()
    assert isinstance(c, chain) and kinds(c) == ["Signature", "chord"]
    assert c.tasks[1].body.name == tsum.name and len(c.tasks[1].tasks) == 2
    assert isinstance(group(add.s(1, 1), add.s(2, 2)) | tsum.s(), chord)
    assert kinds(add.s(1, 1) | group(add.s(1), add.s(2))) == ["Signature", "group"]
    assert kinds(add.s(1, 1) | group(add.s(1))) == ["Signature", "Signature"]  # a group of one is unrolled
    assert isinstance(chain(group(add.s(1, 1)), tsum.s()), chain)


def test_group_then_group_and_chord_then_task():
    gg = group(add.s(1, 1), add.s(2, 2)) | group(tsum.s(), tsum.s())
    assert isinstance(gg, chord) and isinstance(gg.body, group)
    ct = chord([add.s(1, 1)], tsum.s()) | add.s(10)
    assert isinstance(ct, chord) and isinstance(ct.body, chain) and kinds(ct.body) == ["Signature", "Signature"]
    c = (add.s(1, 1) | chord([add.s(1)], tsum.s())) | add.s(5)  # a chain ending in a chord: joins its body
    assert kinds(c) == ["Signature", "chord"] and kinds(c.tasks[1].body) == ["Signature", "Signature"]


def test_normalizing_a_chain_leaves_a_group_or_chord_only_as_its_last_step():
    c = chain(add.s(1, 1), chord([add.s(1)], tsum.s()), add.s(10), add.s(1))
    steps = c.steps()
    assert [type(s).__name__ for s in steps] == ["Signature", "chord"]
    assert isinstance(steps[1].body, chain) and [s.name for s in steps[1].body.tasks] == [tsum.name, add.name, add.name]
    g = chain(add.s(1, 1), group(add.s(1), add.s(2)), add.s(3)).steps()  # a group in the middle → chord
    assert [type(s).__name__ for s in g] == ["Signature", "chord"]


def test_freezing_names_every_task_and_a_chords_final_id_is_its_bodys():
    c = add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s() | add.s(3)
    r = c.freeze()
    assert r.id == c.tasks[-1].body.tasks[-1].id and r.parent.parent is not None
    ch = chord([add.s(1, 1) | add.s(2), add.s(3, 3)], tsum.s())
    ch.freeze()
    assert _final_ids(ch) == [ch.body.id]
    assert _final_ids(ch.tasks[0]) == [ch.tasks[0].tasks[-1].id]  # a chain in a header counts by its last task


def test_immutable_signatures_ignore_the_parents_result():
    s = add.s(10, 20).set(immutable=True)
    assert s.immutable and "immutable" not in s.options
    assert s.clone((99,)).args == (10, 20)
    assert add.si(1, 2).clone((99,)).args == (1, 2)
    assert add.s(1).clone((99,)).args == (99, 1)


def test_callbacks_land_where_celery_puts_them():
    c = add.s(1, 1) | add.s(2) | add.s(3)
    c.link(tsum.s())
    c.link_error(old_style.s())
    steps = c.steps()
    assert [len(s.options.get("link") or []) for s in steps] == [0, 0, 1]  # the chain's result: its last task
    assert all(len(s.options["link_error"]) == 1 for s in steps)  # any step may fail
    g = group(add.s(1, 1), add.s(2, 2))
    g.link(tsum.s())
    assert g.tasks[0].options["link"][0].immutable and "link" not in g.tasks[1].options
    g.link_error(old_style.s())  # Celery 5.7: each member gets a mutable copy (an old-style one gets its id)
    assert [t.options["link_error"][0].immutable for t in g.tasks] == [False, False]
    assert g.tasks[0].options["link_error"][0] is not g.tasks[1].options["link_error"][0]
    one = add.s(1, 1).set(link_error=old_style.si())  # one signature as the option (Celery allows it)
    one.link_error(old_style.s())
    assert [e.immutable for e in one.options["link_error"]] == [True, False]
    ch = chord([add.s(1, 1)], tsum.s())
    ch.link(add.s(1))
    assert ch.body.options["link"][0].name == add.name
    assert add.s(1, 1).on_error(old_style.s()).name == add.name  # on_error returns the signature itself


def test_task_apply_async_link_options_become_envelope_keys():
    opts = {"link": add.s(1), "link_error": [old_style.s()], "countdown": 3}
    extra = callbacks_extra(opts, app)
    assert opts == {"countdown": 3}  # taken out of the per-call options, where they were lost
    assert extra["link"][0]["task"] == add.name and extra["link_error"][0]["task"] == old_style.name
    assert type(extra["link"][0]) is dict
    assert callbacks_extra({}, app) is None
    with pytest.raises(TypeError, match="link and link_error take a signature"):
        callbacks_extra({"link": 42}, app)


def test_every_primitive_travels_as_a_map_and_comes_back_as_itself():
    c = add.s(2, 2) | group(add.s(1), chain(add.s(2), add.s(3))) | tsum.s()
    c.link(tsum.s())
    wire = cbor2.loads(cbor2.dumps(c))  # what an envelope carries
    back = Signature.from_dict(wire, app=app)
    assert isinstance(back, chain) and kinds(back) == kinds(c)
    assert isinstance(back.tasks[1].tasks[1], chain) and back.options["link"][0]["task"] == tsum.name
    assert isinstance(maybe_signature(dict(group(add.s(1, 1))), app), group)
    assert maybe_signature(None) is None
    s = app.signature(add.name, (1, 2), {"y": 3}, countdown=5)
    assert (s.name, s.args, s.kwargs, s.options) == (add.name, (1, 2), {"y": 3}, {"countdown": 5})


def test_bad_signature_maps_are_refused_naming_what_is_wrong():
    with pytest.raises(ValueError, match="unknown signature type 'nope'"):
        Signature.from_dict({"task": "x", "subtask_type": "nope"})
    with pytest.raises(ValueError, match="needs a task name"):
        Signature.from_dict({"task": 3})
    with pytest.raises(ValueError, match="kwargs.tasks"):
        Signature.from_dict({"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": "x"}})
    with pytest.raises(TypeError, match="expected a signature"):
        maybe_signature(42)
    with pytest.raises(ValueError, match="needs at least one signature"):
        chain().steps()


def test_errbacks_taking_more_than_one_argument_get_request_exc_traceback():
    assert errback_takes_request(app, new_style.s())
    assert not errback_takes_request(app, old_style.s())
    assert not errback_takes_request(app, bound.s())  # Celery: bound tasks keep the old style
    assert not errback_takes_request(app, Signature("not.registered.here"))
    # Celery 5.7: a mutable errback's stored arguments are bound first, from the left
    assert not errback_takes_request(app, add.s("label"))  # add(x, y): one left, the failed task's id
    assert not errback_takes_request(app, add.s(y="label"))
    assert errback_takes_request(app, add.si("label"))  # immutable: its full arity counts
    assert errback_takes_request(app, new_style.s("stored"))  # (exc, traceback) still open: 2 > 1
    assert errback_takes_request(app, add.s(1, 2, 3))  # cannot bind: classified by its full arity, as Celery


def test_a_canvas_keeps_its_tasks_app_when_another_app_is_created_later():
    c = add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s()
    App("created-later")  # becomes the current app
    copy = c.clone()
    assert copy.app is app and copy.tasks[1].app is app and copy.tasks[1].body.app is app
    assert chain(add.s(4, 4) | add.s(8)).clone().tasks[0].tasks[0].app is app


# -- eager: sig.apply() and task_always_eager run a whole canvas here, with no broker ------------------
eager = App("eager-algebra", broker="127.0.0.1:1")  # never connected: nothing may be sent
ERRORS = []


@eager.task
def e_add(x, y):
    return x + y


@eager.task
def e_ident(x):
    return x


@eager.task
def e_sum(xs):
    return sum(xs)


@eager.task
def e_fail(*args):
    raise KeyError("eager failure")


@eager.task
def e_errback(request, exc, traceback):
    ERRORS.append((request.id, repr(exc)))


def test_apply_runs_every_primitive_here_and_returns_its_results():
    assert e_add.s(1, 2).apply().get() == 3
    r = chain(e_add.s(1, 2), e_add.s(3)).apply()
    assert (r.get(), r.parent.get()) == (6, 3)
    assert group(e_add.s(1, 1), e_add.s(2, 2)).apply().get() == [2, 4]
    assert chord([e_add.s(1, 1), e_add.s(2, 2)], e_sum.s()).apply().get() == 6
    # Celery's test_chord_in_chain_with_args / test_chain_in_chain_with_args, eagerly
    assert chain(chord([e_ident.s(), e_ident.s()], e_ident.s()), e_ident.s()).apply(args=(1,)).get() == [1, 1]
    assert chain(chain(e_ident.s(), e_ident.s())).apply(args=(1,)).get() == 1


def test_apply_keeps_a_failure_calls_errbacks_and_stops_what_follows_or_throws():
    ERRORS.clear()
    sig = e_fail.s()
    sig.link_error(e_errback.s())
    r = sig.apply()
    assert isinstance(r.get(propagate=False), KeyError) and ERRORS == [(r.id, "KeyError('eager failure')")]
    c = chain(e_add.s(1, 1), e_fail.s(), e_add.s(5)).apply()
    assert isinstance(c.get(propagate=False), KeyError) and c.parent.get() == 2  # the third never ran
    body = chord([e_add.s(1, 1), e_fail.s()], e_sum.s()).apply()
    with pytest.raises(KeyError):
        body.get()
    with pytest.raises(KeyError):
        e_fail.s().apply(throw=True)


def test_task_always_eager_runs_chains_groups_and_chords_here_and_throw_is_honoured():
    eager.conf.task_always_eager = True
    try:
        assert chain(e_add.s(1, 2), e_add.s(3)).apply_async().get() == 6
        assert group(e_add.s(1, 1), e_add.s(2, 2)).delay().get() == [2, 4]
        assert chord([e_add.s(1, 1), e_add.s(2, 2)], e_sum.s()).delay().get() == 6
        with pytest.raises(KeyError):
            e_fail.apply_async(throw=True)  # Celery's test_eager_chain_inside_task passes throw=
        assert isinstance(e_fail.apply_async().get(propagate=False), KeyError)
    finally:
        eager.conf.task_always_eager = False


def test_a_signatures_args_and_kwargs_may_be_set_as_in_celery():
    """Celery's own tasks do ``link_sig.args = (msg,)`` before linking it; the map that travels follows."""
    s = add.s()
    s.args = ("msg",)
    s.kwargs = {"y": 2}
    assert s.args == ("msg",) and s.kwargs == {"y": 2}
    assert cbor2.loads(cbor2.dumps(dict(s)))["args"] == ["msg"]
    assert s.clone((1,)).args == (1, "msg")
    s.args = None
    assert s.args == () and s.clone().args == ()


def test_a_chain_joining_another_keeps_its_own_callbacks_on_its_tasks():
    """Celery's unchain_tasks: chain(inner, x) with inner.link(cb)/link_error(eb) runs cb after inner's last
    task (not after x) and eb on a failure of any of inner's tasks; before, both were dropped."""
    inner = add.s(1, 1) | add.s(2)
    inner.link(tsum.si([1]))
    inner.link_error(old_style.s())
    for outer in (chain(inner, add.s(3)), inner | add.s(3), tsum.s() | inner):
        steps = outer.steps()
        linked = [[cb.name for cb in s.options.get("link") or ()] for s in steps]
        errbacks = [len(s.options.get("link_error") or ()) for s in steps]
        if steps[0].name == tsum.name:  # task | chain: the task is not part of the inner chain
            assert linked == [[], [], [tsum.name]] and errbacks == [0, 1, 1]
        else:
            assert linked == [[], [tsum.name], []] and errbacks == [1, 1, 0]
    assert "link" in inner.options and len(inner.tasks[1].options.get("link") or ()) == 0  # inner unchanged


def test_a_chord_holds_copies_of_a_header_given_as_a_list():
    """Celery's _maybe_group: chord([a, b], body) keeps copies, so linking to (or freezing) chord.tasks
    leaves a and b as they were (Celery's test_enabling_flag_allow_error_cb_on_chord_header counts on it)."""
    a, b = add.si(1, 1), add.si(2, 2)
    c = chord((a, b), tsum.s())
    for t in c.tasks:
        t.link_error(old_style.s())
    c.freeze()
    assert a == add.si(1, 1) and b == add.si(2, 2) and "link_error" not in a.options
    g = group(a, b)
    assert chord(g, tsum.s()).tasks[0] is a  # a group's own tasks, as in Celery


def test_task_allow_error_cb_on_chord_header_links_the_errback_to_each_header_task_too():
    c = chord([add.si(1, 1), add.si(2, 2)], tsum.s())
    c.link_error(old_style.s())
    assert [t.options.get("link_error") for t in c.tasks] == [None, None]  # Celery's default: the body only
    assert len(c.body.options["link_error"]) == 1
    app.conf.task_allow_error_cb_on_chord_header = True
    try:
        c = chord([add.si(1, 1), add.si(2, 2)], tsum.s())
        c.link_error(old_style.s())
        assert [[e.immutable for e in t.options["link_error"]] for t in c.tasks] == [[True], [True]]
        assert [e.immutable for e in c.body.options["link_error"]] == [False]
    finally:
        app.conf.task_allow_error_cb_on_chord_header = False
