"""What running a task comes to, and how it is shown.

An *outcome* is the tuple ``(settle, state, value, meta, delay, retries)`` that the process
which ran a task (a pool child, a pool thread, the trio loop) hands back to the worker's main
loop: which result to store (``state``/``value``/``meta``; ``state`` None: none) and what to do
with the delivery (``settle``, one of the ``S_*`` codes).  The outcomes the worker decides
without running anything (an envelope it cannot read, a task nobody registered, a pool process
that died under its task) are built here too, so each has one home.
"""

from __future__ import annotations

import logging
import traceback

from client.exceptions import WorkerLostError
from client.taskopts import EVENT_REPR_MAX, args_shown, event_repr, short_text  # noqa: F401  (the worker's names)

log = logging.getLogger("brokerd.worker")

# Outcome settle codes: what to do with the delivery once the result (if any) is stored.
S_ACK = 0  # done: ack (atomically with the result, when there is one)
S_REJECT = 1  # nack without requeue: the dead-letter queue
S_REQUEUE = 2  # nack with requeue: run again now (counts an attempt)
S_RETRY = 3  # nack with a delay and a new "retries" header: brokerd holds it

# The meta of an outcome that succeeded but stores no result (ignore_result): (S_ACK, None, value,
# UNSTORED_SUCCESS, None, None), so the worker can tell it from an ignored task (Ignore), which stores
# nothing either, and still hand the value to the task's chain and links.  A string, because outcomes
# cross from pool processes pickled.
UNSTORED_SUCCESS = "succeeded, result not stored"


def succeeded(outcome) -> bool:
    """The task ran and returned (its result stored or not)."""
    return outcome[1] == "SUCCESS" or (outcome[1] is None and outcome[3] == UNSTORED_SUCCESS)


RESULT_REPR_MAX = 200  # characters of a return value shown in the "succeeded" log line

# A task whose pool process dies is redelivered after a delay that doubles: 1 s, 2 s, 4 s ... capped at
# 60 s (without it an os.abort() task ran 25 times in 81 ms).  Each death counts as one retry of the task
# (the "retries" header, as for self.retry()), bounded by its max_retries (Celery's default 3; a task with
# max_retries=None gets LOST_RETRIES_DEFAULT); past that its result is FAILURE WorkerLostError.
LOST_BACKOFF_FIRST = 1.0
LOST_BACKOFF_MAX = 60.0
LOST_RETRIES_DEFAULT = 3


def safe_str(exc: BaseException) -> str:
    """str(exc), or a stand-in when the exception's __str__ itself raises (it must not cost the worker)."""
    try:
        return str(exc)
    except Exception as err:  # noqa: BLE001
        return f"<str() of {type(exc).__name__} failed: {type(err).__name__}>"


def exc_meta(exc: BaseException, hostname: str, tb: str | None = None) -> dict:
    return {
        "exc_type": type(exc).__name__,
        "exc_message": safe_str(exc),
        "traceback": tb if tb is not None else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "hostname": hostname,
    }


def reject_meta(exc: BaseException, hostname: str) -> dict:
    """The meta of the FAILURE a ``raise Reject(reason, requeue=False)`` stores: the reason, no traceback."""
    return {"exc_type": "Reject", "exc_message": safe_str(exc), "traceback": None, "hostname": hostname}


def short_repr(value) -> str:
    r = repr(value)
    return r if len(r) <= RESULT_REPR_MAX else r[: RESULT_REPR_MAX - 3] + "..."


def shown(value) -> str:
    """A bad field's value in an error message: its type and a short, safe repr."""
    return f"{type(value).__name__} {event_repr(value, 60)}"


def exception_text(meta) -> str | None:
    """``Type('message')`` of a FAILURE/RETRY result's meta, for events; None for other results."""
    if not isinstance(meta, dict) or not meta.get("exc_type"):
        return None
    return short_text(f"{meta.get('exc_type')}({meta.get('exc_message', '')!r})", 300)


