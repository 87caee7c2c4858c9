"""``app.conf``: settings under Celery's names, read lazily from where the project keeps them.

A setting is looked up, each time it is read, in this order:

1. values set on the app itself (``App(..., task_routes=...)``, ``app.conf.x = ...``, ``conf.update``);
2. the objects given to ``config_from_object``, newest first.  A ``"module:attr"`` or ``"module"``
   string is imported on the first read, not at the call, and the object is read on *every* read:
   ``config_from_object("django.conf:settings", namespace="CELERY")`` then works while Django is
   still importing the settings module (the call happens inside it), and a later change such as
   ``CELERY_TASK_ALWAYS_EAGER = True`` in a test, or Django's ``override_settings``, is seen;
3. brokerd's defaults (``client.app.DEFAULTS``), where they differ from Celery's on purpose;
4. Celery's default for every other setting Celery documents (``CELERY_DEFAULTS`` below), so code
   that reads ``app.conf.worker_send_task_events`` works as under Celery.

Reading a setting that is none of these raises AttributeError naming it.
"""

from __future__ import annotations

import copy
import importlib

_MISSING = object()

# Celery 5.7's defaults for the settings a project is likely to read, by their lowercase names
# (celery/app/defaults.py).  brokerd's own defaults (client.app.DEFAULTS) win where both exist.
# Many have no effect on brokerd (there is no result backend, no exchange, no pickle); they are
# here so that reading them returns what Celery returns instead of raising.
CELERY_DEFAULTS = {
    "accept_content": ["json"],
    "enable_utc": True,
    "imports": (),
    "include": (),
    "timezone": None,
    "broker_connection_retry": True,
    "broker_connection_retry_on_startup": None,
    "broker_connection_max_retries": 100,
    "broker_connection_timeout": 4,
    "broker_heartbeat": 120,
    "broker_pool_limit": 10,
    "broker_pool_acquire_timeout": None,  # Celery 5.7; we keep one connection per app, no pool to wait for
    "broker_transport_options": {},
    "broker_read_url": None,
    "broker_write_url": None,
    "result_backend": None,
    "result_serializer": "json",
    "result_accept_content": None,
    "result_compression": None,
    "result_extended": False,
    "result_persistent": None,
    "result_chord_join_timeout": 3.0,
    "result_backend_transport_options": {},
    "task_serializer": "json",
    "task_protocol": 2,  # Celery's message protocol; ours is protocol.md §8 whatever this says
    "task_compression": None,
    "task_create_missing_queues": True,
    "task_default_exchange": None,
    "task_default_exchange_type": "direct",
    "task_default_routing_key": None,
    "task_default_rate_limit": None,
    "task_default_delivery_mode": 2,
    "task_queues": None,
    "task_annotations": None,
    "task_inherit_parent_priority": False,
    "task_publish_retry": True,
    "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0, "interval_max": 1, "interval_step": 0.2},
    "task_store_errors_even_if_ignored": False,
    "task_store_eager_result": False,
    "task_eager_propagates": False,
    "task_reject_on_worker_lost": None,
    "task_acks_on_failure_or_timeout": True,
    "task_send_sent_event": False,
    "task_remote_tracebacks": False,
    "task_allow_error_cb_on_chord_header": False,
    "worker_agent": None,
    "worker_autoscaler": "celery.worker.autoscale:Autoscaler",
    "worker_cancel_long_running_tasks_on_connection_loss": False,
    "worker_direct": False,
    "worker_disable_rate_limits": False,
    "worker_enable_remote_control": True,
    "worker_hijack_root_logger": True,
    "worker_log_color": None,
    "worker_log_format": "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
    "worker_task_log_format": "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s",
    "worker_lost_wait": 10.0,
    "worker_max_memory_per_child": None,
    "worker_max_tasks_per_child": None,
    "worker_pool": "prefork",
    "worker_pool_restarts": False,
    "worker_redirect_stdouts": True,
    "worker_redirect_stdouts_level": "WARNING",
    "worker_send_task_events": False,
    "worker_state_db": None,
    "worker_timer_precision": 1.0,
    "worker_deduplicate_successful_tasks": False,
    "event_queue_expires": 60.0,
    "event_queue_ttl": 5.0,
    "event_serializer": "json",
    "beat_max_loop_interval": 0,
    "beat_schedule_filename": "celerybeat-schedule",
    "beat_scheduler": "celery.beat:PersistentScheduler",
    "beat_sync_every": 0,
    "beat_cron_starting_deadline": None,
    "security_certificate": None,
    "security_key": None,
    "security_cert_store": None,
    "security_digest": "sha256",
    "control_queue_ttl": 300.0,
    "control_queue_expires": 10.0,
    "database_url": None,
    "cache_backend": None,
}


