"""The blocking and the async client offer the same verbs, built from one table (client/verbs.py)."""

from __future__ import annotations

import inspect

from client import AsyncClient, Client
from client import verbs
from client.async_client import AsyncConsumer
from client.producer import Consumer

# Names that differ on purpose: closing is ``close`` vs ``aclose`` (the trio and
# asyncio convention), and the async client reports which library it runs on.
ONLY_SYNC = {"close", "fileno", "flush", "submit", "wait_closed"}
ONLY_ASYNC = {"aclose", "library"}


def public(cls) -> dict:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")}


def test_the_sync_and_async_clients_have_the_same_public_verbs():
    sync, asyn = public(Client), public(AsyncClient)
    assert set(sync) - ONLY_SYNC == set(asyn) - ONLY_ASYNC
    for verb in verbs.VERBS:
        assert verb.__name__ in sync and verb.__name__ in asyn, verb.__name__


def test_each_verb_has_the_same_signature_in_both_clients():
    sync, asyn = public(Client), public(AsyncClient)
    for name in sorted(set(sync) & set(asyn)):
        if isinstance(sync[name], property):
            assert isinstance(asyn[name], property), name
            continue
        # consume returns its own shell's consumer class; everything else must match exactly
        strip = (lambda sig: sig.replace(return_annotation=inspect.Signature.empty)) if name == "consume" else (lambda sig: sig)
        assert strip(inspect.signature(sync[name])) == strip(inspect.signature(asyn[name])), name
        if name == "consume":  # returns an AsyncConsumer at once; it subscribes on first use
            continue
        assert inspect.iscoroutinefunction(asyn[name]), f"AsyncClient.{name} must be a coroutine function"
        assert not inspect.iscoroutinefunction(sync[name]), f"Client.{name} must block, not return a coroutine"
    assert inspect.signature(Client.close) == inspect.signature(AsyncClient.aclose)


def test_the_eleven_verbs_async_lacked_are_there():
    for name in ("store_result", "get_result", "forget_result", "revoke", "schedule_put", "schedule_remove",
                 "schedule_list", "schedule_pause", "chord", "emit_events", "unsubscribe_events"):
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name


def test_both_consumers_have_the_same_public_api():
    only_sync = {"buffer", "on_wake"}  # hooks for a thread that drains the buffer itself (the worker)
    only_async = {"start"}  # AsyncClient.consume is not a coroutine; start() subscribes
    assert set(public(Consumer)) - only_sync == set(public(AsyncConsumer)) - only_async


def test_a_verb_is_installed_with_its_name_doc_and_signature():
    assert Client.declare.__doc__ == verbs.declare.__doc__ == AsyncClient.declare.__doc__
    assert Client.declare.__qualname__ == "Client.declare"
    params = list(inspect.signature(Client.declare).parameters)
    assert params[:2] == ["client", "queue"]  # the verb's first parameter is the shell itself


def test_delivery_settling_goes_through_the_verb_table_in_both_shells():
    for cls in (Client, AsyncClient):
        for name, fn in verbs.PRIVATE_VERBS.items():
            assert getattr(cls, name).__wrapped__ is fn, (cls.__name__, name)
