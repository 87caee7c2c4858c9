"""How a kombu/Celery message maps onto a brokerd message, and back (protocol.md, "Celery messages on brokerd").

Pure functions, no I/O.  Publishing (``to_brokerd``):

* body: kombu's serialized body bytes, as given (a ``str`` body is encoded with its content-encoding);
* id: the Celery task id (``headers["id"]``, else ``properties["correlation_id"]``), else brokerd makes one;
* priority: kombu's ``properties["priority"]`` as brokerd's 0-255 priority, unchanged: higher = more
  urgent, as on RabbitMQ (Celery's Redis transport is the one that inverts it);
* eta/countdown: ``headers["eta"]`` becomes brokerd's ``eta`` (absolute time), so brokerd holds the message
  until due; the original is kept in the brokerd header ``x-celery-eta`` and given back to Celery at
  delivery, when it has passed, so the worker runs the task at once and ``task.request.eta`` is as sent;
* brokerd headers: ``{"task": <task name>, "kombu": {"headers", "properties", "content-type",
  "content-encoding"}}``: ``task`` at the top for brokerd's page and ``TASK <id>``.

Delivering (``from_delivery``) rebuilds kombu's raw message dict, with ``delivery_info["redelivered"]``
from brokerd's attempt count, and puts a chord's member results (brokerd's ``x-chord-results`` header,
protocol.md §5.27 raw variant) in place of the placeholder first argument of the chord body.
"""

from __future__ import annotations

import datetime as dt

from kombu import serialization

KOMBU_KEY = "kombu"  # the brokerd header that carries kombu's headers/properties/content type
ETA_KEY = "x-celery-eta"  # the eta Celery asked for (ISO 8601), kept for people reading the message
CHORD_RESULTS = "x-chord-results"  # set by brokerd when it fires a raw chord body (§5.27)
CHORD_LAST = "x-chord-last"  # ... with the id of the member whose result completed the chord
IMMUTABLE = "x-chord-immutable"  # set by the backend on an immutable (.si) chord body: results not prepended
MAX_PRIORITY = 255  # brokerd's range is 0-255; a larger kombu priority is clamped, not refused


def task_id_of(message: dict) -> str | None:
    headers = message.get("headers") or {}
    props = message.get("properties") or {}
    mid = headers.get("id") or props.get("correlation_id")
    return str(mid) if mid else None


def priority_of(message: dict) -> int:
    p = (message.get("properties") or {}).get("priority")
    if not isinstance(p, int) or isinstance(p, bool):
        return 0
    return max(0, min(MAX_PRIORITY, p))


def parse_eta(value) -> float | None:
    """Celery's ``eta`` header (ISO 8601; naive means UTC, as Celery's worker reads it with enable_utc)."""
    if not value:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    when = dt.datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def body_bytes(message: dict) -> bytes:
    body = message.get("body")
    if isinstance(body, str):
        return body.encode(message.get("content-encoding") or "utf-8")
    return body if body is not None else b""


def to_brokerd(message: dict) -> dict:
    """kombu's raw message dict -> the arguments of brokerd's PUBLISH:
    ``{"body", "id", "priority", "eta", "headers"}``."""
    headers = dict(message.get("headers") or {})
    eta = parse_eta(headers.get("eta"))
    out_headers = {}
    if eta is not None:
        out_headers[ETA_KEY] = headers["eta"]
        headers["eta"] = None  # brokerd holds it; the worker must run it at once on delivery
    if headers.get("task"):
        out_headers["task"] = headers["task"]
    props = dict(message.get("properties") or {})
    props.pop("delivery_tag", None)  # a delivery's tag is brokerd's, set at delivery
    out_headers[KOMBU_KEY] = {
        "headers": headers,
        "properties": props,
        "content-type": message.get("content-type"),
        "content-encoding": message.get("content-encoding"),
    }
    return {"body": body_bytes(message), "id": task_id_of(message), "priority": priority_of(message),
            "eta": eta, "headers": out_headers}


