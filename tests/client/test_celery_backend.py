"""client/celery/backend.py (Celery's result backend on brokerd) driven by Celery's own backend API,
without a worker, against a real brokerd: the behaviours Celery's integration suite showed differing
from Celery on Redis (issue 13)."""

from __future__ import annotations

import pytest

pytest.importorskip("celery", reason="Celery is not installed (pip install 'brokerd[celery]')")

import client.celery  # noqa: E402,F401  registers brokerd://
from celery import Celery, states  # noqa: E402
from celery.app.task import Context  # noqa: E402
from celery.exceptions import ChordError  # noqa: E402

WAIT = 10.0  # seconds: bound of every wait for a result


@pytest.fixture
def app(broker):
    url = f"brokerd://{broker.address}"
    a = Celery("t", broker=url, backend=url, set_as_current=False)
    yield a
    a.close()


def test_a_chord_members_failure_outside_an_except_block_fails_the_body_as_redis_words_it(app):
    """Celery's worker reports a revoked chord member from no except block (Request.revoked ->
    mark_as_revoked -> on_chord_part_return).  That once raised AttributeError inside Celery's
    chord_error_from_stack and killed the whole worker; now the body gets Redis's ChordError."""
    backend = app.backend
    body = app.signature("t.body", options={"task_id": "body-1"})
    backend.client.chord("chord-1", ["m-1"], {"queue": "celery", "message": {"body": b"{}", "id": "body-1"}})
    request = Context(id="m-1", group="chord-1", chord=body, errbacks=None, chain=None)
    exc = ValueError("boom")
    backend.mark_as_failure("m-1", exc, request=request)  # stores, then calls on_chord_part_return
    meta = backend.get_task_meta("body-1")
    assert meta["status"] == states.FAILURE
    assert isinstance(meta["result"], ChordError)
    assert str(meta["result"]) == "Dependency m-1 raised ValueError('boom')"

    # a revoked member, as the worker's Request.revoked() reports it
    body2 = app.signature("t.body", options={"task_id": "body-2"})
    backend.client.chord("chord-2", ["m-2"], {"queue": "celery", "message": {"body": b"{}", "id": "body-2"}})
    backend.mark_as_revoked("m-2", "revoked", request=Context(id="m-2", group="chord-2", chord=body2,
                                                            errbacks=None, chain=None))
    assert "Dependency m-2 raised TaskRevokedError" in str(backend.get_task_meta("body-2")["result"])


def test_a_wait_that_brings_the_result_still_checks_the_parents_first(app):
    """AsyncResult.get passes its parents' check as on_interval; Celery's own waiters call it after
    every wait, also the last, so a chord header member's exception wins over the body's ChordError."""
    backend = app.backend
    backend.store_result("done-1", 42, states.SUCCESS)
    calls = []
    meta = backend.wait_for("done-1", timeout=WAIT, on_interval=lambda: calls.append(1))
    assert meta["status"] == states.SUCCESS and meta["result"] == 42
    assert calls == [1]

    # end to end through AsyncResult.get: the parent failed, the result is a ChordError
    backend.store_result("parent-1", ValueError("the member's own error"), states.FAILURE)
    backend.store_result("body-3", ChordError("Dependency parent-1 raised ValueError"), states.FAILURE)
    r = app.AsyncResult("body-3", parent=app.AsyncResult("parent-1"))
    with pytest.raises(ValueError, match="the member's own error"):
        r.get(timeout=WAIT)


def test_a_result_that_is_a_signature_is_stored_and_read_back(app):
    """Celery's tasks may return a canvas (chain(group(...))): a dict subclass brokerd's native value
    cannot carry as it is.  It was refused ("RESULT_SET field 5 (meta) must be dict"); now it lives
    in Celery's own meta and reads back as the signature's dict."""
    from celery import chain, group

    add = app.signature("t.add")
    nested = chain(group([add]))
    app.backend.store_result("sig-1", nested, states.SUCCESS)
    meta = app.backend.get_task_meta("sig-1")
    assert meta["status"] == states.SUCCESS
    assert meta["result"]["task"] == "celery.chain"
    assert meta["result"]["kwargs"]["tasks"][0]["task"] == "celery.group"


