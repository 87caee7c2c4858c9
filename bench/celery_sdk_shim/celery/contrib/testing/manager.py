"""Celery's test ``Manager``, as glue over our SDK: bounded waits, inspect through app.control."""
import time

from celery._compat import missing


class Manager:
    def __init__(self, app, **kwargs):
        self.app = app

    def wait_for(self, fun, catch=(), desc="thing", args=(), kwargs=None, errback=None,
                 max_retries=10, interval_start=0.1, interval_step=0.5, interval_max=5.0, timeout=60.0, **_):
        deadline = time.monotonic() + timeout
        delay = interval_start
        while True:
            try:  # Celery's retry_over_time: the first call that does not raise is the answer
                return fun(*args, **(kwargs or {}))
            except catch:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {desc}")
            time.sleep(delay)
            delay = min(delay + interval_step, interval_max)

    def inspect(self, timeout=3.0):
        return self.app.control.inspect(timeout=timeout)

    def join(self, r, propagate=False, max_retries=10, timeout=60.0, **_):
        return r.get(timeout=timeout, propagate=propagate)

    def wait_until_idle(self):
        def idle():
            active = self.inspect(1.0).active() or {}
            assert all(not v for v in active.values()), "tasks still active"
        self.wait_for(idle, catch=(AssertionError,), desc="an idle worker", timeout=10.0)

    assert_accepted = missing("contrib.testing.manager.Manager.assert_accepted")
    assert_received = missing("contrib.testing.manager.Manager.assert_received")
    assert_result_tasks_in_progress_or_completed = missing(
        "contrib.testing.manager.Manager.assert_result_tasks_in_progress_or_completed")
