"""Nested canvases, callbacks on every primitive, replace and Reject: one real brokerd and one real
worker for the module (issue 14 items 2 and 4).  The expected values are Celery's (celery/canvas.py 5.x
semantics); callbacks are frozen before they are linked, so each one's result can be awaited by id."""

import os
import signal
import subprocess
import sys
import time

import pytest

from client.canvas import Signature, StampingVisitor, chain, chord, group
from client.exceptions import ChordError, EncodeError, ImproperlyConfigured, Reject, RemoteError, TaskRevokedError
from client.result import GroupResult, result_from_tuple
from tests.canvas_apps import tasks as t
from tests.support.broker import ROOT, broker_for_app
from tests.support.waiting import wait_for

WAIT = 30  # seconds: a bound on every get(); each canvas here takes well under a second


@pytest.fixture(scope="module")
def canvas_broker(tmp_path_factory):
    yield from broker_for_app(tmp_path_factory.mktemp("canvas-broker"), t.app)


@pytest.fixture(scope="module")
def worker(canvas_broker, tmp_path_factory):
    d = tmp_path_factory.mktemp("canvas-worker")
    env = dict(os.environ, BROKERD_URL=canvas_broker.address, CANVAS_DIR=str(d), PYTHONPATH=str(ROOT))
    log = open(d / "worker.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "client.worker_cli", "tests.canvas_apps.tasks:app", "-b",
                          canvas_broker.address, "-l", "warning", "-P", "threads", "-c", "4"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        assert t.add.delay(1, 1).get(timeout=WAIT) == 2
        yield d
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        log.close()


# -- nesting (item 4) --------------------------------------------------------------------------
def test_the_next_steps_guides_chain_of_a_chain(worker):
    assert chain(t.add.s(4, 4) | t.mul.s(8))().get(timeout=WAIT) == 64


def test_sig_then_group_then_task_is_a_chord_over_the_groups_results(worker):
    r = (t.add.s(2, 2) | group(t.add.s(1), t.add.s(2)) | t.tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == 11  # 4 → [5, 6] → 11
    assert isinstance(r.parent, GroupResult) and r.parent.get(timeout=WAIT) == [5, 6]
    assert r.parent.parent.get(timeout=WAIT) == 4


def test_a_chain_ending_in_a_group_returns_the_groups_results(worker):
    r = (t.add.s(1, 1) | group(t.add.s(1), t.add.s(2))).apply_async()
    assert r.get(timeout=WAIT) == [3, 4]


def test_a_group_of_chains(worker):
    r = group(t.add.s(1, 1) | t.mul.s(2), chain(t.add.s(2, 2), t.mul.s(3), t.add.s(1))).apply_async()
    assert r.get(timeout=WAIT) == [4, 13]


def test_group_then_group_gives_each_second_member_the_first_groups_results(worker):
    r = (group(t.add.s(1, 1), t.add.s(2, 2)) | group(t.tsum.s(), t.tsum.s())).apply_async()
    assert r.get(timeout=WAIT) == [6, 6]


def test_chord_then_task_and_a_chord_in_the_middle_of_a_chain(worker):
    assert (chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()) | t.mul.s(10))().get(timeout=WAIT) == 60
    r = chain(t.add.s(1, 1), chord([t.add.s(1), t.add.s(2)], t.tsum.s()), t.mul.s(10), t.add.s(1)).apply_async()
    assert r.get(timeout=WAIT) == 71  # 2 → [3, 4] → 7 → 70 → 71


def test_a_chord_inside_a_chain_inside_a_group(worker):
    inner = t.add.s(1, 1) | group(t.add.s(1), t.add.s(2)) | t.tsum.s()  # 2 → [3, 4] → 7
    r = group(inner, t.add.s(5, 5), chain(t.add.s(0, 1), chord([t.add.s(10), t.add.s(20)], t.tsum.s()))).apply_async()
    assert r.get(timeout=WAIT) == [7, 10, 32]


def test_a_chord_whose_body_is_a_group_and_a_chord_in_a_chord_header(worker):
    r = chord([t.add.s(1, 1), t.add.s(2, 2)], group(t.tsum.s(), t.tsum.s())).apply_async()
    assert r.get(timeout=WAIT) == [6, 6]
    r = chord([chord([t.add.s(1, 1), t.add.s(1, 2)], t.tsum.s()), t.add.s(10, 10)], t.tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == 25  # [5, 20]


def test_a_failed_header_member_fails_every_task_after_the_chord_instead_of_leaving_them_pending(worker):
    r = chain(t.add.s(1, 1), group(t.add.s(1), t.boom.s()), t.tsum.s(), t.mul.s(2), t.add.s(3)).apply_async()
    with pytest.raises(ValueError, match="^boom in step$") as e:
        r.get(timeout=WAIT)  # the last task's own result, not a timeout: the failed member's exception (Celery's)
    assert isinstance(e.value.__cause__, RemoteError)  # what was stored for the last task: the chord's report
    assert e.value.__cause__.exc_type == "ChordError" and "ValueError: boom in step" in str(e.value.__cause__)


def test_a_chord_raises_its_failed_members_own_exception_through_chains_and_chords(worker):
    """Celery's rule: get() on a chord whose header failed raises the member's exception (not ChordError),
    also when the chord is in a chain in a chord; the ChordError stays reachable as __cause__."""
    r = chord([t.add.s(1, 1), t.boom.s(7)], t.tsum.s()).apply_async()
    with pytest.raises(ValueError, match="^boom in step$") as e:
        r.get(timeout=WAIT)
    assert isinstance(e.value.__cause__, ChordError)
    inner = chain(t.add.s(1, 1), chord([t.add.s(1), t.boom.s()], t.tsum.s()), t.mul.s(2))
    r = chord([inner, t.add.s(2, 2)], t.tsum.s()).apply_async()
    with pytest.raises(ValueError, match="^boom in step$"):
        r.get(timeout=WAIT)


def test_a_canvas_travels_as_a_map_and_comes_back_the_same(worker):
    from client.canvas import maybe_signature

    c = t.add.s(2, 2) | group(t.add.s(1), t.add.s(2)) | t.tsum.s()
    again = Signature.from_dict(dict(c))
    assert isinstance(again, chain) and isinstance(again.tasks[1], chord)
    assert again.apply_async().get(timeout=WAIT) == 11
    assert ~t.add.s(20, 22) == 42
    assert t.app.signature(t.add.name, (1, 2)).delay().get(timeout=WAIT) == 3
    assert maybe_signature(dict(t.mul.s(3, 3)), app=t.app).delay().get(timeout=WAIT) == 9


# -- immutable, callbacks on every primitive (item 2) ------------------------------------------
def test_an_immutable_signature_never_gets_the_parents_result(worker):
    r = (t.add.s(1, 1) | t.add.s(10, 20).set(immutable=True)).apply_async()
    assert r.get(timeout=WAIT) == 30
    assert (t.add.s(1, 1) | t.record.si("kept")).apply_async().get(timeout=WAIT) == "kept"


def test_an_immutable_chord_body_never_gets_the_header_results(worker):
    """brokerd prepends the header's results to the body it sends: an immutable body (or a chain led by
    one) must run with its own arguments only (Celery's test_nested_group_chord_counting_*)."""
    assert chord([t.add.s(1, 1), t.add.s(2, 2)], t.record.si("own")).apply_async().get(timeout=WAIT) == "own"
    body = chain(t.record.si("first"), t.record.si("last"))
    assert chord([t.add.s(1, 1)], body).apply_async().get(timeout=WAIT) == "last"
    inner = chord([t.record.si(1337)] * 3, t.record.si(31337))
    assert group(chord([inner], t.tsum.s())).apply_async().get(timeout=WAIT) == [31337]


def _cb(tag):
    cb = t.record.si(tag)
    return cb, cb.freeze()


def test_task_apply_async_link_and_link_error_are_sent(worker):
    cb, cb_res = _cb("linked")
    assert t.add.apply_async((20, 22), link=t.record.s().set(task_id=cb_res.id)).get(timeout=WAIT) == 42
    assert cb_res.get(timeout=WAIT) == 42  # the callback got the result prepended
    eb = t.old_errback.s()
    eb_res = eb.freeze()
    failed = t.boom.apply_async(link_error=eb)
    assert eb_res.get(timeout=WAIT) == failed.id


def test_sig_apply_async_link_and_callbacks_on_chain_group_and_chord(worker):
    cb, cb_res = _cb("sig")
    assert t.add.s(1, 2).apply_async(link=cb).get(timeout=WAIT) == 3
    assert cb_res.get(timeout=WAIT) == "sig"
    c = t.add.s(1, 1) | t.mul.s(5)
    c.link(t.record.s().set(task_id="chain-cb-" + cb_res.id))
    assert c.apply_async().get(timeout=WAIT) == 10
    assert t.app.AsyncResult("chain-cb-" + cb_res.id).get(timeout=WAIT) == 10  # the chain's final result
    g = group(t.add.s(1, 1), t.add.s(2, 2))
    gcb, gcb_res = _cb("group")
    g.link(gcb)
    assert g.apply_async().get(timeout=WAIT) == [2, 4]
    assert gcb_res.get(timeout=WAIT) == "group"
    ch = chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s())
    ch.link(t.record.s().set(task_id="chord-cb-" + cb_res.id))
    assert ch.apply_async().get(timeout=WAIT) == 6
    assert t.app.AsyncResult("chord-cb-" + cb_res.id).get(timeout=WAIT) == 6


def test_link_error_on_a_chain_and_a_group_reaches_the_failed_task(worker):
    eb = t.old_errback.s()
    eb_res = eb.freeze()
    c = t.add.s(1, 1) | t.boom.s() | t.add.s(1)
    c.link_error(eb)
    r = c.apply_async()
    with pytest.raises(Exception):
        r.get(timeout=WAIT)
    assert eb_res.get(timeout=WAIT) == r.parent.id  # the step that failed
    geb, geb_res = _cb("group-failed")  # immutable: it gets no id
    g = group(t.add.s(1, 1), t.boom.s())
    g.link_error(geb)
    g.apply_async()
    assert geb_res.get(timeout=WAIT) == "group-failed"


def test_an_errback_taking_request_exc_traceback_is_called_with_them(worker):
    r = t.boom.s(1).on_error(t.errback_reports.s()).apply_async()
    with pytest.raises(ValueError):
        r.get(timeout=WAIT)
    assert t.app.AsyncResult(f"{r.id}-errback").get(timeout=WAIT) == f"{r.id} ValueError boom in step True"


def _log_lines(d, name, *words):
    """Lines of a task's log file under CANVAS_DIR that contain every one of ``words``."""
    path = d / name
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln for ln in lines if all(w in ln.split() for w in words)]


