"""The trio pool's main loop: the worker's events arrive on a memory channel, tasks run in a nursery.

``run_trio(worker)`` drives a ``runtime.Worker`` through the same public loop interface as
``client.worker.mainloop`` (``event()``, ``hand_back()``, ``beat_if_due()``, ``flush()``,
``shutdown()``, ``grace_deadline``, ``cold``).  Other threads (the intake thread, the client's
reader) hand it items through ``worker.post``, which this loop points at the trio token for as long
as it runs.  Only the trio pool imports this module, so the other pools never pay for importing trio.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import trio

from client.worker.intake import connect, connect_deadline, intake
from client.worker.pools.trio import TrioPool

log = logging.getLogger("brokerd.worker")


def run_trio(w) -> None:
    """Run worker ``w`` on a new trio loop in this thread until it stops (the trio pool).

    ``w.cold`` / ``w.fatal`` tell the caller how it ended.
    """
    w.claim_unique_name()
    w.pool = TrioPool(w)
    client = connect(w, deadline=connect_deadline(w.connect_timeout))
    if client is None:
        return
    w.client = client
    trio.run(_main, w, client)


async def _main(w, client) -> None:
    token = trio.lowlevel.current_trio_token()
    send, recv = trio.open_memory_channel(float("inf"))

    def post(item, _soon=token.run_sync_soon, _send=send.send_nowait):
        try:
            _soon(_send, item)
        except trio.RunFinishedError:
            pass

    w.post = post
    main = threading.current_thread() is threading.main_thread()
    async with trio.open_nursery() as nursery:
        w.pool.nursery = nursery
        w.pool.wake = send.send_nowait
        if main:
            nursery.start_soon(_signals, w)
        w.intake_thread = threading.Thread(target=intake, args=(w, client), name="brokerd-intake", daemon=True)
        w.intake_thread.start()
        pool = w.pool
        backlog = w.backlog
        while True:
            if w.cold:
                break
            if w.stopping and not w.running and not backlog:
                break
            timeout = float("inf")
            if w.stopping:
                timeout = w.grace_deadline - time.monotonic()
                if timeout <= 0:
                    log.error("grace period of %gs is over with %d tasks still running: cold stop",
                              w.grace, len(w.running))
                    w.cold = True
                    break
            now = time.monotonic()
            timeout = w.events.wait(now, min(timeout, w.beat_if_due(now)))
            cw = w.credit_wait()  # a running task becoming long lowers the credit (credit.py)
            if cw is not None:
                timeout = min(timeout, cw)
            with trio.move_on_after(timeout):
                ev = await recv.receive()
                w.event(ev)
                while True:  # drain without yielding between events
                    try:
                        ev = recv.receive_nowait()
                    except trio.WouldBlock:
                        break
                    w.event(ev)
            if w.stopping:
                w.hand_back()
            while backlog and pool.has_idle():
                job = backlog.popleft()
                w.running[job.seq] = job
                pool.submit(job)
            w.flush()
        nursery.cancel_scope.cancel()
    w.post = w.post_sync
    await trio.to_thread.run_sync(w.shutdown)


async def _signals(w) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async for signum in sigs:
            w.post(("signal", signum))
