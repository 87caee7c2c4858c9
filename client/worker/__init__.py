"""The worker: take tasks from brokerd, run them, store their results.

    from client.worker import Worker
    Worker(app, queues=["high", "low"], concurrency=4).run()   # blocks until SIGTERM / stop()

or from a shell: ``brokerd-worker proj.tasks:app -Q high,low -c 4`` (``client.worker_cli``).

The package, from the top down (each module's docstring gives its design choices):

* ``runtime``  ``Worker``: the connection's consumer, what each event means, settling, stopping.
* ``mainloop`` the main loop of the processes and threads pools (``poll()`` on one thread).
* ``trio_loop`` the trio pool's main loop (imported only by that pool).
* ``intake``   the thread that connects, consumes and reconnects.
* ``channel``  the link to brokerd: pipelined results, acks, nacks and events; the only
  module that touches the blocking client's internals.
* ``control``  remote control commands (protocol.md §5.34).
* ``events``   task and worker events (protocol.md §5.29), batched.
* ``limits``   time limits: which apply, and firing them.
* ``runner``   running one task (in a child process, a thread or the trio loop) to an outcome;
  the envelope checks.
* ``outcome``  what a task's run comes to (settle codes, result meta), and the outcomes decided
  without running it.
* ``pools``    where tasks run: ``processes``, ``threads``, ``trio``; one sizing/autoscale code.
* ``logs``     Celery's log format, with the process's label.

Layering: ``pools``, ``runner`` and the loops never import ``runtime``; no module touches another's
``_private`` names (tests/test_layering.py).

**Poison.**  No message may cost more than its own task: the main loop checks every envelope
field it or a pool will use (``runner.check_envelope``) and fails the task with a DecodeError
naming the field; a return value that cannot be stored or repr'd, or an exception whose ``str()``
raises, is a FAILURE, never a dead pool process (``Runner.succeeded``).
"""

from client.worker.intake import BrokerUnreachable
from client.worker.logs import setup_logging
from client.worker.outcome import exc_meta
from client.worker.runner import ExceptionInfo, Runner, check_envelope
from client.worker.runtime import ColdStop, DuplicateName, Worker, default_hostname

__all__ = ["Worker", "Runner", "ExceptionInfo", "BrokerUnreachable", "ColdStop", "DuplicateName", "setup_logging",
           "check_envelope", "exc_meta", "default_hostname"]