def test_an_errback_s_stored_arguments_do_not_count_as_open_ones(worker):
    """Celery 5.7's rule: ``eb(task_id, label).s('x')`` (or ``.s(label='x')``) has one argument left, so it
    is sent with the failed task's id; ``eb(request, exc, tb, label).s('x')`` has three left, so it is
    called with the request (before, both were classified by their full arity: neither ran)."""
    for eb in (t.labelled_old_errback.s("by-arg"), t.labelled_old_errback.s(label="by-kwarg")):
        r = t.boom.s().on_error(eb).apply_async()
        with pytest.raises(ValueError):
            r.get(timeout=WAIT)
        label = eb.args[0] if eb.args else eb.kwargs["label"]
        assert wait_for(lambda: _log_lines(worker, "labelled_errbacks.log", "old", r.id, label), WAIT,
                        f"the old-style errback with {label} for {r.id}") == [f"old {r.id} {label}"]
    r = t.boom.s().on_error(t.labelled_new_errback.s("stored")).apply_async()
    with pytest.raises(ValueError):
        r.get(timeout=WAIT)  # a new-style errback runs before the failure is stored: it is there now
    assert _log_lines(worker, "labelled_errbacks.log", "new", r.id) == [f"new {r.id} ValueError stored"]


def test_a_groups_errback_stays_mutable_so_an_old_style_one_gets_the_failed_members_id(worker):
    failing = t.boom.s()
    fid = failing.freeze().id
    g = group(failing, t.add.si(1, 1))
    g.link_error(t.old_errback.s())
    with pytest.raises(ValueError):
        g.apply_async().get(timeout=WAIT)
    wait_for(lambda: _log_lines(worker, "old_errbacks.log", fid), WAIT, f"old_errback({fid})")


