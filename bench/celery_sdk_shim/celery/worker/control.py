"""Custom remote-control commands: our worker has a fixed set, so these register nothing."""
from celery._compat import missing


def control_command(*args, **kwargs):
    return lambda fn: fn


inspect_command = control_command
add_consumer = missing("worker.control.add_consumer")
cancel_consumer = missing("worker.control.cancel_consumer")
