"""Imported only because the worker was given ``--include`` (nothing else imports it)."""

from client import shared_task


@shared_task(name="appconf.included")
def included():
    return "included"
