"""Tasks for the canvas and revoke tests; side effects go to files under CANVAS_DIR."""

import os
import time
from pathlib import Path

from client import App
from client.canvas import Signature, chain, chord, group
from client.exceptions import Reject

app = App("canvas", broker=os.environ.get("BROKERD_URL", "127.0.0.1:7700"))


def _log(name: str, line: str) -> None:
    d = Path(os.environ.get("CANVAS_DIR", "."))
    with open(d / name, "a") as fh:
        fh.write(line + "\n")


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def tsum(numbers):
    _log("tsum.log", str(sum(numbers)))
    return sum(numbers)


@app.task
def boom(*args):
    raise ValueError("boom in step")


@app.task
def slow_add(x, y, pause=0.2):
    time.sleep(pause)
    return x + y


@app.task
def record(tag):
    _log("record.log", str(tag))
    return tag


@app.task
def on_error(task_id, *rest):
    _log("errors.log", f"{task_id} {' '.join(str(r) for r in rest)}".strip())
    return task_id


@app.task
def sleeper(seconds):
    _log("sleeper.log", "started")
    time.sleep(seconds)
    _log("sleeper.log", "finished")
    return "slept"


@app.task
def old_errback(task_id):
    """An errback in the old style: one argument, the failed task's id (sent as a task)."""
    _log("old_errbacks.log", task_id)
    return task_id


@app.task
def new_errback(request, exc, traceback):
    """An errback in Celery's style: called in the worker with the request, exception and traceback."""
    _log("new_errbacks.log", f"{request.id} {type(exc).__name__} {'Traceback' in str(traceback)}")


@app.task
def errback_reports(request, exc, traceback):
    """A Celery-style errback that tells the test what it got: a result under '<failed id>-errback'."""
    record.apply_async((f"{request.id} {type(exc).__name__} {exc} {'Traceback' in str(traceback)}",),
                       task_id=f"{request.id}-errback")


@app.task(bind=True)
def replacer(self, x):
    """Replaced by a chain: the chain's result becomes this task's result."""
    return self.replace(add.s(x, 1) | mul.s(2))


@app.task(bind=True)
def replaced_by_group(self, x):
    return self.replace(group(add.s(x, 1), add.s(x, 2)))


@app.task
def make_canvas():
    """Returns a nested signature (not run): stored as its map."""
    return chain(add.s(1), chord([add.s(1), group(mul.s(2))], tsum.s()))


@app.task
def rebuild_canvas(d):
    """The kinds found in a signature map rebuilt with Signature.from_dict, depth first."""
    def kinds(s):
        inner = [*getattr(s, "tasks", ())] if s.get("subtask_type") else []
        body = [s.body] if s.get("subtask_type") == "chord" else []
        return [type(s).__name__, *[k for x in (*inner, *body) for k in kinds(x)]]
    return kinds(Signature.from_dict(d, app=app))


@app.task
def start_a_chain():
    """Returns the AsyncResult of a chain it sent: stored as its as_tuple()."""
    return (add.s(1, 1) | group(add.s(1), add.s(2))).apply_async()


@app.task(bind=True)
def stamps_of(self, *args):
    """The stamps this run was sent with."""
    return {"names": self.request.stamped_headers, "stamps": self.request.stamps}


@app.task(bind=True, max_retries=1)
def retry_new_args(self, foo, bar, label=None):
    if not self.request.retries:
        raise self.retry(args=(foo + 1, bar + 1), countdown=0)
    return [foo, bar, label, self.request.retries]


@app.task(bind=True, max_retries=1)
def retry_new_kwargs(self, foo, bar):
    if not self.request.retries:
        raise self.retry(kwargs={"foo": foo + 1}, countdown=0)
    return [foo, bar, self.request.retries]


@app.task(bind=True, max_retries=1)
def retry_unsendable(self):
    if not self.request.retries:
        raise self.retry(args=(object(),), countdown=0)
    return "never"


@app.task(bind=True)
def ids(self, i):
    """(root_id, parent_id, i) of this run."""
    return [self.request.root_id, self.request.parent_id, i]


@app.task(bind=True)
def record_nesting(self, replacements, seen=()):
    """Replaced by itself ``replacements`` times; returns request.replaced_task_nesting at each hop."""
    seen = [*seen, self.request.replaced_task_nesting]
    if replacements:
        return self.replace(record_nesting.s(replacements - 1, seen))
    return seen


@app.task(bind=True)
def replaced_by_chain_ending_in_group(self):
    return self.replace(chain(add.s(1, 2), group(add.s(1), add.s(1))))


@app.task(bind=True)
def add_to_each(self, nums, val):
    """Replaced by a group of one add per number (Celery's add_to_all): [] for no numbers."""
    return self.replace(group(*[add.s(n, val) for n in nums]))


@app.task(bind=True)
def replaced_by_nothing(self, *_):
    return self.replace(chain())


@app.task
def reject_me(reason):
    raise Reject(reason, requeue=False)


@app.task
def reject_first_time(marker):
    """Reject(requeue=True) on the first delivery (no marker file yet), run on the next."""
    p = Path(os.environ.get("CANVAS_DIR", ".")) / marker
    if not p.exists():
        p.write_text("rejected once")
        raise Reject("not yet", requeue=True)
    return "ran after requeue"


@app.task
def labelled_old_errback(task_id, label):
    """An old-style errback with a stored argument: ``.s('x')`` leaves one open (the failed task's id)."""
    _log("labelled_errbacks.log", f"old {task_id} {label}")


@app.task
def labelled_new_errback(request, exc, traceback, label):
    """A new-style errback with a stored argument: ``.s('x')`` still leaves three open."""
    _log("labelled_errbacks.log", f"new {request.id} {type(exc).__name__} {label}")


@app.task(bind=True)
def add_replaced(self, x, y):
    """Replaced by ``add``: the replaced task's errbacks go to its replacement only (Celery's)."""
    return self.replace(add.s(x, y))


@app.task(bind=True)
def collect_ids(self, results, i):
    """Celery's collect_ids: (the header's results, [root_id, parent_id, i]) of this run (a chord body)."""
    return [results, [self.request.root_id, self.request.parent_id, i]]


@app.task(bind=True)
def properties_of(self):
    """Celery's return_properties: this run's request.properties."""
    return self.request.properties


@app.task(bind=True, max_retries=1)
def retry_once_then_log(self):
    """Retries once, then logs its id (the test's sign that it finished) and returns 1."""
    if not self.request.retries:
        raise self.retry(countdown=0.01)
    _log("retried.log", self.request.id)
    return 1


@app.task(bind=True)
def grow_chord(self, nums, val):
    """Celery's add_to_all_to_chord: each added task's result joins the chord's."""
    for n in nums:
        self.add_to_chord(add.s(n, val))
    return 0


@app.task(bind=True)
def grow_chord_by_a_chord(self, nums, val):
    """Celery's add_chord_to_chord: the added chord counts by its body."""
    self.add_to_chord(group(add.s(n, val) for n in nums) | tsum.s())
    return 0


@app.task(bind=True)
def grow_no_chord(self):
    try:
        self.add_to_chord(add.s(1, 1))
    except ValueError as exc:
        return str(exc)
    return "grew"


@app.task
def identity(x):
    return x