def test_a_chord_whose_body_is_a_chord_goes_by_celerys_chord_unlock_and_publishes_only_the_header(app, broker):
    """A chord body that is itself a chord (or a group, or a chain led by one) is not one message
    brokerd can hold.  It was applied at once, its own header running with the placeholder
    argument (Celery's chain-of-groups tests got 1 instead of 11); now it waits behind Celery's
    chord_unlock, and applying the outer chord publishes its header and nothing of its body."""
    from celery import chord

    from client.producer import Client

    add, tsum = app.signature("t.add"), app.signature("t.tsum")
    chord([add.clone((1, 1)), add.clone((2, 2))], chord([tsum.clone(), tsum.clone()], tsum.clone())).apply_async()
    sent = []
    with Client(f"brokerd://{broker.address}") as c:
        consumer = c.consume(["celery"], prefetch=10)
        while (d := consumer.get(timeout=2.0)) is not None:
            sent.append((d.headers or {}).get("task"))
    assert sorted(sent) == ["celery.chord_unlock", "t.add", "t.add"]


def test_a_chain_body_led_by_an_immutable_task_gets_its_own_arguments_not_the_results(app, broker):
    """chord(header, chain(echo.si('a'), ...)): the chain's lead ignores the header's results, as in
    Celery; brokerd's results were put in place of its first argument (Redis got ['a'])."""
    from celery import chain, chord
    from kombu import serialization

    from client.celery import message as M
    from client.producer import Client

    add, echo = app.signature("t.add"), app.signature("t.echo")
    res = chord([add.clone((1, 1))], chain(echo.clone(("a",)).set(immutable=True),
                                           echo.clone(("b",)).set(immutable=True))).apply_async()
    with Client(f"brokerd://{broker.address}") as c:
        consumer = c.consume(["celery"], prefetch=10)
        header = consumer.get(timeout=WAIT)
        assert (header.headers or {}).get("task") == "t.add"
        member_id = M.from_delivery(header)["headers"]["id"]
        app.backend.store_result(member_id, 2, states.SUCCESS)  # brokerd fires the body now
        body = consumer.get(timeout=WAIT)
        raw = M.from_delivery(body)
        args, _kwargs, _embed = serialization.loads(raw["body"], raw["content-type"], raw["content-encoding"])
        assert raw["headers"]["task"] == "t.echo" and raw["headers"]["id"] != res.id  # the lead, not the tail
        assert args == ["a"]


def test_a_group_joins_natively_in_completion_order_by_long_poll(app):
    """GroupResult.get joins by the backend (as on Redis): a member that failed raises at once, even
    while one listed before it is still pending, and a member that finishes later is waited for by
    brokerd's long-poll.  (A plain join waited for the first member, and followed each member's
    parents: Celery's test_header_failure_fails_the_chords_after_it saw the chain's end PENDING.)"""
    import threading

    backend = app.backend
    backend.store_result("g-2", ValueError("the second failed first"), states.FAILURE)
    gr = app.GroupResult("g", [app.AsyncResult("g-1"), app.AsyncResult("g-2")])
    with pytest.raises(ValueError, match="the second failed first"):
        gr.get(timeout=WAIT)

    backend.store_result("h-1", 1, states.SUCCESS)
    later = threading.Timer(0.3, backend.store_result, ("h-2", 2, states.SUCCESS))
    later.start()
    try:
        assert app.GroupResult("h", [app.AsyncResult("h-1"), app.AsyncResult("h-2")]).get(timeout=WAIT) == [1, 2]
    finally:
        later.join()


def test_a_frozen_chord_applied_again_is_a_new_run_whose_body_is_dispatched_again(app, broker):
    """Celery's test_reapplying_frozen_chord_dispatches_body_again: a frozen chord keeps its group
    id, but each apply is a new run.  brokerd's CHORD is idempotent per id (a retried CHORD must not
    fire twice), so the second apply published its header and nothing would ever run the body; now
    it goes by Celery's chord_unlock."""
    from celery import chord, states

    from client.celery import message as M
    from client.producer import Client

    add, tsum = app.signature("t.add"), app.signature("t.tsum")
    c = chord([add.clone((1, 2)), add.clone((3, 4))], tsum.clone())
    c.freeze()
    with Client(f"brokerd://{broker.address}") as client:
        consumer = client.consume(["celery"], prefetch=10)

        def drain():
            out = []
            while (d := consumer.get(timeout=2.0)) is not None:
                out.append(M.from_delivery(d)["headers"])
            return out

        c.apply_async()
        first = drain()
        assert sorted(h["task"] for h in first) == ["t.add", "t.add"]
        for h in first:
            app.backend.store_result(h["id"], 3, states.SUCCESS)
        assert [h["task"] for h in drain()] == ["t.tsum"]  # brokerd fired the first run's body
        c.apply_async()
        assert sorted(h["task"] for h in drain()) == ["celery.chord_unlock", "t.add", "t.add"]


