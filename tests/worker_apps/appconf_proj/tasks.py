"""Tasks of a reusable module: no import of the app, only ``shared_task`` (as in a Django app)."""

from client import shared_task

from .celery import CONTEXT


@shared_task
def add(x, y):
    return x + y


@shared_task
def context():
    return CONTEXT.get()


@shared_task(throws=(KeyError,))
def expected():
    raise KeyError("an expected miss")


@shared_task
def unexpected():
    raise ValueError("an unexpected fault")


@shared_task(rate_limit="10/m")
def limited():
    return "limited"


@shared_task(ignore_result=True)
def quiet():
    return "never stored"
