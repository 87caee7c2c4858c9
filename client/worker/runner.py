"""Running one task: the same code in a pool child process, a pool thread or the trio loop.

``Runner.execute`` takes a job (the tuple ``Job.to_runner`` builds), runs the task's function
and its hooks (``on_success``, ``on_failure``, ``on_retry``, ``after_return``) in the process
that ran it, and returns an outcome (``client.worker.outcome``).  It never raises for anything
user code does: a return value that cannot be stored or repr'd, or an exception whose ``str()``
raises, is a FAILURE, never a dead pool process.  ``check_envelope`` is the main loop's check of
every envelope field a pool will use, so that a hostile envelope fails its own task only.
"""

from __future__ import annotations

import inspect
import logging
import math
import signal
import time
import traceback

import cbor2

from client import signals
from client._current import Request, current_request
from client.canvas import Signature, call_errbacks, plain
from client.result import AsyncResult, ResultSet
from client.envelope import check_encodable, decode_envelope, encode_envelope
from client.signing import SIG_KEY
from client.exceptions import EncodeError, Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from client.wire import DEFAULT_MAX_FRAME
from client.taskopts import ARGSREPR_MAX
from client.worker.limits import TIME_LIMIT_MAX
from client.worker.logs import (LOG_FAILURE, LOG_IGNORED, LOG_REJECTED, LOG_RETRY, LOG_SUCCESS, LOG_TRACEBACK, task_line,
                                trace_log)
from client.worker.outcome import (
    S_ACK,
    S_REJECT,
    S_REQUEUE,
    S_RETRY,
    UNSTORED_SUCCESS,
    args_shown,
    event_repr,
    exc_meta,
    reject_meta,
    safe_str,
    short_repr,
    shown,
    undecodable_outcome,
    unknown_outcome,
)

log = logging.getLogger("brokerd.worker")

# A result must fit in one RESULT_SET frame: brokerd closes the connection on a frame over its max_frame
# (16 MiB by default), which would hand every in-flight task back.  64 KiB is left for the id and meta.
RESULT_MAX_BYTES = DEFAULT_MAX_FRAME - 64 * 1024
# A failure's exception args are stored so the caller can rebuild the exception as itself; they are a
# convenience (the message text is always there), so args that are large or not CBOR are left out.
EXC_ARGS_MAX_BYTES = 64 * 1024


def exc_identity(exc: BaseException) -> dict:
    """What a caller needs to re-raise ``exc`` as its own class (client.result.exception_from):
    ``exc_module``, ``exc_qualname`` and, when CBOR can carry them within EXC_ARGS_MAX_BYTES, ``exc_args``."""
    cls = type(exc)
    out = {"exc_module": cls.__module__, "exc_qualname": cls.__qualname__}
    try:
        args = list(exc.args)
        if len(cbor2.dumps(args)) <= EXC_ARGS_MAX_BYTES:
            out["exc_args"] = args
    except Exception:  # noqa: BLE001 - args CBOR cannot carry: the caller builds it from the message
        pass
    return out


class ExceptionInfo:
    """What ``on_failure`` / ``on_retry`` get as ``einfo`` (Celery's shape)."""

    def __init__(self, exc: BaseException):
        self.exception = exc
        self.type = type(exc)
        self.tb = exc.__traceback__
        self.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def __str__(self):
        return self.traceback

    def __repr__(self):
        return f"<ExceptionInfo: {self.exception!r}>"


def _checkpoint():
    """A Python-level call: a pending async exception (threads pool time limits) fires here."""


async def _await(aw):
    return await aw


def _run_awaitable(aw):
    """An ``async def`` task on a synchronous pool: run it to completion on its own trio loop."""
    import trio  # lazy: only async tasks need it, and importing trio costs start-up time

    return trio.run(_await, aw)


def extended_meta(task, req) -> dict:
    """Celery's ``result_extended``: the task's name, args and kwargs kept with its result.  Arguments a
    result frame cannot carry as they are (a naive datetime, over EXC_ARGS_MAX_BYTES) are kept as text."""
    args, kwargs = req.args, req.kwargs
    try:
        if len(cbor2.dumps([args, kwargs])) > EXC_ARGS_MAX_BYTES:
            raise ValueError("too large")
    except Exception:  # noqa: BLE001 - cbor2 raises several kinds
        args, kwargs = short_repr(tuple(args)), short_repr(kwargs)
    return {"name": task.name, "args": args, "kwargs": kwargs}