def from_delivery(d) -> dict:
    """A brokerd ``Delivery`` -> kombu's raw message dict (what ``virtual.Message`` takes)."""
    bh = d.headers or {}
    body = d.body
    if KOMBU_KEY not in bh and "x-schedule" in bh:
        bh, body = _unpack_scheduled(d, bh)
    k = bh.get(KOMBU_KEY)
    # What Celery's worker would choke on (it crashes the consumer, not just the task) is refused here:
    if not isinstance(k, dict) or not k.get("content-type"):
        raise ValueError(f"no '{KOMBU_KEY}' header with a content-type: not published through kombu")
    if not isinstance(k.get("headers") or {}, dict) or not isinstance(k.get("properties") or {}, dict):
        raise ValueError(f"the '{KOMBU_KEY}' header's headers and properties must be maps")
    if (k.get("headers") or {}).get("task") and not (k.get("headers") or {}).get("id"):
        raise ValueError("a Celery task message (headers.task) without headers.id")
    props = dict(k.get("properties") or {})
    ctype = k.get("content-type")
    cenc = k.get("content-encoding")
    headers = dict(k.get("headers") or {})
    if bh.get(ETA_KEY) and not headers.get("eta"):
        # brokerd held it until due; Celery's worker sees the eta it was sent with (task.request.eta),
        # now past, and runs it at once
        headers["eta"] = bh[ETA_KEY]
    if CHORD_RESULTS in bh and not bh.get(IMMUTABLE):
        body = prepend_chord_results(body, ctype, cenc, bh[CHORD_RESULTS])
    if CHORD_RESULTS in bh and isinstance(bh.get(CHORD_LAST), str) and bh[CHORD_LAST]:
        # On Celery's own backends the body is sent by the header task that completed the chord,
        # so that task is the body's parent; brokerd names it in x-chord-last.
        headers["parent_id"] = bh[CHORD_LAST]
    info = dict(props.get("delivery_info") or {})
    info.update(routing_key=info.get("routing_key") or d.queue, priority=d.priority,
                redelivered=d.attempts > 1)
    props.update(delivery_tag=d.tag, delivery_info=info, body_encoding=None, priority=d.priority)
    return {"body": body, "content-type": ctype, "content-encoding": cenc, "headers": headers, "properties": props}


def prepend_chord_results(body: bytes, content_type, content_encoding, results) -> bytes:
    """Celery protocol 2 body ``[args, kwargs, embed]``: the chord body was sent with a placeholder first
    argument (client.celery.backend.apply_chord); it becomes the results, as Celery's chord_unlock would
    have called it.  Re-encoded with the message's own serializer."""
    decoded = serialization.loads(body, content_type, content_encoding, accept=None)
    args, kwargs, embed = decoded
    args = [list(results), *list(args)[1:]]
    _, _, out = serialization.dumps([args, kwargs, embed], serializer=_serializer_name(content_type))
    return out.encode(content_encoding or "utf-8") if isinstance(out, str) else out


def _serializer_name(content_type) -> str:
    for name, ctype in serialization.registry.name_to_type.items():
        if ctype == content_type:
            return name
    raise ValueError(f"chord body has content type {content_type!r}, which no kombu serializer here encodes")


# -- schedules fired by brokerd (client/celery/beat.py) ------------------------------------------
# A schedule's message carries only the headers brokerd sets (x-schedule, x-tick), so the Celery message
# travels inside the body: CBOR {"celery-schedule": 1, "kombu": <the kombu header>, "body": <body bytes>}.
# At delivery it is unpacked, and brokerd's per-firing message id ("<name>@<tick>") becomes the task id.
SCHEDULED = "celery-schedule"


def scheduled_body(message: dict) -> bytes:
    """A kombu message as the bytes a brokerd schedule enqueues at each tick (SCHEDULE_PUT ``body``)."""
    import cbor2

    p = to_brokerd(message)
    return cbor2.dumps({SCHEDULED: 1, KOMBU_KEY: p["headers"][KOMBU_KEY], "body": p["body"]})


def _unpack_scheduled(d, bh):
    import cbor2

    try:
        packed = cbor2.loads(d.body)
    except Exception as exc:
        raise ValueError(f"a scheduled message whose body is not a packed Celery message ({exc})") from None
    if not isinstance(packed, dict) or packed.get(SCHEDULED) != 1 or not isinstance(packed.get(KOMBU_KEY), dict):
        raise ValueError("a scheduled message whose body is not a packed Celery message")
    k = dict(packed[KOMBU_KEY])
    headers = dict(k.get("headers") or {})
    headers.update(id=d.id, root_id=d.id, eta=None)
    k["headers"] = headers
    k["properties"] = dict(k.get("properties") or {}, correlation_id=d.id)
    return dict(bh, **{KOMBU_KEY: k}), packed.get("body") or b""
