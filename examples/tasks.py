"""The example's tasks: what a web app hands to brokerd instead of doing in the request.

Run a worker for them:

    brokerd-worker examples.tasks:app -Q high,low -c 4

``send_welcome_email`` is urgent (queue ``high``); ``fan_out_post`` pushes a
new post to every follower's timeline, one small task per follower, on the
bulk queue ``low``.  "Sending" an e-mail and "pushing" to a timeline write
files under ``EXAMPLE_OUTBOX`` (default ``./outbox``), so a test can check them.
"""

import os
from pathlib import Path

from client import App

app = App("welcome", broker=os.environ.get("BROKERD_URL", "127.0.0.1:7700"))
app.conf.update(
    task_routes={
        "examples.tasks.send_welcome_email": {"queue": "high"},
        "examples.tasks.fan_out_post": {"queue": "low"},
        "examples.tasks.push_to_timeline": {"queue": "low"},
    }
)


def outbox() -> Path:
    return Path(os.environ.get("EXAMPLE_OUTBOX", "./outbox"))


@app.task(max_retries=5, retry_backoff=True, autoretry_for=(OSError,))
def send_welcome_email(user_id: int, email: str) -> str:
    path = outbox() / "emails" / f"{user_id}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"To: {email}\nSubject: Welcome!\n\nHello user {user_id}, welcome aboard.\n")
    return str(path)


@app.task
def fan_out_post(author: str, post_id: int, text: str, followers: int = 1000) -> int:
    """Push a post to ``followers`` timelines, one task each (pipelined publishes)."""
    for follower in range(followers):
        push_to_timeline.apply_async((follower, post_id, f"{author}: {text}"))
    return followers


@app.task(ignore_result=True)
def push_to_timeline(follower: int, post_id: int, line: str) -> None:
    path = outbox() / "timelines" / f"{follower}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(f"{post_id}\t{line}\n")
