"""The mapping layer's helpers: stand-ins for names our SDK lacks, and SDK-first lookups."""

from __future__ import annotations

import importlib
import os

# Names the SDK lacked when a task module was bound (shared_task registration errors), for the harness's report
UNBOUND: dict[str, str] = {}


def missing(qualname: str):
    """A class that can be imported (and subclassed) but not used: using it says what is missing."""

    def fail(*_a, **_k):
        raise NotImplementedError(f"celery.{qualname}: no counterpart in brokerd's SDK")

    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": fail, "__call__": fail,
                                                   "__init_subclass__": classmethod(lambda cls, **k: None)})


def sdk(module: str, name: str, qualname: str | None = None):
    """``client.<module>.<name>`` when the SDK has it, else a stand-in named after Celery's name."""
    try:
        return getattr(importlib.import_module(f"client.{module}"), name)
    except (ImportError, AttributeError):
        return missing(qualname or name)


def broker_address(url: str | None) -> str | None:
    """Celery's TEST_BROKER (``brokerd://host:port``) as our SDK takes it (it takes the URL as is)."""
    return url or os.environ.get("TEST_BROKER")


def missing_exception(qualname: str):
    """An exception class our SDK never raises, for ``except celery.X:`` clauses (a plain stand-in there is
    a TypeError: only exception classes may be caught); making one says what is missing."""

    def fail(*_a, **_k):
        raise NotImplementedError(f"celery.{qualname}: no counterpart in brokerd's SDK")

    return type(qualname.rsplit(".", 1)[-1], (Exception,), {"__init__": fail})
