"""The task layer's exceptions, under the names Celery gives them.

Importable from here and from ``client.app`` (where the README shows them).
This module imports nothing from the rest of the task layer, so the envelope,
the results and the worker can all raise and catch these without a cycle.
"""

from __future__ import annotations

import builtins
import keyword


class TaskError(Exception):
    """Base of the task layer's errors."""


class Retry(TaskError):
    """Raised by ``Task.retry``: the worker nacks the task with a delay (held by brokerd)."""

    def __init__(self, message=None, exc=None, when=None):
        super().__init__(message or "retry")
        self.exc = exc
        self.when = when  # seconds from now


class MaxRetriesExceededError(TaskError):
    pass


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a task when its soft time limit passes."""


class TimeLimitExceeded(TaskError):
    """A task ran past its hard time limit and its process was killed."""


class Reject(TaskError):
    """Raise to refuse a task: ``requeue=False`` sends it to the dead-letter queue."""

    def __init__(self, reason=None, requeue=False):
        super().__init__(reason or "rejected")
        self.requeue = requeue


class Ignore(TaskError):
    """Raise to end a task without storing any result."""


class NotRegistered(TaskError, KeyError):
    pass


class TaskRevokedError(TaskError):
    pass


class EncodeError(TaskError, TypeError):
    """An argument or result that CBOR cannot carry."""


class WorkerLostError(TaskError):
    """The process running the task died (a crash, ``os.abort()``, the OOM killer) more times than the
    task's ``max_retries`` allow (Celery's name)."""


class RemoteError(TaskError):
    """A task failed with an exception that is not a Python builtin.

    ``exc_type`` and ``exc_message`` name the original; ``traceback`` is its text.
    """

    def __init__(self, exc_type: str, exc_message: str, traceback: str | None = None):
        super().__init__(f"{exc_type}: {exc_message}")
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback


class ImproperlyConfigured(TaskError):
    """Celery's: a canvas or setting that cannot work as given (e.g. ``self.replace(chain())``)."""


class ChordError(RemoteError):
    """A chord's body never ran because a header member failed (protocol.md §5.27: brokerd stores it for the
    body's id).  ``AsyncResult.get()`` raises the failed member's own exception instead, as Celery does, with
    this one as its ``__cause__``; this is raised when that member's failure cannot be read."""


class ChainError(RemoteError):
    """A chain step never ran because an earlier step failed (protocol.md §8: the worker stores it for every
    later id).  ``get()`` raises the failed step's own exception instead, with this one as its ``__cause__``."""


# Remote exception types seen by this process, each with its RemoteError subclass.  Bounded, because the
# names come from results anyone may store: past this many, a new name gets plain RemoteError.
REMOTE_CLASSES_MAX = 1000
_remote_classes: dict[tuple[str, str], type] = {}
REMOTE_NAME_MAX = 200  # characters of a remote type or module name used for a class; longer ones are cut


def remote_error_class(exc_type: str, exc_module: str | None = None) -> type:
    """A ``RemoteError`` subclass named after a remote exception type that cannot be imported here, so
    that ``type(e).__name__`` and the traceback show the real name while ``except RemoteError`` still
    catches it.  A name that is not a Python identifier gets ``RemoteError`` itself."""
    name = exc_type.rpartition(".")[2][:REMOTE_NAME_MAX] if isinstance(exc_type, str) else ""
    if not name.isidentifier() or keyword.iskeyword(name):
        return RemoteError
    module = exc_module[:REMOTE_NAME_MAX] if isinstance(exc_module, str) and exc_module else __name__
    key = (module, name)
    cls = _remote_classes.get(key)
    if cls is None:
        if len(_remote_classes) >= REMOTE_CLASSES_MAX:
            return RemoteError
        cls = type(name, (RemoteError,), {"__module__": module, "__qualname__": name,
                                          "__doc__": f"{module}.{name}, raised by a task elsewhere."})
        _remote_classes[key] = cls
    return cls


class TimeoutError(builtins.TimeoutError, TaskError):  # noqa: A001 - Celery's name
    """``AsyncResult.get`` waited longer than its timeout."""


# The task layer's own exceptions that a stored FAILURE may name and that a
# client rebuilds as themselves (anything else non-builtin becomes RemoteError).
LOCAL_FAILURES = (SoftTimeLimitExceeded, TimeLimitExceeded, MaxRetriesExceededError, NotRegistered, EncodeError,
                  WorkerLostError)
