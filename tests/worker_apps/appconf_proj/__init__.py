# Celery's project layout: the package imports its app so shared_task binds to it.
from .celery import app as celery_app

__all__ = ("celery_app",)