def _drain_headers(consumer, timeout):
    from client.celery import message as M

    out = []
    while (d := consumer.get(timeout=timeout)) is not None:
        out.append((M.from_delivery(d)["headers"], d.headers or {}))
    return out


def test_add_to_chord_makes_the_body_wait_for_the_added_task_too(app, broker):
    """Celery's self.add_to_chord (test_add_to_chord): a running member grows its chord.  The backend
    had no add_to_chord (NotImplementedError); now it is brokerd's CHORD_ADD, and the body fires
    only once the added task has a result, with that result after the members'."""
    from client.producer import Client

    backend = app.backend
    backend.client.chord("chord-a", ["m-1"], {"queue": "grow", "message": {"body": b"{}", "id": "body-a"}})
    backend.add_to_chord("chord-a", app.AsyncResult("a-1"))
    backend.store_result("m-1", 0, states.SUCCESS)
    # m-1 alone would have fired the chord: brokerd still waits for a-1 (a repeat adds nothing)
    assert backend.client.chord_add("chord-a", ["a-1"]) == {"chord": "chord-a", "pending": 1}
    backend.store_result("a-1", 5, states.SUCCESS)
    with Client(f"brokerd://{broker.address}") as c:
        d = c.consume(["grow"], prefetch=1).get(timeout=WAIT)
        assert d is not None and d.id == "body-a"
        assert d.headers["x-chord-results"] == [0, 5]


def test_add_to_chord_on_a_chord_brokerd_does_not_count_says_so(app):
    with pytest.raises(NotImplementedError, match=r"add_to_chord on brokerd needs a chord counted by brokerd: "
                                                  r"NOT_FOUND: chord 'no-such' is not waiting"):
        app.backend.add_to_chord("no-such", app.AsyncResult("x-1"))


def test_a_generator_header_is_published_as_it_is_read_and_counted_by_brokerd(app, broker):
    """Celery's test_generator: a chord header given as a generator is read lazily, its first task
    published before the generator ends.  The backend read it whole to name the CHORD's members
    (and the ids Celery froze then were not those it published); now the members are collected as
    they are published and the CHORD is declared once the last one is."""
    from celery import chord

    from client.producer import Client

    add, tsum = app.signature("t.add"), app.signature("t.tsum")
    with Client(f"brokerd://{broker.address}") as c:
        consumer = c.consume(["celery"], prefetch=10)
        seen = []

        def header():
            from client.celery import message as M

            for i in range(3):
                if i == 2:  # the first task is in brokerd before the generator is read to its end
                    # (Celery reads one ahead: the second is published after this item is read)
                    d = consumer.get(timeout=WAIT)
                    assert d is not None, "Chord header was unrolled too early"
                    seen.append((M.from_delivery(d)["headers"], d.headers))
                yield add.clone((i, i))

        res = chord(header(), tsum.clone()).apply_async()
        seen.extend(_drain_headers(consumer, 0.5))
        members = [h for h, _ in seen]
        assert [h["task"] for h in members] == ["t.add"] * 3
        for h, v in zip(reversed(members), (40, 20, 0)):  # results stored last to first
            app.backend.store_result(h["id"], v, states.SUCCESS)
        d = consumer.get(timeout=WAIT)
        assert d is not None and d.id == res.id
        assert d.headers["x-chord-results"] == [0, 20, 40]  # in the header's order


def test_a_generator_header_whose_members_cannot_be_seen_is_refused_not_left_to_hang():
    """set_chord_size comes before the last member is published: every earlier member must have been
    seen by then, or the chord could never be declared (get() would wait for ever)."""
    from client.celery.backend import _LazyChords

    lazy = _LazyChords()
    lazy.expect(None, "g-1", {"message": {"id": "body-1"}})
    lazy.published({"headers": {"id": "m-1", "group": "g-1", "group_index": 0}, "body": b"",
                    "content-type": "application/json"})
    with pytest.raises(NotImplementedError, match=r"^chord g-1: a generator header whose members are not all "
                                                  r"single tasks or chains of tasks \(1 of the first 2 were seen\)"):
        lazy.sized("g-1", 3)
    assert "g-1" not in lazy._waiting and not lazy._threads  # publishes cost one look-up again
