from client.exceptions import *  # noqa: F401,F403  (every exception the SDK has, under Celery's names)
from client.exceptions import TimeoutError  # noqa: F401

from celery._compat import sdk

ChordError = sdk("exceptions", "ChordError", "exceptions.ChordError")
ImproperlyConfigured = sdk("exceptions", "ImproperlyConfigured", "exceptions.ImproperlyConfigured")