# succeeded()'s fast path: values always storable and showable without encoding them to look
_INT_SMALL = 1 << 64
_STR_SMALL = 4096

REPLACED_NESTING_MAX = 1_000_000  # replace() hops a request shows; past that a header is not ours


_EMPTY: dict = {}


def request_for(env, task, queue, priority, attempts, retries, hostname) -> Request:
    """The ``self.request`` of a task about to run (Celery's fields; None where we have no such thing)."""
    opts = env.get("options") or _EMPTY
    hdrs = env.get("headers") or _EMPTY
    hard = opts.get("time_limit", getattr(task, "time_limit", None))
    soft = opts.get("soft_time_limit", getattr(task, "soft_time_limit", None))
    group, chord = env.get("group") or opts.get("group_id"), env.get("chord")
    if hdrs:
        origin = hdrs.get("origin")
        names, stamps = hdrs.get("stamped_headers"), hdrs.get("stamps")
        if type(names) is not list or not all(type(n) is str for n in names) or type(stamps) is not dict:
            names, stamps = [], {}  # none, or not ours: a bad header costs only the stamps
        nesting = hdrs.get("replaced_task_nesting", 0)
        if type(nesting) is not int or not 0 <= nesting <= REPLACED_NESTING_MAX:
            nesting = 0  # a hostile or broken header costs only the field, never the task
    else:  # the common case: no headers at all
        origin, names, stamps, nesting = None, [], _EMPTY, 0
    tid = env["id"]
    properties = {"correlation_id": tid, "reply_to": None, "priority": priority, "delivery_info": {"routing_key": queue}}
    app_id = opts.get("app_id")
    if type(app_id) is str:
        properties["app_id"] = app_id
    # Positional, in the order of Request's parameters (keywords cost ~1.2 us more per task, a quarter of
    # this function): tests/worker/test_pool_child.py checks every field lands where it belongs.
    return Request(
        tid, env["args"], env["kwargs"], retries,  # id, args, kwargs, retries
        # delivery_info
        {"queue": queue, "priority": priority, "redelivered": attempts > 1, "attempts": attempts, "exchange": "",
         "routing_key": queue},
        env.get("eta"), env.get("expires"), env.get("parent_id"),  # eta, expires, parent_id
        env.get("root_id") or tid,  # root_id: a task sent from no other task is its own root (Celery's)
        env.get("headers"), hostname, False, env["task"],  # headers, hostname, is_eager, task
        group if isinstance(group, str) else None, chord, None,  # group, chord, reply_to
        origin if isinstance(origin, str) else None,  # origin
        (hard or None, soft or None),  # time_limit
        env.get("link") or None, env.get("link_error") or None, properties,  # callbacks, errbacks, properties
        nesting, names,  # replaced_task_nesting, stamped_headers
        {n: stamps.get(n) for n in names} if names else None,  # stamps
        opts.get("argsrepr"), opts.get("kwargsrepr"),  # argsrepr, kwargsrepr
    )


def storable(value):
    """What a task returns, as Celery's backends store it: a result object as its ``as_tuple()`` (ids only;
    ``client.result.result_from_tuple`` rebuilds it), a signature as its plain map (``Signature.from_dict``
    rebuilds it), also as the items of a returned list or tuple.  Anything else as it is."""
    if isinstance(value, (AsyncResult, ResultSet)) and hasattr(value, "as_tuple"):
        return plain(value.as_tuple())
    if isinstance(value, Signature):
        return plain(value)
    if type(value) in (list, tuple) and any(isinstance(v, (AsyncResult, ResultSet, Signature)) for v in value):
        return [storable(v) for v in value]
    return value


def _send(sig, **kw) -> None:
    """Send a signal when anyone listens (a receiver that raises is logged by Signal.send)."""
    if sig.receivers:
        sig.send(**kw)


class _Ctx:
    __slots__ = ("task", "req", "opts", "t0", "in_task", "env")


