"""Celery's pytest fixtures over our SDK: the app is a ``client.app.App``; the session worker is a
real ``brokerd-worker`` process on ``celery._worker_app`` (Celery's tasks.py), stopped by its pid."""
import os
import signal
import subprocess
import sys
import time

import pytest

from celery import Celery, bind_shared_tasks

WORKER_START_TIMEOUT = 60.0  # seconds: a cold worker on a loaded 2-core box; past that it is broken


def _app(celery_config, celery_includes):
    config = dict(celery_config)
    app = Celery("celery.tests", broker=config.pop("broker_url"), **config)
    for module in celery_includes or ():
        __import__(module)
    bind_shared_tasks(app)
    return app


@pytest.fixture(scope="session")
def celery_session_app(request, celery_config, celery_includes):
    app = _app(celery_config, celery_includes)
    yield app
    app.close()


@pytest.fixture(scope="session")
def celery_session_worker(request, celery_session_app, celery_includes):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "client.worker_cli", "celery._worker_app:app", "-b", env["TEST_BROKER"],
           "-Q", "celery", "-P", "processes", "-c", "1", "-n", "celery-sdk-worker", "-l", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while not celery_session_app.control.ping(timeout=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"brokerd-worker did not answer ping (exit {proc.poll()})")
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def celery_app(request, celery_config, celery_includes):
    app = _app(celery_config, celery_includes)
    yield app
    app.close()
