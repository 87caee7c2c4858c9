"""The intake thread: it owns the connection's life.

It connects (backoff ``RECONNECT_FIRST`` doubling to ``RECONNECT_MAX``, with jitter), consumes,
and waits for the connection to end, then reconnects.  The client's own reader and flusher
threads do the socket I/O.  The main loop takes deliveries straight from the consumer's buffer:
the reader thread pokes it (see ``channel.hand_deliveries_to_main_loop``), one thread hand-off per
burst.  With a client that lacks what that relies on, this thread falls back to
``consumer.get()`` and posts each delivery.

Everything reaches the main loop through ``host.post(item)``: ``("connected", client, consumer,
gen, direct)``, ``("delivery", d, gen)``, ``("lost", gen)``, ``("fatal", exc)``,
``("intake-done",)``.  ``host`` is the worker: it has ``broker``, ``hostname``, ``queues``,
``prefetch``, ``stop_event`` and ``post``.
"""

from __future__ import annotations

import logging
import os
import random
import time

from client.options import redact
from client.errors import BrokerdError, ConnectionClosed, ConnectionLost, Disconnected
from client.worker.channel import close_quietly, hand_deliveries_to_main_loop, open_client, wait_until_closed

log = logging.getLogger("brokerd.worker")

RECONNECT_FIRST = 0.1  # first back-off after a lost connection; doubles each try ...
RECONNECT_MAX = 5.0  # ... up to this; each wait is jittered to 50-100 % so workers don't stampede
CONNECT_TIMEOUT = 10.0  # at start: keep trying this long, then give up (exit code 3 in the CLI)


class BrokerUnreachable(Exception):
    """brokerd could not be reached at start within the connect timeout."""


def connect(host, deadline=None):
    """A new Client, retrying with back-off; BrokerUnreachable after ``deadline`` (monotonic);
    None when the worker is stopped meanwhile."""
    delay = RECONNECT_FIRST
    attempt = 0
    while True:
        attempt += 1
        try:
            return open_client(host.broker, f"worker {host.hostname} pid {os.getpid()}")
        except (BrokerdError, OSError) as exc:
            err = exc
        if host.stop_event.is_set():
            return None
        wait = delay * random.uniform(0.5, 1.0)
        if deadline is not None and time.monotonic() + wait > deadline:
            raise BrokerUnreachable(f"cannot reach brokerd at {host.broker} ({err}); tried {attempt} times")
        if attempt == 1 or attempt % 5 == 0:
            log.warning("cannot reach brokerd at %s (%s): retrying in %.2fs", host.broker, err, wait)
        if host.stop_event.wait(wait):
            return None
        delay = min(delay * 2, RECONNECT_MAX)


def intake(host, client):
    """The thread's body: consume, post deliveries, reconnect when the connection drops."""
    stop = host.stop_event
    gen = 0
    try:
        while not stop.is_set():
            if client is None:
                client = connect(host)
                if client is None:
                    break
                log.info("reconnected to brokerd at %s", redact(host.broker))
            gen += 1
            try:
                consumer = client.consume(host.queues, host.prefetch)
            except BrokerdError as exc:
                log.error("cannot consume from %s: %s", ",".join(host.queues), exc)
                close_quietly(client)
                client = None
                if stop.wait(RECONNECT_MAX):
                    break
                continue
            direct = hand_deliveries_to_main_loop(client, consumer, host.post)
            host.post(("connected", client, consumer, gen, direct))
            try:
                if direct:
                    # The main loop takes deliveries from the consumer's buffer itself; this
                    # thread only waits for the connection to end (its reader thread exits).
                    err = wait_until_closed(client)
                    if isinstance(err, ConnectionClosed) or stop.is_set():
                        return
                    raise err if err is not None else ConnectionLost(None, "the client's reader stopped")
                post = host.post
                get = consumer.get
                while True:
                    d = get()
                    if d is None:  # cancelled: a warm stop
                        return
                    post(("delivery", d, gen))
            except ConnectionClosed:
                return
            except (ConnectionLost, Disconnected) as exc:
                if stop.is_set():
                    return
                log.warning("connection to brokerd lost (%s): reconnecting", exc)
                host.post(("lost", gen))
                close_quietly(client)
                client = None
    except BaseException as exc:  # noqa: BLE001 - a bug: let the main loop stop rather than hang
        log.exception("worker intake thread crashed")
        host.post(("fatal", exc))
    finally:
        host.post(("intake-done",))
