"""The task page's buttons: revoke, terminate, retry a failed task (served by ``broker.runtime.http``).

    POST /api/task/<id>/revoke     REVOKE <id>: its waiting messages are dropped when due
                                   (the ``control`` grant, as REVOKE needs on the protocol)
    POST /api/task/<id>/terminate  revoke, and tell every consumer to kill it if it runs
                                   (REVOKE with terminate; the ``control`` grant)
    POST /api/task/<id>/retry      a FAILURE published again as a new task (``publish`` on its queue)

A retry reuses what brokerd kept of the failed task (its events: ``task_info``): the task name,
args and kwargs (read back from the text the worker sent: literal values only, see ``_value``), the queue it ran from, and its parent_id and root_id (it stays in the same
workflow).  It gets a new task id, retries 0, priority 0, no eta and no expiry (the original's
were not kept), and the header ``retry_of`` naming the failed task.  brokerd does not sign
tasks: a worker that requires signed tasks (``task_signing_public_keys``) refuses the retry.

Pure: ``now`` is passed in, and the caller flushes and waits for the log.
"""

from __future__ import annotations

import ast
import uuid
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote

from broker.errors import BadRequest, NotFound
from client.envelope import encode_envelope, make_envelope  # the one writer of protocol.md §8.1

TASK_ACTIONS = ("revoke", "terminate", "retry")


@dataclass
class Plan:
    """What a task action will do: ``refused`` = (what, grant, queue) for ``_refused``, else ``run``."""

    refused: tuple | None = None
    run: Callable | None = None


def _value(kept, kind, field: str, task_id: str):
    """A task's args or kwargs back from its event: workers send them as their Python repr
    (``client.worker.outcome.event_repr``, shortened past EVENT_REPR_MAX), so only a literal one
    (numbers, text, lists, maps...) can be rebuilt; ``ast.literal_eval`` runs no code."""
    if kept is None:
        return [] if kind is not dict else {}
    value = kept
    if isinstance(kept, str):
        try:
            value = ast.literal_eval(kept)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
    if not isinstance(value, kind):
        raise BadRequest(f"the {field} brokerd kept of task {task_id} ({kept!r:.80}) cannot be rebuilt: workers "
                         "send a task's arguments as text, shortened when long, and only plain values (numbers, "
                         "text, lists, maps) can be read back; publish it again from your code")
    return list(value) if kind is not dict else dict(value)


def task_url(task_id: str) -> str:
    return "/task/" + quote(task_id, safe="")


def plan(web, access, task_id: str, action: str, now: float) -> Plan:
    """Check the task and the viewer's grant; BadRequest/NotFound name what is wrong."""
    if action in ("revoke", "terminate"):
        if not access.may("control"):
            return Plan(refused=(f"{action} tasks", "control", None))
        terminate = action == "terminate"

        def revoke(state, now):
            state.revoke(task_id, now, terminate=terminate)
            what = "revoked"
            if terminate:  # as the protocol's REVOKE with terminate (broker.handlers.binary.h_revoke)
                n = state.broadcast_control({"revoke": [task_id], "terminate": True})
                what = f"revoked and asked {n} consumer connection{'' if n == 1 else 's'} to terminate"
            return {"message": f"{what} task {task_id}", "next": task_url(task_id)}
        return Plan(run=revoke)
    info = web.task(task_id, now)  # BadRequest for a malformed id
    if info is None:
        raise NotFound(f"brokerd knows nothing of task {task_id!r}: no events and no stored result")
    if info.get("state") != "FAILURE":
        raise BadRequest(f"task {task_id} is {info.get('state') or 'in no known state'}, not FAILURE: "
                         "only a failed task can be retried from the page")
    name, queue = info.get("name"), info.get("queue")
    args, kwargs = info.get("args"), info.get("kwargs")
    if not isinstance(name, str) or not isinstance(queue, str) or not queue:
        raise BadRequest(f"brokerd did not keep the name and queue of task {task_id} (its worker sent no "
                         "task-received event with them, or they were dropped from the bounded history): "
                         "publish it again from your code")
    if not access.may("publish", queue):
        return Plan(refused=("retry a task on", "publish", queue))
    args = _value(args, (list, tuple), "args", task_id)
    kwargs = _value(kwargs, dict, "kwargs", task_id)

    def retry(state, now):
        new_id = str(uuid.uuid4())
        env = make_envelope(name, new_id, args, kwargs, parent_id=info.get("parent_id"),
                            root_id=info.get("root_id"), headers={"retry_of": task_id})
        state.publish(0, queue, encode_envelope(env), new_id, 0, now)
        return {"message": f"published {name} again as task {new_id} on queue {queue} (same args and kwargs)",
                "next": task_url(new_id), "new_task": new_id, "queue": queue}
    return Plan(run=retry)


# -- a worker's controls (the worker page, /worker/<hostname>) -----------------------------------
# POST /api/workers/<hostname>/<action>: the CONTROL command brokerd relays (CONTROL_REQUEST,
# broker.state.events) and its args; the worker answers with CONTROL_REPLY (client/worker/control.py).
WORKER_ACTIONS = {
    "shutdown": ("shutdown", {}),
    "pool-grow": ("pool_grow", {"n": 1}),
    "pool-shrink": ("pool_shrink", {"n": 1}),
}
# How long the page waits for the worker's reply: a live worker answers within one event-loop turn;
# a wedged one must not hold the browser's request (hypercorn's READ_TIMEOUT is 10 s).
CONTROL_WAIT = 5.0  # seconds
# The HTTP side is no connection of the state's: its requests carry this id, which no connection
# has, so the state keeps the replies on the request and sends them nowhere; the page reads them.
HTTP_CONN = -1


def worker_url(hostname: str) -> str:
    return "/worker/" + quote(hostname, safe="")


def control_start(state, hostname: str, action: str, now: float):
    """Send the CONTROL to one worker: (request or None when the worker is not online, command)."""
    command, args = WORKER_ACTIONS[action]
    known = {w["hostname"]: w for w in state.workers_list(now)}
    w = known.get(hostname)
    if w is None:
        raise NotFound(f"no worker {hostname!r} has reported to this brokerd")
    if w.get("state") != "online":
        raise BadRequest(f"worker {hostname} is {w.get('state')}, not online: it cannot be asked anything")
    # the pending request (None: nobody to ask after all); its replies are read back from it
    return state.control_ask(HTTP_CONN, command, args, now, timeout=CONTROL_WAIT, destination=[hostname]), command