class Runner:
    """Runs jobs and returns outcomes ``(settle, state, value, meta, delay, retries)``.

    A job is ``(seq, payload, msg_id, queue, priority, attempts, headers, soft_limit)`` where
    payload is the envelope (a dict) or the message body (bytes, decoded here).  Hooks
    (``on_success``, ``on_failure``, ``on_retry``, ``after_return``) run here, in the process
    that ran the task, before the outcome goes back to be stored.
    """

    def __init__(self, app, hostname: str, alarm: bool = False):
        self.app = app
        self.hostname = hostname
        self.alarm = alarm  # soft limits by SIGALRM (a child process: only the main thread runs tasks)
        self.in_task = False
        if alarm:
            signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, signum, frame):
        if self.in_task:
            self.in_task = False
            raise SoftTimeLimitExceeded("soft time limit exceeded")

    # -- the pieces, shared by the sync and async paths --
    def begin(self, job):
        """(ctx, None) to run the task, or (None, outcome) when it cannot run."""
        _, payload, msg_id, queue, priority, attempts, headers, _soft = job
        if type(payload) is dict:
            env = payload
        else:
            try:
                env = decode_envelope(payload)
            except ValueError as exc:
                return None, undecodable_outcome(msg_id, queue, exc, self.hostname)
        task = self.app.tasks.get(env["task"])
        if task is None:
            return None, unknown_outcome(env, self.app, self.hostname)
        hdrs = headers or {}
        retries = hdrs.get("retries")
        if type(retries) is not int:
            retries = env.get("retries") or 0
        req = request_for(env, task, queue, priority, attempts, retries, self.hostname)
        # Celery's names: what a task's errbacks and ``self.replace`` read (client/canvas.py)
        req.chain = env.get("chain")
        ctx = _Ctx()
        ctx.env = env
        ctx.task = task
        ctx.req = req
        ctx.opts = env.get("options") or {}  # per-call options (check_envelope checked their types)
        ctx.t0 = time.perf_counter()
        if self.app.fixups:
            self.app.fixup_event("on_task_prerun", task)  # Django: close_old_connections
        return ctx, None

    def execute(self, job, slot=None):
        """Run one job here; return its outcome.  ``slot`` (threads pool) carries ``in_task``."""
        ctx, outcome = self.begin(job)
        if ctx is None:
            return outcome
        req = ctx.req
        soft = job[7]
        token = current_request.set(req)
        try:
            if signals.task_prerun.receivers:  # (tested here: _send's keywords cost a dict per task)
                _send(signals.task_prerun, sender=ctx.task, task_id=req.id, task=ctx.task, args=req.args,
                      kwargs=req.kwargs)
            try:
                if slot is not None:
                    slot.in_task = True
                elif self.alarm:
                    self.in_task = True
                    if soft:
                        signal.setitimer(signal.ITIMER_REAL, soft)
                try:
                    retval = ctx.task(*req.args, **req.kwargs)
                    if retval is not None and inspect.isawaitable(retval):
                        retval = _run_awaitable(retval)
                finally:
                    if slot is not None:
                        with slot.lock:
                            slot.in_task = False
                        try:
                            _checkpoint()
                        except (SoftTimeLimitExceeded, TimeLimitExceeded):
                            pass  # the limit hit just as the task ended: keep its real outcome
                    elif self.alarm:
                        self.in_task = False
                        if soft:
                            signal.setitimer(signal.ITIMER_REAL, 0)
            except BaseException as exc:  # noqa: BLE001 - every failure of user code is an outcome
                return self._postrun(ctx, self._outcome(self.failed, ctx, exc), exc)
            return self._postrun(ctx, self._outcome(self.succeeded, ctx, retval), retval)
        finally:
            current_request.reset(token)

    async def execute_async(self, job, limit=None, hard=None):
        """Trio pool: await an ``async def`` task under a cancel scope for its time limits."""
        import trio  # lazy: only the trio pool comes here; the other pools never load trio

        ctx, outcome = self.begin(job)
        if ctx is None:
            return outcome
        req = ctx.req
        token = current_request.set(req)
        try:
            _send(signals.task_prerun, sender=ctx.task, task_id=req.id, task=ctx.task, args=req.args, kwargs=req.kwargs)
            deadline = trio.current_time() + limit if limit else float("inf")
            try:
                with trio.CancelScope(deadline=deadline) as cs:
                    retval = await ctx.task(*req.args, **req.kwargs)
                if cs.cancelled_caught:
                    if hard and (not job[7] or hard <= job[7]):
                        raise TimeLimitExceeded(f"hard time limit ({hard:g}s) exceeded")
                    raise SoftTimeLimitExceeded(f"soft time limit ({limit:g}s) exceeded")
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, trio.Cancelled):
                    raise  # the worker itself is being cancelled (cold stop)
                return self._postrun(ctx, self._outcome(self.failed, ctx, exc), exc)
            return self._postrun(ctx, self._outcome(self.succeeded, ctx, retval), retval)
        finally:
            current_request.reset(token)

    def _postrun(self, ctx, outcome, retval):
        req = ctx.req
        if signals.task_postrun.receivers:
            _send(signals.task_postrun, sender=ctx.task, task_id=req.id, task=ctx.task, args=req.args,
                  kwargs=req.kwargs, retval=retval, state=outcome[1])
        return outcome

    def _outcome(self, settle, ctx, value):
        """``succeeded``/``failed``, but never raising: whatever a task returned or raised, its process
        (a pool child, a pool thread, the trio loop) must live on and the task must get a result."""
        try:
            if self.app.fixups:
                self.app.fixup_event("on_task_postrun", ctx.task)
            return settle(ctx, value)
        except Exception as exc:  # noqa: BLE001
            log.error("Task %s[%s]: its outcome could not be recorded: %s: %s", ctx.task.name, ctx.req.id,
                      type(exc).__name__, safe_str(exc))
            err = EncodeError(f"the outcome of {ctx.task.name} could not be recorded: {type(exc).__name__}: "
                              f"{safe_str(exc)}")
            return (S_ACK, "FAILURE", None, exc_meta(err, self.hostname, ""), None, None)

    def _hook(self, ctx, name, *args):
        try:
            getattr(ctx.task, name)(*args)
        except Exception:
            log.exception("Task %s[%s]: %s hook raised", ctx.task.name, ctx.req.id, name)

    def succeeded(self, ctx, retval):
        task, req = ctx.task, ctx.req
        why = None
        tv = type(retval)
        if retval is None or tv is bool or tv is float or (tv is int and -_INT_SMALL < retval < _INT_SMALL) or (
                tv is str and len(retval) <= _STR_SMALL):
            # the common case, fast: always storable, and repr() of it cannot raise
            shown = short_repr(retval)
        else:
            retval = storable(retval)
            # The value must be storable (CBOR, within one frame) and showable (repr, for the log line and
            # the task-succeeded event): an int over 4,300 digits, a cyclic list or a raising __repr__ used
            # to kill the pool process and be retried until dead-lettered, its result PENDING for ever.
            # The repr is the one the default (INFO) log line makes anyway.
            try:
                size = len(cbor2.dumps(retval))
            except Exception as exc:  # noqa: BLE001 - cbor2 raises several kinds; RecursionError too
                why = safe_str(exc)
            else:
                if size > RESULT_MAX_BYTES:
                    why = f"it is {size} bytes encoded, over the {RESULT_MAX_BYTES} bytes a result may take"
                else:
                    try:
                        shown = short_repr(retval)
                    except Exception as exc:  # noqa: BLE001
                        why = f"repr() of it raised {type(exc).__name__}: {safe_str(exc)}"
        if why is not None:
            err = EncodeError(
                f"the return value of {task.name} ({type(retval).__name__}) cannot be stored as a result: {why}"
            )
            return self.failed(ctx, err)
        runtime = time.perf_counter() - ctx.t0
        self._hook(ctx, "on_success", retval, req.id, req.args, req.kwargs)
        self._hook(ctx, "after_return", "SUCCESS", retval, req.id, req.args, req.kwargs, None)
        if trace_log.isEnabledFor(logging.INFO):  # (here too: the keywords cost a dict per task)
            self._line(ctx, logging.INFO, LOG_SUCCESS, runtime=runtime, return_value=shown)
        if signals.task_success.receivers:
            _send(signals.task_success, sender=task, result=retval)
        if self._ignores_result(ctx):
            return (S_ACK, None, retval, UNSTORED_SUCCESS, None, None)  # the value: for its chain and links only
        # Tasks this one sent (AsyncResult.children): kept in the result's meta, with Celery's
        # result_extended the task's name, args and kwargs too (AsyncResult.name/args/kwargs).
        meta = {"children": [c for c in req.children if isinstance(c, str)]} if req.children else None
        if self.app.conf.get("result_extended"):
            meta = {**(meta or {}), **extended_meta(task, req)}
        return (S_ACK, "SUCCESS", retval, meta, None, None)

    def failed(self, ctx, exc):
        task, req = ctx.task, ctx.req
        if isinstance(exc, Retry):
            return self._retry(ctx, exc, exc.exc, exc.when)
        if isinstance(exc, Ignore):
            self._line(ctx, logging.INFO, LOG_IGNORED, description="ignored")
            return (S_ACK, None, None, None, None, None)
        if isinstance(exc, Reject):
            self._line(ctx, logging.INFO, LOG_REJECTED, requeue=exc.requeue, exc=safe_str(exc))
            if exc.requeue:
                return (S_REQUEUE, None, None, None, None, None)
            # Celery 5.7 (#4222): a task that rejects its message for good is a FAILURE (the Reject itself,
            # re-raised by get(); task_failure sent; its errbacks called) and the message is dead-lettered
            meta = reject_meta(exc, self.hostname)
            meta.update(exc_identity(exc))
            if req.errbacks:
                call_errbacks(self.app, req, exc, None)
            _send(signals.task_failure, sender=task, task_id=req.id, exception=exc, args=req.args, kwargs=req.kwargs,
                  traceback=None, einfo=None)
            return (S_REJECT, "FAILURE", None, meta, None, None)
        auto = task.autoretry_for
        if auto and isinstance(exc, tuple(auto)) and not (
            task.dont_autoretry_for and isinstance(exc, tuple(task.dont_autoretry_for))
        ):
            kw = dict(task.retry_kwargs or {})
            if task.retry_backoff:
                try:
                    kw["countdown"] = task.retry_delay(req.retries)
                except OverflowError:  # 2 ** retries past a float (a forged "retries" header): the cap
                    kw["countdown"] = float(task.retry_backoff_max)
            kw.pop("exc", None)
            try:
                task.retry(exc=exc, **kw)
            except Retry as r:
                return self._retry(ctx, r, exc, r.when)
            except BaseException as past_max:  # noqa: BLE001 - max_retries reached: the last exception
                exc = past_max
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        einfo = ExceptionInfo(exc)
        self._hook(ctx, "on_failure", exc, req.id, req.args, req.kwargs, einfo)
        self._hook(ctx, "after_return", "FAILURE", exc, req.id, req.args, req.kwargs, einfo)
        if req.errbacks:
            call_errbacks(self.app, req, exc, tb)  # errback(request, exc, traceback), here as in Celery
        if isinstance(exc, SoftTimeLimitExceeded):
            log.warning("Soft time limit exceeded for %s[%s]", task.name, req.id)
        if task.throws and isinstance(exc, task.throws):  # Celery's `throws`
            self._line(ctx, logging.INFO, LOG_FAILURE, description="raised expected", exc=event_repr(exc, ARGSREPR_MAX))
        else:
            self._line(ctx, logging.ERROR, LOG_FAILURE, description="raised unexpected",
                       exc=event_repr(exc, ARGSREPR_MAX))
        self._line(ctx, logging.DEBUG, LOG_TRACEBACK, traceback=tb)
        _send(signals.task_failure, sender=task, task_id=req.id, exception=exc, args=req.args, kwargs=req.kwargs,
              traceback=exc.__traceback__, einfo=einfo)
        meta = exc_meta(exc, self.hostname, tb)
        meta.update(exc_identity(exc))
        if self.app.conf.get("result_extended"):
            meta.update(extended_meta(task, req))
        return (S_ACK, "FAILURE", None, meta, None, None)

    def _ignores_result(self, ctx) -> bool:
        """The call's ignore_result=, else the task's, else the app's task_ignore_result."""
        ignore = ctx.opts.get("ignore_result")
        if ignore is None:
            ignore = ctx.task.ignore_result
        if ignore is None:
            ignore = self.app.conf.get("task_ignore_result", False)
        return bool(ignore)

    @staticmethod
    def _line(ctx, level, fmt, **values):
        """One of this task's lines on Celery's trace logger (client.worker.logs), its arguments shown as the
        call's argsrepr/kwargsrepr when given."""
        if trace_log.isEnabledFor(level):
            req = ctx.req
            task_line(trace_log, level, fmt, ctx.task.name, req.id, args_shown(req.args, req.kwargs, ctx.opts),
                      **values)

    def _retry(self, ctx, r, exc, when):
        task, req = ctx.task, ctx.req
        body = None
        new = getattr(r, "args_kwargs", None)  # retry(args=, kwargs=): the message is sent again, changed
        if new is not None:
            env = {k: v for k, v in ctx.env.items() if k != SIG_KEY}
            env["args"], env["kwargs"] = list(new[0]), dict(new[1])
            signer = self.app.signer
            try:
                check_encodable(task.name, env["args"], env["kwargs"])
                if signer is not None:
                    signer.sign(env)
                elif SIG_KEY in ctx.env:
                    raise EncodeError(f"retry(args=, kwargs=) of {task.name}: the task came signed and this "
                                      f"worker has no task_signing_key to sign it again with new arguments")
                body = encode_envelope(env)
            except EncodeError as err:
                return self.failed(ctx, err)
        if when is None:
            when = float(task.default_retry_delay)
        shown = exc if exc is not None else r
        einfo = ExceptionInfo(shown)
        self._hook(ctx, "on_retry", shown, req.id, req.args, req.kwargs, einfo)
        self._hook(ctx, "after_return", "RETRY", shown, req.id, req.args, req.kwargs, einfo)
        _send(signals.task_retry, sender=task, request=req, reason=shown, einfo=einfo)
        self._line(ctx, logging.INFO, LOG_RETRY, when=when, exc=event_repr(shown, ARGSREPR_MAX))
        # A task whose result is ignored stores no RETRY either (Celery's: nobody waits for it, and a
        # RETRY left behind would be its state for ever, as the SUCCESS after it is not stored); unless
        # store_errors_even_if_ignored
        state = None if self._ignores_result(ctx) and not task.store_errors_even_if_ignored else "RETRY"
        # the value slot of a retry carries the message to send instead, when the arguments changed
        return (S_RETRY, state, body, exc_meta(shown, self.hostname, einfo.traceback), max(0.0, float(when)),
                req.retries + 1)


