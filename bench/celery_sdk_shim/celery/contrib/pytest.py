"""Celery's pytest fixtures over our SDK: the app is a ``client.app.App``; the session worker is the SDK's
in-process worker (``client.worker.testing.start_worker``, Celery's ``start_worker``), so the worker-side
signals Celery's tests connect to (``task_received``, ...) fire in the test process, as under Celery.

``SDK_SHIM_WORKER=process`` runs a ``brokerd-worker`` process instead (stopped by its pid)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from celery import Celery, bind_shared_tasks

WORKER_START_TIMEOUT = 60.0  # seconds: a cold worker on a loaded 2-core box; past that it is broken
# The in-process worker's threads: Celery's integration tests start one prefork worker whose children
# run tasks in parallel; some of the tests wait in a task for another (a chord in a task), so more than one
WORKER_THREADS = 4
# Glue: the worker's task lines at INFO (their loggers' level only, no handler added), so tests that read them
# through pytest's caplog (test_trace_log_arguments) see them; Celery's own session worker logs at "error"
WORKER_LOGLEVEL = "info"


def pytest_collection_modifyitems(config, items):
    """Glue: Celery's ``@flaky`` puts ``@pytest.mark.timeout(300)`` on half its tests, which outranks
    the run's ``--timeout``; cap it there, so one hung test costs the run's per-test timeout, not 5
    minutes (and the file's budget)."""
    cap = config.getoption("timeout", None)
    if not cap:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None:
            given = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
            if given is None or given > cap:
                item.add_marker(pytest.mark.timeout(cap), append=False)


def _app(celery_config, celery_includes, class_tasks=()):
    config = dict(celery_config)
    app = Celery("celery.tests", broker=config.pop("broker_url"), **config)
    for module in celery_includes or ():
        __import__(module)
    bind_shared_tasks(app)
    for task in class_tasks:  # as Celery's plugin does with celery_class_tasks
        app.register_task(task)
    return app


@pytest.fixture(scope="session")
def celery_class_tasks():
    return []


@pytest.fixture(scope="session")
def celery_session_app(request, celery_config, celery_includes, celery_class_tasks):
    app = _app(celery_config, celery_includes, celery_class_tasks)
    yield app
    app.close()


def _process_worker(app):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "client.worker_cli", "celery._worker_app:app", "-b", env["TEST_BROKER"],
           "-Q", "celery", "-P", "processes", "-c", "1", "-n", "celery-sdk-worker", "-l", "warning"]
    # in pytest's own process group, so the harness's kill of a wedged run (killpg) stops the worker too
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while not app.control.ping(timeout=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"brokerd-worker did not answer ping (exit {proc.poll()})")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the worker stops its pool children itself
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="session")
def celery_session_worker(request, celery_session_app, celery_includes):
    if os.environ.get("SDK_SHIM_WORKER") == "process":
        yield from _process_worker(celery_session_app)
        return
    from client.worker.testing import start_worker

    with start_worker(celery_session_app, pool="threads", concurrency=WORKER_THREADS, queues=["celery"],
                      hostname="celery-sdk-worker", ready_timeout=WORKER_START_TIMEOUT, loglevel=WORKER_LOGLEVEL) as worker:
        yield worker


@pytest.fixture
def celery_app(request, celery_config, celery_includes, celery_class_tasks):
    app = _app(celery_config, celery_includes, celery_class_tasks)
    yield app
    app.close()
