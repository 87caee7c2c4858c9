"""A pool process's own CPU per no-op task, in one process (issue 18): the side of W2 that
``bench/worker_path.py`` stands in for.  A benchmark, not a test.

    python bench/pool_child.py                 # 20,000 bench.noop jobs in batches of 8, median of 5 runs
    python bench/pool_child.py -n 20000 --batch 1 --profile

The real ``_child_loop`` of ``client/worker/pools/process.py`` (with ``Runner.execute``, log level
warning as bench/tasks.py runs the worker) reads jobs from a socketpair and writes their outcomes back;
a thread of this process plays the worker's main loop: it writes the batches as ``ProcessPool._send``
makes them and reads the outcomes (untimed: only the pool process's thread CPU is counted).  Prints the
median CPU microseconds per job.  It runs on trees from before jobs carried the decoded envelope too
(then the batches carry the message bodies, as those trees sent them), so two trees can be compared.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pickle
import pstats
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402

from client.app import App, make_envelope  # noqa: E402
from client.envelope import decode_envelope  # noqa: E402
from client.worker.pools import process as pp  # noqa: E402
from client.worker.pools.base import Job  # noqa: E402
from client.worker.runner import Runner  # noqa: E402

QUEUE = "bench.tasks"
HOST = "brokerd@bench"

app = App("bench", broker="127.0.0.1:1", task_default_queue=QUEUE)


@app.task(name="bench.noop")
def noop(*args):
    return None


class _Delivery:
    def __init__(self, body, msg_id):
        self.body, self.id, self.queue, self.priority, self.attempts, self.headers = body, msg_id, QUEUE, 0, 1, None


class _Host:
    hostname = HOST


def _frames(n: int, batch: int) -> list:
    jobs = []
    for i in range(n):
        tid = str(uuid.uuid4())
        body = cbor2.dumps(make_envelope("bench.noop", tid, (), {}))
        jobs.append(Job(i + 1, _Delivery(body, tid), 1, tid, "bench.noop", decode_envelope(body), None, None))
    out = []
    for start in range(0, n, batch):
        part = jobs[start:start + batch]
        if hasattr(pp, "_jobs_frame"):
            out.append(pp._jobs_frame(part))
        else:  # a tree from before: the bodies, pickled
            data = pickle.dumps([job.to_runner(False) for job in part], pp.PICKLE)
            out.append(pp.FRAME.pack(len(data)) + data)
    return out


def run(n: int, batch: int, runner, prof=None) -> float:
    """CPU seconds of the pool process's loop for ``n`` jobs."""
    a, b = socket.socketpair()
    parent, child = a.detach(), b.detach()
    frames = _frames(n, batch)

    def writer():
        for f in frames:
            pp._write_all(parent, f)

    def main_loop():  # reads outcome frames until there are n of them, then closes: the child loop ends
        w = threading.Thread(target=writer)
        w.start()
        buf, got = b"", 0
        while got < n:
            data = os.read(parent, 1 << 20)
            if not data:
                break
            buf += data
            pos = 0
            while len(buf) - pos >= 4 and len(buf) - pos - 4 >= pp.FRAME.unpack_from(buf, pos)[0]:
                pos += 4 + pp.FRAME.unpack_from(buf, pos)[0]
                got += 1
            buf = buf[pos:]
        w.join()
        os.close(parent)

    t = threading.Thread(target=main_loop)
    t.start()
    if prof is not None:
        prof.enable()
    c0 = time.thread_time()
    pp._child_loop(child, _Host(), runner)
    cpu = time.thread_time() - c0
    if prof is not None:
        prof.disable()
    t.join()
    os.close(child)
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20_000, help="jobs (default 20000)")
    ap.add_argument("--batch", type=int, default=8, help="jobs per write, as a deep backlog gives (default 8)")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the median is printed (default 5)")
    ap.add_argument("--profile", action="store_true", help="cProfile one more run and print where the time goes")
    a = ap.parse_args()
    logging.getLogger().setLevel(logging.WARNING)  # bench/tasks.py runs the worker at --loglevel warning
    runner = Runner(app, HOST, alarm=True)  # as in a pool process
    run(2000, a.batch, runner)  # warm up
    runs = [run(a.n, a.batch, runner) / a.n * 1e6 for _ in range(a.repeat)]
    print(f"pool process: {statistics.median(runs):.1f} us CPU per no-op job (median of {a.repeat}; runs "
          f"{', '.join(f'{r:.1f}' for r in runs)}), batches of {a.batch}")
    print(f"command: python bench/pool_child.py -n {a.n} --batch {a.batch} --repeat {a.repeat}")
    if a.profile:
        prof = cProfile.Profile()
        run(a.n, a.batch, runner, prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
