"""A Celery result backend on brokerd: ``result_backend = "brokerd://host:7700"``.

Results are stored natively (RESULT_SET): the state, the value (when brokerd can store it) and, for a
failure, ``exc_type``/``exc_message``/``traceback`` in the meta, so brokerd's page and ``TASK <id>`` show
them.  Celery's own meta (children, date_done, the exception as Celery serialized it, ``result_extended``
fields) rides along encoded with Celery's result serializer under ``meta["celery"]`` and is what reads
restore.  ``result_expires`` is the result's ttl.  ``AsyncResult.get()`` waits by long-poll
(RESULT_GET with a wait), never by a polling loop.

Chords are counted in brokerd (CHORD, protocol.md §5.27, raw variant): ``apply_chord`` builds the body's
Celery message without sending it and hands it to brokerd, which publishes it once every member has a
result, with their results in a header that the transport puts in front of the body's args.  There is
no ``chord_unlock`` task.  When a member fails, brokerd stores a ChordError for the body; the worker
whose member failed first runs the body's errbacks (``on_chord_part_return``).  A header given as a
generator is not read ahead: its members are collected as the transport publishes them and the CHORD
follows the last one (``_LazyChords``).  ``add_to_chord`` (a running member grows its chord) is
brokerd's CHORD_ADD.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from celery import states
from celery.backends.base import BaseBackend
from celery.exceptions import ChordError, TimeoutError
from celery.result import ResultSet
from kombu.utils.url import maybe_sanitize_url

from client.celery import message as M

# How many chord ids one process remembers having sent by CHORD (to tell a frozen chord applied again
# from a first apply): a re-application further back than this many chords fires once, as before.
APPLIED_CHORDS_KEPT = 10_000  # ids (about 1 MB)
from client.celery.transport import add_publish_listener, capture_publishes, capturing
from client.errors import ConnectionClosed, ConnectionLost, NotFound
from client.producer import Client

# Chords whose header is a generator, waiting for their members to be published (see _LazyChords): a
# generator that raised midway leaves its entry behind, so only this many are kept, oldest dropped.
MAX_LAZY_CHORDS = 1000  # chords (each holds its body message and the member ids seen so far)
LONG_POLL_MAX = 30.0  # seconds one RESULT_GET may be held by brokerd; a get() longer than that re-asks
# seconds a group join long-polls its first pending member before it looks at all of them again: the
# grain of "completion order" when a later member finishes first (one RESULT_GET per member per slice)
JOIN_SLICE = 1.0
GROUP_PREFIX = "celery-group:"  # a saved GroupResult's record id (group ids are UUIDs like task ids)


class BrokerdBackend(BaseBackend):
    """Celery's ``Backend`` over one shared, thread-safe brokerd ``Client`` per process."""

    supports_native_join = True  # GroupResult.get joins by get_many, as on Redis
    supports_autoexpire = True
    persistent = True

    def __init__(self, app, url=None, **kwargs):
        super().__init__(app, **kwargs)
        self.url = url or app.conf.result_backend or "brokerd://127.0.0.1:7700"
        self.expires = self.prepare_expires(kwargs.get("expires"), type=float)
        self._client = None
        self._pid = None
        self._lock = threading.Lock()
        # ids of the chords this process handed to brokerd's CHORD, oldest first: CHORD is idempotent
        # per id (a retried CHORD must not fire the body twice), so a frozen chord applied again, a
        # new run for Celery, goes by chord_unlock instead.  Bounded: APPLIED_CHORDS_KEPT ids.
        self._applied_chords = {}

    def as_uri(self, include_password=False):
        return self.url if include_password else maybe_sanitize_url(self.url)

    @property
    def client(self) -> Client:
        """Connected on first use, and again after a fork or a lost connection."""
        c = self._client
        if c is not None and self._pid == os.getpid() and not c._closed and c._session.error is None:
            return c
        with self._lock:
            c = self._client
            if c is None or self._pid != os.getpid() or c._closed or c._session.error is not None:
                c = self._client = Client(self.url, name=f"celery-results-{socket.gethostname()}-{os.getpid()}")
                self._pid = os.getpid()
            return c

    def _call(self, fn, *args, **kwargs):
        """One retry on a dropped connection (a restarted brokerd): results must not be lost to it."""
        try:
            return fn(self.client, *args, **kwargs)
        except (ConnectionLost, ConnectionClosed):
            self._client = None
            return fn(self.client, *args, **kwargs)

    # -- storing and reading ------------------------------------------------------------------
    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id
        native = {"celery": self.encode(meta)}
        value = None
        if state in self.EXCEPTION_STATES and isinstance(result, dict):
            native["exc_type"] = result.get("exc_type")
            native["exc_message"] = _exc_text(result.get("exc_message"))
            if traceback:
                native["traceback"] = traceback[-4000:]
        elif _cbor_plain(result):
            value = result
        ttl = self.expires if state in states.READY_STATES else None
        self._call(lambda c: c.store_result(task_id, state, value, native, ttl=ttl))
        return result

    def _get_task_meta_for(self, task_id, wait=None):
        r = self._call(lambda c: c.get_result(task_id, wait=wait))
        return self._meta_from(task_id, r)

    def _meta_from(self, task_id, r):
        if not r or r.get("state") in (None, states.PENDING):
            return {"status": states.PENDING, "result": None, "task_id": task_id}
        native = r.get("meta") or {}
        if isinstance(native, dict) and "celery" in native:
            meta = self.decode_result(native["celery"])
            meta["status"] = r["state"]  # brokerd may have stored the state itself (REVOKED, ChordError)
            return meta
        # stored by brokerd itself (REVOKE, a failed chord's body) or by brokerd's own worker
        state = r["state"]
        if state in self.EXCEPTION_STATES:
            exc = {"exc_type": native.get("exc_type") or "Exception", "exc_message": native.get("exc_message") or "",
                   "exc_module": "celery.exceptions" if native.get("exc_type") in ("ChordError", "TaskRevokedError") else "builtins"}
            return {"status": state, "result": self.exception_to_python(exc), "traceback": native.get("traceback"),
                    "task_id": task_id, "children": []}
        return {"status": state, "result": r.get("result"), "task_id": task_id, "traceback": None, "children": []}

    def wait_for(self, task_id, timeout=None, interval=0.5, no_ack=True, on_interval=None):
        """Long-poll: brokerd holds each RESULT_GET until the result is ready (no sleep loop)."""
        self._ensure_not_eager()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = LONG_POLL_MAX if deadline is None else min(LONG_POLL_MAX, deadline - time.monotonic())
            meta = self._get_task_meta_for(task_id, wait=max(0.0, remaining))
            # After every wait, also the one that brought the result, as Celery's own waiters do
            # (asynchronous.Drainer): ``AsyncResult.get`` passes its parents' check here, so a failed
            # parent (a chord's failed header member) raises its own exception before this result's
            # (the chord body's ChordError), as on Redis.
            if on_interval:
                on_interval()
            if meta["status"] in states.READY_STATES:
                if meta["status"] == states.SUCCESS:
                    self._cache[task_id] = meta
                return meta
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("The operation timed out.")

    def get_many(self, task_ids, timeout=None, interval=0.5, no_ack=True, on_message=None, on_interval=None,
                 max_iterations=None, **kwargs):
        """``(task_id, meta)`` as each result is ready: Celery's native join (``GroupResult.get``
        yields and raises in completion order, as on Redis, without following the members' parents).

        One round reads every id without waiting; then the first id still pending is long-polled
        for up to JOIN_SLICE seconds, and after each such wait one more round picks up whatever else
        finished meanwhile.  No sleep: the waiting is brokerd's."""
        self._ensure_not_eager()
        pending = list(dict.fromkeys(task_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        rounds = 0
        while pending:
            still = []
            for tid in pending:
                cached = self._cache.get(tid)
                meta = cached if cached and cached["status"] in states.READY_STATES else self._get_task_meta_for(tid)
                if meta["status"] in states.READY_STATES:
                    self._cache[tid] = meta
                    if on_message is not None:
                        on_message(meta)
                    yield tid, meta
                else:
                    still.append(tid)
            pending = still
            rounds += 1
            if not pending or (max_iterations is not None and rounds >= max_iterations):
                return
            if on_interval:
                on_interval()
            remaining = JOIN_SLICE if deadline is None else min(JOIN_SLICE, deadline - time.monotonic())
            if remaining <= 0:
                raise TimeoutError(f"Operation timed out ({timeout})")
            meta = self._get_task_meta_for(pending[0], wait=remaining)
            if meta["status"] in states.READY_STATES:
                self._cache[pending[0]] = meta  # yielded by the next round, in its place

    def _forget(self, task_id):
        self._call(lambda c: c.forget_result(task_id))

    # -- groups -------------------------------------------------------------------------------------
    def _save_group(self, group_id, result):
        self._call(lambda c: c.store_result(GROUP_PREFIX + group_id, states.SUCCESS, None,
                                            {"celery": self.encode({"result": result.as_tuple()})}, ttl=self.expires))
        return result

    def _restore_group(self, group_id):
        r = self._call(lambda c: c.get_result(GROUP_PREFIX + group_id))
        if not r or r.get("state") != states.SUCCESS:
            return None
        meta = self.decode((r.get("meta") or {})["celery"])
        from celery.result import result_from_tuple
        meta["result"] = result_from_tuple(meta["result"], self.app)
        return meta

    def _delete_group(self, group_id):
        self._call(lambda c: c.forget_result(GROUP_PREFIX + group_id))

    # -- chords, counted by brokerd -------------------------------------------------------------------
    def apply_chord(self, header_result_args, body, **kwargs):
        from celery.utils.functional import _regen

        lazy = isinstance(header_result_args[1], _regen)
        if lazy:
            # A generator header (chord(gen(), body)): Celery publishes its tasks as it reads the
            # generator (its test_generator checks the first task ran before the last was read), and the
            # results it froze here are not the ids it publishes.  So the members are not read here:
            # they are collected as the transport publishes them (_LazyChords), and the CHORD is
            # declared once set_chord_size's count of them has been published.
            header_result = self.app.GroupResult(header_result_args[0], [])
            members = None
        else:
            header_result = self.app.GroupResult(*header_result_args)
            members = [r.id for r in header_result.results]
            if not members or any(isinstance(r, ResultSet) for r in header_result.results):
                return super().apply_chord(header_result_args, body, **kwargs)  # nested header: chord_unlock
        lead = _one_message_body(body, self.app)  # the task whose message brokerd will hold
        with self._lock:
            again = header_result.id in self._applied_chords
        if again:
            # Celery's test_reapplying_frozen_chord_dispatches_body_again: brokerd would take this for
            # a retry of the first CHORD and never publish the body again; chord_unlock runs it.
            return super().apply_chord(header_result_args, body, **kwargs)
        if capturing() or lead is None:
            # A body that is itself a group or chord (or a chain led by one) is not one message that
            # brokerd can hold: applying it here would apply its own parts at once (an inner chord's
            # header ran with the placeholder and its body fired early: Celery's chain-of-groups
            # tests got 1 for 11).  Such a body goes by Celery's own chord_unlock.
            return super().apply_chord(header_result_args, body, **kwargs)
        with capture_publishes() as sent:
            # An empty list stands in for the results (so Celery's argument check passes); the
            # transport replaces it with brokerd's x-chord-results at delivery.
            body.apply_async(() if lead.immutable else ([],))
        if len(sent) != 1:  # a group body (several messages): Celery's own chord_unlock; nothing was sent
            return super().apply_chord(header_result_args, body, **kwargs)
        queue, raw = sent[0]
        p = M.to_brokerd(raw)
        headers = p["headers"]
        if lead.immutable:  # a .si() task, or a chain led by one: the results are not its arguments
            headers[M.IMMUTABLE] = True
        spec = {"queue": queue, "priority": p["priority"],
                "message": {"body": p["body"], "id": p["id"] or body.id, "headers": headers}}
        if lazy:
            _LAZY.expect(self, header_result.id, spec)
        else:
            self._call(lambda c: c.chord(header_result.id, members, spec))
            # This chord may itself be a member of a waiting generator header: its body (which names
            # that header's group) is what the outer chord waits for.
            _LAZY.published(raw)
        with self._lock:
            self._applied_chords[header_result.id] = True
            while len(self._applied_chords) > APPLIED_CHORDS_KEPT:
                self._applied_chords.pop(next(iter(self._applied_chords)))

    def on_chord_part_return(self, request, state, result, **kwargs):
        """Counting is brokerd's (at RESULT_SET).  Here only a failure's errbacks: run by the worker
        whose member brokerd named in the body's ChordError, so they run once."""
        if state not in states.PROPAGATE_STATES or not request.chord:
            return
        from celery.canvas import maybe_signature
        body = maybe_signature(request.chord, app=self.app)
        body_id = body.id or body.options.get("task_id")
        if not body_id:
            return
        r = self._call(lambda c: c.get_result(body_id))
        msg = ((r or {}).get("meta") or {}).get("exc_message") or ""
        if f"chord member {request.id} failed" in msg:
            # Celery's chord_error_from_stack records "the current exception": it must be called
            # while one is being handled (outside an except block it finds no traceback and raises
            # AttributeError, which killed the whole worker: the harness hang of issue 13).  The
            # text and cause are what Celery's Redis backend gives.
            try:
                raise ChordError(f"Dependency {request.id} raised {result!r}") from (
                    result if isinstance(result, BaseException) else None)
            except ChordError as exc:
                self.chord_error_from_stack(body, exc)

    def set_chord_size(self, group_id, chord_size):
        """Celery calls this just before it publishes a header's last task.  A chord with a list header
        was declared with its members (CHORD); a generator header's chord now knows how many to wait
        for, and is declared as soon as that many have been published."""
        _LAZY.sized(group_id, chord_size)

    def _declare_collected(self, chord_id, members, spec):
        self._call(lambda c: c.chord(chord_id, members, spec))

    def add_to_chord(self, chord_id, result):
        """Celery's ``self.add_to_chord(sig)`` (a running member grows its chord): CHORD_ADD, one
        atomic change in brokerd, so the body waits for the added task too (protocol.md §5.49)."""
        try:
            self._call(lambda c: c.chord_add(chord_id, [result.id]))
        except NotFound as exc:
            # The chord is not counted by brokerd: it went by Celery's chord_unlock (a nested header, a
            # group body, a frozen chord applied again) or it has fired.  Celery's own word for it:
            raise NotImplementedError(f"add_to_chord on brokerd needs a chord counted by brokerd: {exc}") from None

    def ensure_chords_allowed(self):
        pass


class _LazyChords:
    """Chords with a generator header, between ``apply_chord`` and the publish of their last member.

    Each header task's message carries the chord's group id (header ``group``); the transport tells us
    of every message it sends (``add_publish_listener``), and the ones of a waiting group are its
    members, in ``group_index`` order.  A member that is a chain is counted by its last task (the
    result the chord waits for: the chain's embedded ``chain`` list, whose first item is its last
    task).  When ``set_chord_size``'s count has been published, the CHORD is declared with them;
    members that finished meanwhile are counted at once by brokerd (§5.27)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = {}  # group id -> {"backend", "spec", "body_id", "ids": [(index, id)], "size", "thread"}
        # Celery publishes a header from the thread that applies the chord: only publishes from a thread
        # with a waiting chord are looked at (a chain member's body is decoded), the rest cost a look-up.
        self._threads = {}  # thread id -> how many waiting chords it applied

    def expect(self, backend, chord_id, spec):
        with self._lock:
            self._drop(chord_id)
            me = threading.get_ident()
            self._waiting[chord_id] = {"backend": backend, "spec": spec, "body_id": spec["message"]["id"],
                                       "ids": [], "size": None, "thread": me}
            self._threads[me] = self._threads.get(me, 0) + 1
            while len(self._waiting) > MAX_LAZY_CHORDS:
                self._drop(next(iter(self._waiting)))

    def _drop(self, chord_id):
        """Forget a waiting chord (declared, refused, or pushed out); under the lock."""
        entry = self._waiting.pop(chord_id, None)
        if entry is not None:
            n = self._threads.get(entry["thread"], 0) - 1
            if n > 0:
                self._threads[entry["thread"]] = n
            else:
                self._threads.pop(entry["thread"], None)

    def sized(self, chord_id, size):
        with self._lock:
            entry = self._waiting.get(chord_id)
            if entry is None:
                return
            entry["size"] = size
            seen = len(entry["ids"])
            if seen < size - 1:
                # Called before the last member is published: every earlier one should have been seen.
                # One was not (a member that is a chord, or a chain ending in a group, publishes nothing
                # that names this chord), so the count could never be reached: say so, not hang.
                self._drop(chord_id)
                raise NotImplementedError(
                    f"chord {chord_id}: a generator header whose members are not all single tasks or chains "
                    f"of tasks ({seen} of the first {size - 1} were seen) cannot be counted by brokerd; "
                    f"pass the header as a list")
        self._maybe_declare(chord_id)

    def published(self, message):
        if threading.get_ident() not in self._threads:  # the common case: one dict look-up per publish
            return
        headers = message.get("headers") or {}
        gid, member, index = headers.get("group"), headers.get("id"), headers.get("group_index")
        end = _chain_end(message)
        if end is not None:
            # A chain member: its first task carries no group; the chain's last task (the result the
            # chord waits for) does, in its options.
            member, gid = end.get("task_id") or member, gid or end.get("group_id")
            index = end.get("group_index", index)
        with self._lock:
            entry = self._waiting.get(gid) if isinstance(gid, str) else None
            if entry is None or member == entry["body_id"] or not isinstance(member, str) or not member:
                return
            entry["ids"].append((index if isinstance(index, int) else len(entry["ids"]), member))
        self._maybe_declare(gid)

    def _maybe_declare(self, chord_id):
        with self._lock:
            entry = self._waiting.get(chord_id)
            if entry is None or entry["size"] is None or len(entry["ids"]) < entry["size"]:
                return
            self._drop(chord_id)
        members = list(dict.fromkeys(mid for _, mid in sorted(entry["ids"], key=lambda p: p[0])))
        entry["backend"]._declare_collected(chord_id, members, entry["spec"])


def _chain_end(message):
    """The options (task_id, group_id, group_index) of the last task of the chain a task message
    starts, or None (not a chain, or a body this cannot read)."""
    from kombu import serialization

    try:
        _args, _kwargs, embed = serialization.loads(M.body_bytes(message), message.get("content-type"),
                                                    message.get("content-encoding"), accept=None)
        rest = (embed or {}).get("chain") or []  # the tasks still to run, the last one first
        opts = rest[0].get("options") if rest and isinstance(rest[0], dict) else None
        return opts if isinstance(opts, dict) and isinstance(opts.get("task_id"), str) else None
    except Exception:  # a body that is not Celery protocol 2: not a chain member
        return None


_LAZY = _LazyChords()
add_publish_listener(_LAZY.published)


def _one_message_body(body, app):
    """The task whose message applying ``body`` publishes, when that is exactly one message: ``body``
    itself, or the task leading a chain (the rest of a chain rides in that message); else None."""
    from celery.canvas import _chain, chord, group, maybe_signature

    sig = maybe_signature(body, app=app)
    if sig is None or isinstance(sig, (group, chord)):
        return None
    if isinstance(sig, _chain):
        return _one_message_body(sig.tasks[0], app) if sig.tasks else None
    return sig


EXC_TEXT_MAX = 4096  # characters of an exception message kept for brokerd's page (Celery's meta has it whole)


def _exc_text(args) -> str:
    """Celery keeps an exception's ``args`` tuple; people read ``str(exc)``: one arg is itself."""
    if isinstance(args, (list, tuple)):
        text = str(args[0]) if len(args) == 1 else ", ".join(map(str, args))
    else:
        text = str(args)
    return text[:EXC_TEXT_MAX]


def _cbor_plain(value, depth=0) -> bool:
    """Values brokerd stores as they are (for its page); anything else lives only in Celery's meta."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    # Exactly list, tuple and dict: a subclass may not encode as what it holds.  Celery's Signature
    # (a task returning chain(group(...))) is a dict subclass that cbor2 wrote as a map that did not
    # match its entries, so the frame came out misaligned and brokerd read a key where the meta was:
    # "RESULT_SET field 5 (meta) must be dict (got str)".  Such values live in Celery's meta only.
    if type(value) in (list, tuple):
        return all(_cbor_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(isinstance(k, (str, int)) and _cbor_plain(v, depth + 1) for k, v in value.items())
    return False


__all__ = ["BrokerdBackend", "LONG_POLL_MAX"]