def _bad_number(value, *, nonneg=False, upper=None) -> bool:
    """True unless ``value`` is an int or float (not bool), finite, within range."""
    if type(value) not in (int, float):
        return True
    try:
        f = float(value)
    except OverflowError:  # a bignum
        return True
    if not math.isfinite(f) or (nonneg and f < 0) or (upper is not None and f > upper):
        return True
    return False


def check_envelope(env: dict) -> None:
    """Raise ValueError naming the first field of a decoded envelope (protocol.md §8.1) that the worker
    cannot use.  ``decode_envelope`` has checked ``task``, ``id``, ``args``, ``kwargs`` and ``v``; this
    checks the rest, so that nothing later (deadline arithmetic, ``time.time() >= expires``, setitimer,
    retry counting) can raise in the main loop on a hostile or buggy producer's envelope."""
    tid = env["id"]
    if not 0 < len(tid) <= 255:
        raise ValueError(f"task envelope field 'id' must be 1 to 255 characters (got {len(tid)})")
    for k in env["kwargs"]:
        if type(k) is not str:
            raise ValueError(f"task envelope field 'kwargs' must have text keys (got the key {shown(k)})")
    retries = env.get("retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        raise ValueError(f"task envelope field 'retries' must be a whole number >= 0 or null (got {shown(retries)})")
    for key in ("eta", "expires"):
        value = env.get(key)
        if value is not None and _bad_number(value):
            raise ValueError(f"task envelope field {key!r} must be a Unix time in seconds (a finite number) or null "
                             f"(got {shown(value)})")
    for key in ("parent_id", "root_id"):
        value = env.get(key)
        if value is not None and type(value) is not str:
            raise ValueError(f"task envelope field {key!r} must be text or null (got {shown(value)})")
    value = env.get("headers")
    if value is not None and type(value) is not dict:
        raise ValueError(f"task envelope field 'headers' must be a map or null (got {shown(value)})")
    for key in ("link", "link_error", "chain"):
        value = env.get(key)
        if value is not None and type(value) is not list:
            raise ValueError(f"task envelope field {key!r} must be an array of signatures or null (got {shown(value)})")
    opts = env.get("options")
    if opts is None:
        return
    if type(opts) is not dict:
        raise ValueError(f"task envelope field 'options' must be a map or null (got {shown(opts)})")
    value = opts.get("ignore_result")
    if value is not None and type(value) is not bool:
        raise ValueError(f"task envelope field 'options.ignore_result' must be true, false or null (got {shown(value)})")
    for key in ("shadow", "app_id", "group_id", "argsrepr", "kwargsrepr"):
        value = opts.get(key)
        if value is not None and type(value) is not str:
            raise ValueError(f"task envelope field 'options.{key}' must be text or null (got {shown(value)})")
    value = opts.get("rate_limit")
    if value is not None and _bad_number(value, nonneg=True):
        raise ValueError(f"task envelope field 'options.rate_limit' must be tasks per second (a number >= 0) or null "
                         f"(got {shown(value)})")
    for key in ("time_limit", "soft_time_limit"):
        value = opts.get(key)
        if value is not None and _bad_number(value, nonneg=True, upper=TIME_LIMIT_MAX):
            raise ValueError(f"task envelope field 'options.{key}' must be a number of seconds from 0 to "
                             f"{TIME_LIMIT_MAX:g} (0 or null: no limit) (got {shown(value)})")
