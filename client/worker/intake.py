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
``prefetch``, ``concurrency``, ``credit``, ``stop_event`` and ``post``.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time

from client import wire
from client.errors import BrokerdError, ConnectionClosed, ConnectionLost, Disconnected
from client.options import broker_url, redact
from client.worker.channel import close_quietly, hand_deliveries_to_main_loop, open_client, wait_until_closed

log = logging.getLogger("brokerd.worker")

RECONNECT_FIRST = 0.1  # first back-off after a lost connection; doubles each try ...
RECONNECT_MAX = 5.0  # ... up to this; each wait is jittered to 50-100 % so workers don't stampede
# At start: None waits for brokerd for ever (it may still be replaying its log, or a scheduler may
# start the worker first), one log line per attempt; a number of seconds gives up after that long
# (BrokerUnreachable: exit code 3 in the CLI).
CONNECT_TIMEOUT = None


class BrokerUnreachable(Exception):
    """brokerd could not be reached at start within the connect timeout."""


PROBE_TIMEOUT = 2.0  # seconds for the start-up look at which worker names are online


def online_worker_names(broker: str, timeout: float = PROBE_TIMEOUT) -> set[str] | None:
    """The names of the workers brokerd sees online, or None if brokerd cannot be asked now.

    A plain socket and the codec, no threads: it runs before the process pool forks.
    """
    try:
        url = broker_url(broker)
    except ValueError:
        return None
    if url.tls:
        return None  # not asked over TLS (yet): the name is kept as given
    for host, port in url.addresses:  # a replica group: a follower refuses WORKERS, ask the next
        names = _probe(url, host, port, timeout)
        if names is not None:
            return names
    return None


def _probe(url, host, port, timeout):
    try:
        hello = {"version": wire.PROTOCOL_VERSION, "client": "worker name probe"}
        if url.user is not None:
            hello.update(user=url.user, token=url.token)
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(wire.PREAMBLE + wire.encode([wire.OP_HELLO, 1, hello])
                      + wire.encode([wire.OP_WORKERS, 2]) + wire.encode([wire.OP_BYE, 3]))
            reader = wire.FrameReader(strict=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data = s.recv(65536)
                if not data:
                    return None
                reader.feed(data)
                for f in reader.frames():
                    if f[0] == wire.OP_OK and f[1] == 2 and type(f[2]) is list:
                        return {w.get("hostname") for w in f[2] if type(w) is dict and w.get("state") == "online"}
                    if f[0] in (wire.OP_ERROR, wire.OP_CLOSING):
                        return None
    except (OSError, ValueError, wire.WireError):
        return None
    return None


def connect_deadline(timeout: float | None) -> float | None:
    """The monotonic deadline for ``connect`` at start: None (never) when ``timeout`` is None."""
    return None if timeout is None else time.monotonic() + timeout


def connect(host, deadline=None):
    """A new Client, retrying with back-off (capped at ``RECONNECT_MAX``, a log line per attempt);
    BrokerUnreachable after ``deadline`` (monotonic; None: never); None when the worker is stopped
    meanwhile."""
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
        log.warning("cannot reach brokerd at %s (%s): attempt %d, retrying in %.2fs%s", host.broker, err, attempt,
                    wait, "" if deadline is None else f" (giving up {max(0.0, deadline - time.monotonic()):.1f}s from now)")
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
                t0 = time.monotonic()
                # slots: brokerd may RECALL what this worker holds beyond them (protocol.md §5.42)
                consumer = client.consume(host.queues, host.prefetch, slots=host.concurrency)
                if host.credit is not None:
                    host.credit.measured_round_trip(time.monotonic() - t0)
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
