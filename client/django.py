"""Django, first class: what the worker does for a Django project (Celery's Django fixup, our own).

Installed by ``App.init_worker`` when ``DJANGO_SETTINGS_MODULE`` is set and Django is importable:

* at worker start, ``django.setup()`` (the app registry, so task modules can import models), then
  ``autodiscover_tasks()`` with no argument finds ``<app>.tasks`` of every INSTALLED_APPS entry;
* before the pool forks, the parent's database connections are closed, so no child shares a
  socket with another (closing an inherited connection in a child would end the parent's session);
* around every task, ``django.db.close_old_connections()``: a connection past CONN_MAX_AGE or left
  broken by the last task is dropped, as Django does around each web request.

``Task.delay_on_commit`` lives on ``client.app.Task`` (it only needs ``django.db.transaction``).
"""

from __future__ import annotations

import logging

log = logging.getLogger("brokerd.django")


class DjangoFixup:
    def __init__(self, app):
        self.app = app

    def on_worker_init(self) -> None:
        import django
        from django.apps import apps

        if not apps.ready:
            django.setup()
        log.info("Django %s set up (settings %s)", django.get_version(), _settings_module())

    def on_worker_ready(self) -> None:
        """After the task modules are imported, before the pool forks."""
        from django.db import connections

        connections.close_all()

    def on_worker_process_init(self) -> None:
        # The parent closed its connections before forking (on_worker_ready); a child opens its own.
        pass

    def on_task_prerun(self, task=None) -> None:
        if not _eager(task):
            _close_old()

    def on_task_postrun(self, task=None) -> None:
        if not _eager(task):
            _close_old()

    def autodiscover_packages(self) -> list[str]:
        """The INSTALLED_APPS, as app config names (Django's registry must be ready)."""
        import django
        from django.apps import apps

        if not apps.ready:
            django.setup()
        return [config.name for config in apps.get_app_configs()]


def _eager(task) -> bool:
    req = getattr(task, "request", None)
    return bool(getattr(req, "is_eager", False))


def _close_old() -> None:
    from django.db import close_old_connections

    close_old_connections()


def _settings_module() -> str:
    import os

    return os.environ.get("DJANGO_SETTINGS_MODULE", "")
