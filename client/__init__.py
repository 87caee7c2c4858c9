"""The brokerd client SDK.

    from client import Client, AsyncClient

Re-exports are lazy (module ``__getattr__``, PEP 562): ``import client`` and
``import client.wire`` load no trio, no asyncio and no sockets; a name is
imported from its module the first time it is used.

* ``Client`` (``client.producer``): blocking, thread-safe.
* ``AsyncClient`` (``client.async_client``): trio or asyncio.
* ``Delivery`` (``client.session``): what a consumer receives.
* the errors of ``client.errors``.
* the task layer: ``App``, ``Task`` (``client.app``), ``AsyncResult``
  (``client.result``), ``Signature``/``signature`` (``client.canvas``),
  ``Worker`` (``client.worker``), ``shared_task`` (``client.app``: tasks of reusable
  modules, such as Django apps, bound to the current app).
"""

from __future__ import annotations

_EXPORTS = {
    "Client": "client.producer",
    "Consumer": "client.producer",
    "AsyncClient": "client.async_client",
    "AsyncConsumer": "client.async_client",
    "Delivery": "client.session",
    "Session": "client.session",
    "BrokerdError": "client.errors",
    "ProtocolError": "client.errors",
    "LocalProtocolError": "client.errors",
    "RemoteProtocolError": "client.errors",
    "Disconnected": "client.errors",
    "ConnectionClosed": "client.errors",
    "ConnectionLost": "client.errors",
    "Timeout": "client.errors",
    "RequestRefused": "client.errors",
    "BadRequest": "client.errors",
    "NotFound": "client.errors",
    "PreconditionFailed": "client.errors",
    "QueueFull": "client.errors",
    "MessageTooLarge": "client.errors",
    "StaleDelivery": "client.errors",
    "LogFailed": "client.errors",
    "MemoryLimit": "client.errors",
    "AccessRefused": "client.errors",
    "AuthFailed": "client.errors",
    "BrokerInternalError": "client.errors",
    "PublishError": "client.errors",
    "error_from_wire": "client.errors",
    # the task layer
    "App": "client.app",
    "AsyncResult": "client.result",
    "Task": "client.app",
    "shared_task": "client.app",  # Celery's `from celery import shared_task`
    "Signature": "client.canvas",
    "signature": "client.canvas",
    "Worker": "client.worker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