def test_a_replaced_chain_step_passes_its_errbacks_to_its_replacement_only(worker):
    """chain(replaced, fails).link_error(eb): eb runs once, for the failing step (it was linked to that step
    twice: by the chain, and again by the replacement)."""
    c = chain(t.add_replaced.si(1, 2), t.boom.s())
    c.link_error(t.new_errback.s())
    r = c.apply_async()
    with pytest.raises(ValueError):
        r.get(timeout=WAIT)
    assert _log_lines(worker, "new_errbacks.log", r.id) == [f"{r.id} ValueError True"]


def test_a_failed_chord_calls_the_errbacks_of_each_member_of_its_group_body_as_that_member(worker):
    """Celery 5.7 (#8786): a chord whose header fails calls, per task of a group body, that task's errbacks
    (its own and the chord's), as if it had failed with the member's own exception; a chord in the body
    counts as its body's task."""
    first = t.tsum.s()
    first.link_error(t.labelled_new_errback.s("own"))
    body = group(first, t.tsum.s(), chord([t.add.si(2, 2)], t.tsum.s()))
    workflow = chord([t.add.si(1, 1), t.boom.si()], body)
    workflow.link_error(t.labelled_new_errback.s("chord"))
    r = workflow.apply_async()
    with pytest.raises((ValueError, ChordError)):
        r.get(timeout=WAIT)
    ids = [m.id for m in r.results]  # the second member's, and the nested chord's body's
    want = sorted([f"new {ids[0]} ValueError own", *(f"new {i} ValueError chord" for i in ids)])

    def seen():
        got = sorted(ln for i in ids for ln in _log_lines(worker, "labelled_errbacks.log", i))
        return got if len(got) >= len(want) else None

    assert wait_for(seen, WAIT, "the errbacks of the group body's members") == want


def test_a_groups_own_errbacks_replace_its_members_and_a_chords_join_them(worker):
    """Celery's test_link_error_option_with_link_error_of_group_body: group(...).set(link_error=eb) runs eb
    for a failing member (it was never sent), and a chord's errback given to apply_async joins it: each
    runs once."""
    body = group(t.boom.s(), t.tsum.s()).set(link_error=t.labelled_new_errback.s("group"))
    r = chord([t.add.si(1, 1)], body).apply_async(link_error=t.labelled_new_errback.s("chord"))
    with pytest.raises(ValueError):
        r.get(timeout=WAIT)
    failed = r.results[0].id  # new-style errbacks run before the failure is stored: both are there now
    assert sorted(_log_lines(worker, "labelled_errbacks.log", failed)) == [
        f"new {failed} ValueError chord", f"new {failed} ValueError group"]


def test_a_chord_s_task_id_names_its_result_and_tasks_themselves_may_be_members(worker):
    """Celery's: chord.freeze(id) / apply_async(task_id=id) give the body's result that id (the chord's
    result), also for a chain body of implicit chords; a task given as a header member is its .s()."""
    steps = [t.tsum.s()]
    for _ in range(2):
        steps.extend([group(t.add.s(1), t.add.s(2)), t.tsum.s()])
    workflow = chord([t.add.si(1, 1), t.add.si(2, 2)], chain(*steps))
    want = f"chord-result-{time.monotonic_ns()}"
    assert workflow.freeze(want).id == want
    r = workflow.apply_async(task_id=want)
    assert r.id == want and r.get(timeout=WAIT) == 33  # 6 -> [7, 8] -> 15 -> [16, 17] -> 33
    c = chord([t.tsum, t.tsum], t.tsum.s())  # each member gets the chord's args: tsum([1, 2]) twice
    assert c.apply_async(([1, 2],)).get(timeout=WAIT) == 6