def resolve(source):
    """A config_from_object argument → the object to read settings from."""
    if not isinstance(source, str):
        return source
    module_name, sep, attr = source.partition(":")
    obj = importlib.import_module(module_name)
    if sep:
        for part in attr.split("."):
            obj = getattr(obj, part)
    return obj


class _Source:
    """One config_from_object argument, imported on first read and read on every read."""

    def __init__(self, obj, namespace: str | None):
        self.spec = obj
        self.obj = None if isinstance(obj, str) else obj
        self.prefix = f"{namespace}_" if namespace else ""

    def get(self, key: str):
        if self.obj is None:
            self.obj = resolve(self.spec)
        if self.prefix:
            name = self.prefix + key.upper()  # CELERY_TASK_ROUTES for task_routes
        else:
            name = key  # a plain module or object keeps Celery's lowercase names
        try:
            return getattr(self.obj, name)
        except AttributeError:
            return _MISSING

    def keys(self) -> list[str]:
        if self.obj is None:
            self.obj = resolve(self.spec)
        out = []
        for name in dir(self.obj):
            if name.startswith("_"):
                continue
            if self.prefix:
                if name.startswith(self.prefix):
                    out.append(name[len(self.prefix):].lower())
            elif name.islower():
                value = getattr(self.obj, name, None)
                if not callable(value) and type(value).__name__ != "module":
                    out.append(name)
        return out


class Conf(dict):
    """Settings: a dict of the values set on the app, with attribute access, that falls back to
    the config_from_object sources, brokerd's defaults and Celery's (see the module docstring)."""

    def __init__(self, defaults: dict | None = None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_defaults", dict(defaults or {}))
        object.__setattr__(self, "_sources", [])

    # -- sources --
    def add_source(self, obj, namespace: str | None = None) -> None:
        self._sources.insert(0, _Source(obj, namespace))  # the newest source wins, as in Celery

    def _lookup(self, key):
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        if type(key) is str:
            for src in self._sources:
                value = src.get(key)
                if value is not _MISSING:
                    return value
        return _MISSING

    def _default(self, key):
        for table in (self._defaults, CELERY_DEFAULTS):
            if key in table:
                value = table[key]
                if isinstance(value, (dict, list)):
                    # a private copy, so app.conf.beat_schedule["x"] = ... changes this app only.  It is
                    # kept (so that change lasts) only when there is no config source: with one, keeping
                    # it would hide a value the source gets later (Django's override_settings).
                    value = copy.deepcopy(value)
                    if not self._sources:
                        dict.__setitem__(self, key, value)
                return value
        return _MISSING

    # -- the dict interface, through the fallbacks --
    def __missing__(self, key):
        value = self._lookup(key)
        if value is _MISSING:
            value = self._default(key)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key):
        return self._lookup(key) is not _MISSING or key in self._defaults or key in CELERY_DEFAULTS

    def get(self, key, default=None):
        """The set or configured value; else brokerd's default; else ``default`` when given; else Celery's."""
        # (_lookup and _default written out for the common cases: the worker asks per task)
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        if self._sources:
            value = self._lookup(key)
            if value is not _MISSING:
                return value
        value = self._defaults.get(key, _MISSING)
        if value is not _MISSING:
            return self._default(key) if isinstance(value, (dict, list)) else value
        if default is not None:
            return default
        value = CELERY_DEFAULTS.get(key, _MISSING)
        if value is _MISSING:
            return None
        if isinstance(value, (dict, list)):
            return self._default(key)  # a private copy (see _default)
        return value

    def __getattr__(self, key):
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(
                f"no setting {key!r}: it is not set on the app, not in its config_from_object sources, and not "
                f"one of Celery's or brokerd's settings (check the spelling)") from None

    def __setattr__(self, key, value):
        self[key] = value

    def setdefault(self, key, default=None):
        value = self.get(key, _MISSING)
        if value is _MISSING or value is None:
            self[key] = default
            return default
        return value

    def table(self) -> dict:
        """Every setting with a value: the defaults, then the sources, then the app's own."""
        out = dict(CELERY_DEFAULTS)
        out.update(self._defaults)
        for src in reversed(self._sources):
            for key in src.keys():
                value = src.get(key)
                if value is not _MISSING:
                    out[key] = value
        out.update(dict(self.items()))
        return out
