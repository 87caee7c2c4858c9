"""A test app for tests/e2e/test_unique.py, run by a real worker process: each run of a task appends a
line to a file, so a test counts runs instead of trusting replies."""

from __future__ import annotations

import os

from client.app import App

app = App("unique_app", broker=os.environ.get("BROKERD_TEST_BROKER", "127.0.0.1:7700"))


def _count(path: str, what: str) -> int:
    with open(path, "a") as f:
        f.write(what + "\n")
    with open(path) as f:
        return len(f.read().splitlines())


@app.task
def rebuild_feed(path: str, user: int) -> str:
    """Counts its runs in ``path``; returns which user it rebuilt."""
    _count(path, f"feed {user}")
    return f"feed {user} rebuilt"


@app.task(unique=True, unique_until="finished", unique_for=60)
def rebuild_once(path: str, user: int) -> str:
    """unique=True: the key is the task name and its arguments."""
    _count(path, f"once {user}")
    return f"once {user}"