def test_a_generator_header_is_sent_as_it_is_made(worker):
    """Celery #3021 (its test_generator): a chord's generator header is not read whole first; here the
    generator waits for its first member's result before making the next one (it waited for ever)."""
    first = t.add.si(1, 1)
    first_id = first.freeze().id

    def header():
        yield first
        assert t.app.AsyncResult(first_id).get(timeout=WAIT) == 2  # already sent, and run
        yield t.add.si(2, 2)
        yield group(t.add.si(3, 3), t.add.si(4, 4))  # a group in it: its members, one result each

    r = chord(header(), t.tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == 2 + 4 + 6 + 8
    assert [m.id for m in r.parent.results][0] == first_id and len(r.parent.results) == 4
    made = chord((s for s in [t.add.si(1, 2)]), t.tsum.s())
    assert len(made.tasks) == 1 and made.apply_async().get(timeout=WAIT) == 3  # read first: sent whole


def test_starmap_and_map_keep_their_items_in_a_chain_and_a_group(worker):
    assert group(t.add.starmap([(1, 1), (2, 2)]), t.add.s(3, 3)).delay().get(timeout=WAIT) == [[2, 4], 6]
    assert chain(t.add.si(1, 1), t.add.starmap([(1, 1), (2, 2)])).delay().get(timeout=WAIT) == [2, 4]
    assert chain(t.add.si(1, 1), t.tsum.map([[1], [2, 3]])).delay().get(timeout=WAIT) == [1, 5]


def test_a_countdown_on_a_chord_delays_its_header(worker):
    """Celery #7851: countdown given to group | task delays the header tasks, not only the body."""
    header = [t.stamps_of.si(), t.stamps_of.si()]
    c = group(header) | t.tsum.si([1])
    sent = time.time()
    r = c.apply_async(countdown=1.5)
    members = r.parent.results
    assert r.get(timeout=WAIT) == 1
    # each header task's result was stored after its countdown (it used to delay only the body)
    assert all(m.date_done.timestamp() >= sent + 1.4 for m in members), [m.date_done for m in members]


def test_a_chain_ending_in_a_group_in_a_chord_header_gives_one_list(worker):
    """Celery's test_nested_chord_group_chain_group_tail: the chain keeps the group's results together."""
    sig = chord(group(chain(t.add.s(40, 2), group(t.add.s(0), t.add.s(0)))), t.record.s())
    assert sig.apply_async().get(timeout=WAIT) == [[42, 42]]  # never [42, 42] flattened
    inner = chord([chain(t.add.s(40, 2), group(t.add.s(0), t.add.s(0))), t.add.s(1, 1)], t.record.s())
    assert inner.apply_async().get(timeout=WAIT) == [[42, 42], 2]


def test_nested_groups_are_unrolled_into_one_flat_group(worker):
    """Celery's rule (test_nested_group, test_nested_group_group, test_group_results_in_chain): groups in a
    group run as its members, get() gives one flat list; a group of one chain ending in a group gives that
    group's results."""
    g = group(t.add.si(1, 10), group(t.add.si(1, 100), group(t.add.si(1, 1000), t.add.si(1, 2000))))
    assert g.apply_async().get(timeout=WAIT) == [11, 101, 1001, 2001]
    assert group(group(t.add.s(1, 41), t.add.s(2, 40))).delay().get(timeout=WAIT) == [42, 42]
    assert group(t.add.s(1, 2) | group(t.add.s(1), t.add.s(2)))().get(timeout=WAIT) == [4, 5]
    assert group(group(t.add.s(1), t.add.s(2))).apply_async((10,)).get(timeout=WAIT) == [11, 12]


def test_empty_chains_and_groups_are_no_op_members_and_steps(worker):
    """Celery's (issue 9772 tests): an empty chain or group has no result in a group or a chord header,
    a header of only those runs the body at once with [], and an empty step passes its arguments on."""
    res = group(chain(), t.add.s(1, 2), chain(), t.add.s(3, 4)).apply_async()
    assert len(res.results) == 2 and res.get(timeout=WAIT) == [3, 7]
    assert chord([chain()], t.tsum.s())().get(timeout=WAIT) == 0
    assert chord([chain(), t.add.s(1, 1), chain(), t.add.s(2, 2)], t.tsum.s())().get(timeout=WAIT) == 6
    assert chord([], t.tsum.s())().get(timeout=WAIT) == 0
    assert (group([]) | t.tsum.s())().get(timeout=WAIT) == 0
    assert chain(group(), t.add.s(10)).apply_async((5,)).get(timeout=WAIT) == 15
    assert chain(chain(group(), t.add.s(10)), t.add.s(20)).apply_async((5,)).get(timeout=WAIT) == 35


def test_chain_steps_and_a_trailing_groups_members_have_the_previous_step_as_parent(worker):
    """Celery's parent_id/root_id along a chain: each step's parent is the step before (though the worker
    sends it after that task is over), every root is the first task, which is its own root."""
    res = chain(t.ids.si(i) for i in range(4)).apply_async()
    assert res.get(timeout=WAIT)[2] == 3
    nodes = []
    node = res
    while node is not None:
        nodes.append(node)
        node = node.parent
    root = nodes[-1]
    for n in nodes:
        root_id, parent_id, _ = n.get(timeout=WAIT)
        assert root_id == root.id
        assert parent_id == (n.parent.id if n.parent is not None else None)
    g = (t.ids.si(1) | t.ids.si(2) | group(t.ids.si(i) for i in range(3))).apply_async()
    for root_id, parent_id, _ in g.get(timeout=WAIT):
        assert (root_id, parent_id) == (g.parent.parent.id, g.parent.id)


def test_a_chord_body_is_started_by_the_member_that_completed_it_under_the_chains_root(worker):
    """Celery's test_parent_ids__plain_task_body: the body's parent is one of the header's tasks (brokerd
    names the one whose result completed the chord) and its root the chain's first task (it was the body's
    own id: brokerd publishes it, not a task)."""
    root = t.ids.si(1)
    root_id = root.freeze().id
    res = chain(root, t.ids.si(2), chord([t.ids.si(i) for i in range(3, 8)], t.collect_ids.s(50))).apply_async()
    prev, (body_root, body_parent, value) = res.get(timeout=WAIT)
    assert value == 50 and body_root == root_id
    assert body_parent in [r.id for r in res.parent.results]
    assert body_parent in res.parent.results  # Celery's own form: a result equals its id
    assert res.parent.results[0] == res.parent.results[0].id and res.parent.results[0] != 42
    assert len({res.parent.results[0], res.parent.results[0].id}) == 1  # and hashes as it
    assert all(r[0] == root_id and r[1] == res.parent.parent.id for r in prev)  # the members: ids(2) started them


def test_a_returned_signature_is_stored_as_its_map_and_rebuilds_whole(worker):
    """Celery's test_signature_serialization: a task may return a canvas; the next step rebuilds it."""
    r = (t.make_canvas.s() | t.rebuild_canvas.s()).apply_async()
    assert r.get(timeout=WAIT) == ["chain", "Signature", "chord", "Signature", "group", "Signature", "Signature"]


def test_a_returned_result_is_stored_as_its_tuple_and_result_from_tuple_rebuilds_it(worker):
    value = t.start_a_chain.delay().get(timeout=WAIT)
    assert value[1] is not None and len(value[1]) == 2  # a GroupResult: its members' tuples
    res = result_from_tuple(value, app=t.app)
    assert isinstance(res, GroupResult) and res.get(timeout=WAIT) == [3, 4]
    assert res.parent.get(timeout=WAIT) == 2
    with pytest.raises(ValueError, match="not a result tuple"):
        result_from_tuple("nope", app=t.app)


def test_revoke_by_stamped_headers_revokes_tasks_carrying_the_value_and_only_those(worker):
    tag = f"mon-{os.getpid()}-{time.monotonic_ns()}"
    replies = t.app.control.revoke_by_stamped_headers({"monitoring_id": [tag]}, reply=True, timeout=5)
    assert [next(iter(r.values())) for r in replies] == [
        {"ok": f"headers {{'monitoring_id': [{tag!r}]}} flagged as revoked, but not terminated"}]
    hit = t.stamps_of.si().stamp(monitoring_id=tag).apply_async()
    with pytest.raises(TaskRevokedError):
        hit.get(timeout=WAIT)
    assert hit.state == "REVOKED"
    listed = t.stamps_of.si().stamp(monitoring_id=["other", tag]).apply_async()  # one of a list of values
    with pytest.raises(TaskRevokedError):
        listed.get(timeout=WAIT)
    miss = t.stamps_of.si().stamp(monitoring_id="another").apply_async()
    assert miss.get(timeout=WAIT)["stamps"] == {"monitoring_id": "another"}
    assert t.add.delay(1, 1).get(timeout=WAIT) == 2  # no stamps at all
    for bad in ({}, {1: "x"}, "monitoring_id"):
        (answer,) = t.app.control.broadcast("revoke_by_stamped_headers", {"headers": bad}, reply=True, timeout=5)
        assert "revoke_by_stamped_headers needs headers" in next(iter(answer.values()))["error"]
    with pytest.raises(TypeError, match="needs a map of stamp name"):
        t.app.control.revoke_by_stamped_headers(["monitoring_id"])


# -- retry with other arguments ------------------------------------------------------------------
def test_retry_with_new_args_or_kwargs_runs_again_with_them(worker):
    """Celery's retry(args=, kwargs=) (they used to be dropped silently: the same arguments ran again)."""
    r = t.retry_new_args.apply_async(kwargs={"foo": 1, "bar": 2, "label": "kept"})
    assert r.get(timeout=WAIT) == [2, 3, "kept", 1]
    assert t.retry_new_kwargs.apply_async((1, 2)).get(timeout=WAIT) == [2, 2, 1]
    with pytest.raises(EncodeError, match="cannot be sent to a worker"):  # its own failure, named
        t.retry_unsendable.delay().get(timeout=WAIT)


# -- stamping (Celery 5.3+) ----------------------------------------------------------------------
class Mark(StampingVisitor):
    def on_signature(self, sig, **headers):
        return {"mark": "m"}

    def on_callback(self, callback, **headers):
        return {"cb": True}


def test_stamps_reach_every_task_of_a_canvas_as_request_stamps(worker):
    assert t.stamps_of.si().stamp(tenant="acme").apply_async().get(timeout=WAIT) == {
        "names": ["tenant"], "stamps": {"tenant": "acme"}}
    c = chain(t.add.s(1, 2), t.stamps_of.s())
    c.stamp(visitor=Mark(), run=7)
    assert c.apply_async().get(timeout=WAIT) == {"names": ["run", "mark"], "stamps": {"run": 7, "mark": "m"}}
    g = group(t.stamps_of.si(), t.stamps_of.si())
    g.stamp(visitor=Mark())
    assert g.apply_async().get(timeout=WAIT) == [{"names": ["mark"], "stamps": {"mark": "m"}}] * 2
    cb = t.stamps_of.s()
    cb_res = cb.freeze()
    s = t.add.s(1, 1)
    s.link(cb)
    s.stamp(visitor=Mark())
    s.apply_async().get(timeout=WAIT)
    # a link gets on_callback's stamps, and is stamped as a signature of its own (on_signature), as in Celery
    assert cb_res.get(timeout=WAIT)["stamps"] == {"cb": True, "mark": "m"}
    s = t.stamps_of.si()
    s.options["link"] = dict(t.stamps_of.si())  # a link given as one signature map, not a list
    s.stamp(visitor=Mark())
    assert isinstance(s.options["link"], list) and s.options["link"][0].options["cb"] is True
    class Named(StampingVisitor):  # a visitor that names its stamps itself (Celery's older style)
        def on_signature(self, sig, **headers):
            return {"monitoring_id": "x", "stamped_headers": ["monitoring_id"]}

    s = t.stamps_of.si()
    s.stamp(visitor=Named())
    assert s.apply_async().get(timeout=WAIT) == {"names": ["monitoring_id"], "stamps": {"monitoring_id": "x"}}
    s = t.stamps_of.si()  # append_stamps keeps every value
    s.stamp(mark=1)
    s.stamp(append_stamps=True, mark=2)
    assert s.apply_async().get(timeout=WAIT)["stamps"] == {"mark": [1, 2]}


def test_before_task_publish_sees_celery_s_headers_and_the_stamps_not_the_properties(worker):
    from client.signals import before_task_publish

    seen = {}

    def before(headers=None, properties=None, **kw):
        seen.update(headers=dict(headers), properties=dict(properties))

    before_task_publish.connect(before)
    try:
        r = t.stamps_of.si().stamp(mark=42).apply_async()
    finally:
        before_task_publish.disconnect(before)
    h = seen["headers"]
    assert (h["id"], h["task"], h["stamped_headers"], h["stamps"]) == (r.id, t.stamps_of.name, ["mark"], {"mark": 42})
    assert "stamped_headers" not in seen["properties"] and "mark" not in seen["properties"]
    assert r.get(timeout=WAIT)["stamps"] == {"mark": 42}


def test_stamps_given_to_apply_async_and_bad_ones(worker):
    r = t.stamps_of.apply_async(stamped_headers=["a"], stamps={"a": 1, "b": 2})
    assert r.get(timeout=WAIT) == {"names": ["a"], "stamps": {"a": 1}}
    with pytest.raises(TypeError, match="stamped_headers must be a list"):
        t.stamps_of.apply_async(stamped_headers=[1], stamps={})
    with pytest.raises(ValueError, match="a stamp needs a name that is not a call option: 'queue'"):
        t.stamps_of.si().stamp(queue="x")
    for bad in ({"stamped_headers": "a", "stamps": {"a": 1}}, {"stamped_headers": ["a"], "stamps": [1]}):
        r = t.app.publish_task(t.stamps_of.name, (), {}, headers=bad)  # a bad header costs only the stamps
        assert r.get(timeout=WAIT) == {"names": [], "stamps": {}}


# -- replace and Reject (items 2 and 4) --------------------------------------------------------
def test_replace_hands_the_task_id_and_the_rest_of_the_chain_to_the_replacement(worker):
    assert t.replacer.delay(1).get(timeout=WAIT) == 4  # (1 + 1) * 2
    assert (t.replacer.s(1) | t.add.s(100)).apply_async().get(timeout=WAIT) == 104
    assert t.replaced_by_group.delay(1).get(timeout=WAIT) == [2, 3]
    assert t.replaced_by_chain_ending_in_group.delay().get(timeout=WAIT) == [4, 4]  # it used to wait for ever
    assert chord([t.add.s(1, 1), t.add.s(2, 2)], t.add_to_each.s(9)).delay().get(timeout=WAIT) == [11, 13]
    assert chord([], t.add_to_each.s(9)).delay().get(timeout=WAIT) == []  # an empty group: [] (Celery's)
    with pytest.raises(ImproperlyConfigured, match="Cannot replace with an empty chain"):
        chain(t.add.s(1, 1), t.replaced_by_nothing.s()).delay().get(timeout=WAIT)


def test_each_replace_counts_one_more_in_request_replaced_task_nesting(worker):
    assert t.record_nesting.delay(0).get(timeout=WAIT) == [0]
    assert t.record_nesting.delay(3).get(timeout=WAIT) == [0, 1, 2, 3]
    for bad in ("lots", -1, 10**30, [1]):  # a broken or hostile header costs only the field
        r = t.app.publish_task(t.record_nesting.name, (0,), {}, headers={"replaced_task_nesting": bad})
        assert r.get(timeout=WAIT) == [0], bad


def test_reject_without_requeue_stores_failure_so_get_raises_the_reject(worker):
    """Celery 5.7 (#4222): FAILURE with the Reject itself (it was REJECTED, a state Celery's own test now
    refuses), and the task's errbacks run as for any failure."""
    r = t.reject_me.s("no thanks").on_error(t.new_errback.s()).apply_async()
    with pytest.raises(Reject, match="no thanks"):
        r.get(timeout=WAIT)
    assert r.state == "FAILURE" and r.failed() and r.ready()
    assert _log_lines(worker, "new_errbacks.log", r.id) == [f"{r.id} Reject False"]


def test_reject_with_requeue_runs_the_task_again(worker):
    assert t.reject_first_time.delay("requeue-marker").get(timeout=WAIT) == "ran after requeue"
    assert (worker / "requeue-marker").exists()


def test_app_id_given_to_apply_async_reaches_request_properties(worker):
    """Celery's test_properties: app_id (a message property) reaches request.properties; it was refused
    as an unknown option.  A value that is not a short text is refused in the caller, naming it."""
    assert t.properties_of.apply_async(app_id="1234").get(timeout=WAIT)["app_id"] == "1234"
    assert "app_id" not in t.properties_of.delay().get(timeout=WAIT)
    for bad in (1234, "x" * 256, ["a"]):
        with pytest.raises(TypeError, match="app_id must be text of at most 255 characters"):
            t.properties_of.apply_async(app_id=bad)


def test_a_task_whose_result_is_ignored_stores_no_retry_either(worker):
    """Celery's test_retry_preserves_ignore_result_true: after a retry and a success with ignore_result the
    state is PENDING (the RETRY stored on the way stayed its state for ever); without it, SUCCESS."""
    ignored = t.retry_once_then_log.apply_async(ignore_result=True)
    kept = t.retry_once_then_log.apply_async()
    assert kept.get(timeout=WAIT) == 1
    wait_for(lambda: _log_lines(worker, "retried.log", ignored.id), WAIT, "the ignored task's second run")
    assert ignored.state == "PENDING" and kept.state == "SUCCESS"


def test_a_chain_goes_on_after_a_step_whose_result_is_ignored(worker):
    """Celery runs a task's chain and links whether or not its result is stored; the chain stopped there."""
    cb, cb_res = _cb("after-ignored")
    first = t.add.si(1, 1).set(ignore_result=True)
    first.link(cb)
    r = chain(first, t.add.s(10)).apply_async()
    assert r.get(timeout=WAIT) == 12 and cb_res.get(timeout=WAIT) == "after-ignored"
    assert r.parent.state == "PENDING"  # its own result still not stored


def test_hostile_workflow_keys_cost_only_their_own_continuation(worker):
    """Garbage in ``chain``/``link``/``link_error`` (a buggy or hostile producer) must not cost the worker:
    the task's own result is stored, and the worker runs the next task."""
    ok = t.app.publish_task(t.add.name, (1, 2), {}, extra={"chain": [{"subtask_type": "nope"}, 42],
                                                            "link": ["not a signature", {"task": 5}]})
    assert ok.get(timeout=WAIT) == 3
    bad = t.app.publish_task(t.boom.name, (), {}, extra={"link_error": [42, {"task": "no.such.errback"}],
                                                         "chain": [{"task": 7}]})
    with pytest.raises(ValueError):
        bad.get(timeout=WAIT)
    assert t.app.publish_task(t.add.name, (2, 2), {}).get(timeout=WAIT) == 4


# -- an in-process worker for tests (Celery's contrib.testing.worker.start_worker) ---------------------
def test_start_worker_runs_tasks_in_this_process_so_worker_signals_reach_the_test(canvas_broker):
    from client.signals import task_received
    from client.worker.testing import start_worker

    q = f"inproc.{os.getpid()}"
    got = []

    def received(sender=None, request=None, **kw):
        got.append((request.id, request.stamps))

    task_received.connect(received)
    try:
        with start_worker(t.app, queues=[q], concurrency=2, perform_ping_check=True) as w:
            assert w.ready.is_set()
            r = t.stamps_of.si().stamp(where="here").apply_async(queue=q)
            assert r.get(timeout=WAIT) == {"names": ["where"], "stamps": {"where": "here"}}
    finally:
        task_received.disconnect(received)
    assert (r.id, {"where": "here"}) in got


def test_the_worker_remembers_which_tasks_succeeded_here_even_with_no_result_stored(canvas_broker):
    """Celery's worker_state.successful_requests: the in-process worker fills this process's set, also for a
    task whose result is ignored (nothing else says it finished); a failed task is not in it."""
    from client.worker.state import successful_requests
    from client.worker.testing import start_worker

    q = f"inproc-state.{os.getpid()}"
    with start_worker(t.app, queues=[q], concurrency=2):
        ignored = t.add.apply_async((1, 2), queue=q, ignore_result=True)
        wait_for(lambda: ignored.id in successful_requests, WAIT, "the ignored task among the successful ones")
        failed = t.boom.apply_async(queue=q)
        with pytest.raises(ValueError):
            failed.get(timeout=WAIT)
        stored = t.add.apply_async((2, 2), queue=q)
        assert stored.get(timeout=WAIT) == 4
        wait_for(lambda: stored.id in successful_requests, WAIT, "the stored task among the successful ones")
    assert ignored.get(timeout=WAIT) is None and failed.id not in successful_requests


def test_start_worker_says_why_when_brokerd_cannot_be_reached():
    from client import App
    from client.worker.testing import WorkerDidNotStart, start_worker

    lonely = App("lonely", broker="127.0.0.1:1")  # nothing listens there
    with pytest.raises(WorkerDidNotStart, match="was not consuming from"):
        with start_worker(lonely, connect_timeout=0.5, ready_timeout=20):
            pass


# -- add_to_chord (Celery's Task.add_to_chord, brokerd's CHORD_ADD) ------------------------------
def test_a_running_chord_member_adds_tasks_and_the_body_waits_for_them(worker):
    """Celery's test_add_to_chord: the body gets the member's result and the three added ones."""
    r = (group([t.grow_chord.s([1, 2, 3], 4)]) | t.identity.s()).apply_async()
    assert sorted(r.get(timeout=WAIT)) == [0, 5, 6, 7]


def test_a_chord_added_to_a_running_chord_counts_by_its_body(worker):
    """Celery's test_add_chord_to_chord."""
    r = (group([t.grow_chord_by_a_chord.s([1, 2, 3], 4)]) | t.identity.s()).apply_async()
    assert sorted(r.get(timeout=WAIT)) == [0, 5 + 6 + 7]


def test_add_to_chord_outside_a_chord_says_so(worker):
    assert "is not a member of a chord" in t.grow_no_chord.delay().get(timeout=WAIT)


def test_group_id_must_name_a_group():
    with pytest.raises(TypeError, match="group_id must be the id of a group or chord"):
        t.add.apply_async((1, 2), group_id=12)


# -- a frozen chord applied again is a new run (brokerd's CHORD run, protocol.md §5.27 "Runs") ---------
def test_a_frozen_chord_applied_again_sends_its_header_again_and_runs_its_body_again(worker):
    """Celery's test_reapplying_frozen_chord_dispatches_body_again: a frozen chord keeps its id (and its
    members' ids), but each apply is a new run.  brokerd's CHORD is idempotent per chord id, so the second
    apply used to publish its header and never run its body again."""
    tag = f"again-{os.getpid()}-{time.monotonic_ns()}"
    c = chord([t.add.s(1, 2), t.add.s(3, 4)], t.record.si(tag))
    c.freeze()
    first = c.apply_async()
    assert first.get(timeout=WAIT) == tag
    wait_for(lambda: len(_log_lines(worker, "record.log", tag)) == 1, WAIT, "the first run's body")
    second = c.apply_async()
    assert second.id == first.id
    wait_for(lambda: len(_log_lines(worker, "record.log", tag)) == 2, WAIT, "the second run's body")
    third = c.apply_async()  # and again: each apply of this object is a run of its own
    wait_for(lambda: len(_log_lines(worker, "record.log", tag)) == 3, WAIT, "the third run's body")
    assert third.get(timeout=WAIT) == tag


def test_a_chord_rebuilt_from_its_map_is_still_declared_once(worker):
    """What keeps a redelivered workflow step from firing a body twice: a chord sent as a map (as a chain
    step carries it) and applied again names no new run, so brokerd takes it for a retry."""
    tag = f"once-{os.getpid()}-{time.monotonic_ns()}"
    c = chord([t.add.s(1, 2)], t.record.si(tag))
    c.freeze()
    d = dict(c)
    assert Signature.from_dict(d, app=t.app).apply_async().get(timeout=WAIT) == tag
    wait_for(lambda: len(_log_lines(worker, "record.log", tag)) == 1, WAIT, "the body")
    Signature.from_dict(d, app=t.app).apply_async()
    assert t.add.s(0, 0).apply_async().get(timeout=WAIT) == 0  # the worker has taken whatever was sent
    time.sleep(0.5)
    assert len(_log_lines(worker, "record.log", tag)) == 1


def test_a_link_added_after_stamping_is_stamped_by_the_next_stamp_as_the_worker_sees_it(canvas_broker, tmp_path,
                                                                                          monkeypatch):
    """What Celery's test_linking_stamped_sig checks (it reads Celery's private Request.__payload; here the
    public request.callbacks): every stamp a link's options name is among its options when it arrives."""
    monkeypatch.setenv("CANVAS_DIR", str(tmp_path))  # the in-process worker's record.log, not the checkout's
    from client.signals import task_received
    from client.worker.testing import start_worker

    class Monitoring(StampingVisitor):
        def __init__(self, mid):
            self.mid = mid

        def on_signature(self, sig, **headers):
            return {"mtask_id": self.mid}

    q = f"inproc-links.{os.getpid()}"
    seen = []

    def received(sender=None, request=None, **kw):
        seen.append((request.id, request.callbacks))

    s = t.add.si(1, 1).set(queue=q)
    s.stamp(visitor=Monitoring("first"))
    s.link(t.record.si("linked").set(queue=q))
    s.stamp(visitor=Monitoring("1234"))
    task_received.connect(received)
    try:
        with start_worker(t.app, queues=[q], concurrency=2):
            r = s.apply_async()
            assert r.get(timeout=WAIT) == 2
            wait_for(lambda: any(i == r.id for i, _ in seen), WAIT, "the task's task_received")
    finally:
        task_received.disconnect(received)
    (link,) = next(cbs for i, cbs in seen if i == r.id)
    names = link["options"]["stamped_headers"]
    assert names == ["mtask_id"] and all(n in link["options"] for n in names)
    assert link["options"]["mtask_id"] == "1234"