def undecodable_outcome(msg_id, queue, exc, hostname):
    msg = f"message {msg_id!r} on queue {queue!r} is not a task envelope: {exc}"
    log.error("Rejected message %s from %s: %s (sent to the dead-letter queue)", msg_id, queue, exc)
    meta = {"exc_type": "DecodeError", "exc_message": msg, "traceback": None, "hostname": hostname}
    return (S_REJECT, "FAILURE", None, meta, None, None)


def unknown_outcome(env, app, hostname):
    name = env["task"]
    known = sorted(n for n in app.tasks)
    listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    msg = (
        f"Task of kind {name!r} is not registered on worker {hostname}: define it with @app.task in a module "
        f"the worker imports (the MODULE of 'brokerd-worker MODULE:APP', or one it imports), or check the name "
        f"given to send_task(). Registered: {listed or 'none'}"
    )
    log.error("Received unregistered task of type %r [%s]: sent to the dead-letter queue", name, env["id"])
    meta = {"exc_type": "NotRegistered", "exc_message": msg, "traceback": None, "hostname": hostname}
    return (S_REJECT, "FAILURE", None, meta, None, None)


def unsigned_outcome(msg_id, env, why: str, hostname):
    """A task refused because its signature is missing or does not verify (client/signing.py): it is
    not run, its result is FAILURE ``SecurityError`` (Celery's name) saying why, and the delivery is
    rejected to the dead-letter queue.  The result is stored under the *message* id: a signed body
    replayed under another id must not overwrite the real task's result."""
    name = env.get("task")
    msg = (f"task {name!r} [{msg_id}] refused by worker {hostname}: {why}. It was not run; "
           f"producers sign tasks with the app setting task_signing_key (protocol.md §8.4)")
    log.error("Refused task %r [%s]: %s (sent to the dead-letter queue)", name, msg_id, why)
    meta = {"exc_type": "SecurityError", "exc_message": msg, "traceback": None, "hostname": hostname}
    return (S_REJECT, "FAILURE", None, meta, None, None)


def lost_outcome(job, task, why: str, hostname: str):
    """The outcome of a job whose process died mid-task.  The death counts as one retry: redelivered
    after a backoff (LOST_BACKOFF_FIRST doubling to LOST_BACKOFF_MAX) with the ``retries`` header
    raised, and past the task's max_retries stored as FAILURE WorkerLostError and dead-lettered, so
    ``get()`` returns.  A task acked on receipt (acks_late=False) cannot be redelivered: FAILURE at once."""
    d = job.d
    hdrs = d.headers
    retries = hdrs.get("retries") if hdrs else None
    if type(retries) is not int or retries < 0:
        retries = job.env.get("retries") or 0
    bound = getattr(task, "max_retries", None)
    if type(bound) is not int:
        bound = LOST_RETRIES_DEFAULT
    if d.settled or retries >= bound:
        done = f"{retries + 1} times" if not d.settled else "once; it was acked on receipt (acks_late=False)"
        exc = WorkerLostError(f"Worker exited prematurely: {why} (the task's process died {done}; "
                              f"max_retries is {bound})")
        log.error("Task %s[%s] raised unexpected: %r", job.name, job.task_id, exc)
        meta = exc_meta(exc, hostname, tb=None)
        meta["traceback"] = None
        return (S_REJECT, "FAILURE", None, meta, None, None)
    delay = min(LOST_BACKOFF_MAX, LOST_BACKOFF_FIRST * 2 ** min(retries, 16))
    exc = WorkerLostError(f"Worker exited prematurely: {why}")
    log.warning("Task %s[%s] retry: Retry in %gs: %r", job.name, job.task_id, delay, exc)
    meta = exc_meta(exc, hostname, tb=None)
    meta["traceback"] = None
    return (S_RETRY, "RETRY", None, meta, delay, retries + 1)
