"""The task benchmark: brokerd + brokerd-worker end to end.  A benchmark, not a test.

    python bench/tasks.py                                # 10,000 no-op tasks, every figure
    python bench/tasks.py -n 20000 -c 2 --prefetch-multiplier 64 --pools processes
    python bench/tasks.py --broker-args="--fsync never" --worker-loglevel info
    python bench/tasks.py --prefetch-multiplier 0 --pools processes   # the worker's defaults: adaptive credit

Figures (the issue's "Figures for your closing note"):

1. **Enqueue rate of one sync producer**, no worker running: pipelined
   (``app.client.publish(queue, envelope, confirm=False)`` then one
   ``wait_for_confirms()``) and confirmed (``task.delay()``, one confirm per call).
2. **End to end, tasks/s** for ``-n`` no-op tasks through one worker
   (``python -m client.worker_cli bench.tasks:app``), per pool: the worker is
   started and warmed up (one task), then this process publishes ``-n`` tasks
   pipelined while the worker runs them.  Rate = n / (first publish -> last
   result stored), where "last result stored" is the newest ``updated`` stamp
   brokerd put on the n results (wall clock, same machine).  Every result is
   then read back and checked to be SUCCESS.
3. **Round trip**: p50/p99 of ``noop.delay().get()`` over ``--latency``
   sequential calls through a worker (processes pool).
4. **Cost of task events** (``--events-cost R``): figure 2 again, per pool, R
   times with task events (the worker's default) and R times with
   ``--no-task-events``, alternating; the medians and the difference.

It starts its own brokerd (``python -m broker --port 0`` on 127.0.0.1, a
temporary data dir) and workers, and stops each by its pid.  The last line
printed is the command that reproduces the figures.  CPU seconds of the
broker and of the worker (with its children) are shown for each run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402

from client import verbs  # noqa: E402
from tests.support.broker import BrokerProcess  # noqa: E402
from client.app import App, make_envelope  # noqa: E402

QUEUE = "bench.tasks"

# The app the worker imports (``bench.tasks:app``); its broker address comes from -b.
app = App("bench", broker=os.environ.get("BENCH_BROKER", "127.0.0.1:7700"), task_default_queue=QUEUE)


@app.task(name="bench.noop")
def noop(*args):
    return None


# --- processes ---------------------------------------------------------------------------
def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime of a process (and its reaped children) from /proc, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    total = int(fields[11]) + int(fields[12])
    if children:
        total += int(fields[13]) + int(fields[14])
    return total / tick


def cpu_seconds_of(stat_path: str) -> float:
    """utime+stime of one /proc stat file (a process's or one thread's), in seconds."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def Broker(args: list[str], data_dir: str) -> BrokerProcess:
    try:
        return BrokerProcess(data_dir, *args).start(timeout=30)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


class WorkerProc:
    def __init__(self, address: str, pool: str, concurrency: int, multiplier: int, loglevel: str, log_path: str,
                 profile: str | None = None, extra: tuple = ()):
        self.cmd = [sys.executable, "-m", "client.worker_cli", "bench.tasks:app", "-b", address, "-Q", QUEUE,
                    "--pool", pool, "-c", str(concurrency),
                    *(("--prefetch-multiplier", str(multiplier)) if multiplier else ()),  # 0: adaptive
                    "--loglevel", loglevel, *extra]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if profile:
            env["BROKERD_WORKER_PROFILE"] = profile
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log)

    def cpu(self) -> float:
        """The worker's CPU seconds so far, its live children included."""
        pid = self.proc.pid
        return cpu_seconds(pid) + sum(cpu_seconds(c, False) for c in child_pids(pid))

    def cpu_parts(self) -> dict:
        """The worker's CPU seconds so far by part: its main thread, its other threads (the client's
        reader and flusher, intake), its pool processes (live ones)."""
        pid = self.proc.pid
        main = cpu_seconds(pid, False)  # /proc/PID/stat is the whole process: take the main thread's own
        try:
            main = cpu_seconds_of(f"/proc/{pid}/task/{pid}/stat")
        except OSError:
            pass
        return {"main": main, "threads": cpu_seconds(pid, False) - main,
                "children": sum(cpu_seconds(c, False) for c in child_pids(pid))}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- measurements ------------------------------------------------------------------------
def envelopes(n: int):
    """n (task id, body) pairs of bench.noop envelopes, encoded up front."""
    out = []
    for _ in range(n):
        tid = str(uuid.uuid4())
        out.append((tid, cbor2.dumps(make_envelope("bench.noop", tid, (), {}))))
    return out


def publish_pipelined(client, items) -> tuple[float, float]:
    t0 = time.time()
    for tid, body in items:
        client.publish(QUEUE, body, id=tid, confirm=False)
    client.wait_for_confirms(timeout=120)
    return t0, time.time()


def enqueue_rates(n: int, n_confirmed: int) -> dict:
    c = app.client
    items = envelopes(n)
    t0, t1 = publish_pipelined(c, items)
    pipelined = n / (t1 - t0)
    c.purge(QUEUE)
    t0 = time.perf_counter()
    for _ in range(n_confirmed):
        noop.delay()
    confirmed = n_confirmed / (time.perf_counter() - t0)
    c.purge(QUEUE)
    return {"pipelined": pipelined, "confirmed": confirmed}


def warm_up(worker: WorkerProc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            noop.delay().get(timeout=1)
            return
        except Exception:
            if worker.proc.poll() is not None:
                raise SystemExit(f"the worker exited with {worker.proc.returncode}: {' '.join(worker.cmd)}")
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not run a task within 30 s")


class _Reply:
    """A waiter for ``Client.submit``: the client's reader thread releases it with the reply."""

    __slots__ = ("done",)

    def __init__(self):
        self.done = threading.Event()

    def release(self):
        self.done.set()

    def acquire(self, *a, **kw):
        return True


def fetch_results(c, task_ids, timeout: float = 60.0) -> list:
    """RESULT_GET (no wait) of every id, pipelined: one write, not one round trip each, so that
    checking the outcomes costs brokerd little (and stays small in --profile-broker's profile)."""
    sent = []
    for tid in task_ids:
        w = _Reply()
        sent.append((w, c.submit(verbs.get_result(c, tid), w)))
    c.flush()
    out = []
    for w, p in sent:
        if not w.done.wait(timeout):
            raise SystemExit(f"no answer to RESULT_GET in {timeout:g} s")
        if p.error is not None:
            raise SystemExit(f"RESULT_GET failed: {p.error}")
        out.append(p.result)
    return out


def end_to_end(broker: Broker, pool: str, n: int, concurrency: int, multiplier: int, loglevel: str,
               profile: str | None, tmp: str, extra: tuple = ()) -> dict:
    worker = WorkerProc(broker.address, pool, concurrency, multiplier, loglevel, os.path.join(tmp, f"worker-{pool}.log"),
                        profile, extra)
    try:
        warm_up(worker)
        c = app.client
        items = envelopes(n)
        base = c.stats(QUEUE)["acked"]
        bcpu0, wcpu0, parts0 = cpu_seconds(broker.proc.pid), worker.cpu(), worker.cpu_parts()
        t0, t_enq = publish_pipelined(c, items)
        deadline = time.monotonic() + 300
        while c.stats(QUEUE)["acked"] - base < n:  # a coarse "done yet?"; the figure uses brokerd's stamps
            if time.monotonic() > deadline or worker.proc.poll() is not None:
                raise SystemExit(f"only {c.stats(QUEUE)['acked'] - base} of {n} tasks done; see {worker.log.name}")
            time.sleep(0.02)
        bcpu, wcpu = cpu_seconds(broker.proc.pid) - bcpu0, worker.cpu() - wcpu0
        parts = {k: v - parts0[k] for k, v in worker.cpu_parts().items()}
        last = 0.0
        bad = 0
        for r in fetch_results(c, [tid for tid, _ in items]):
            if r["state"] != "SUCCESS":
                bad += 1
            last = max(last, r["updated"] or 0.0)
        if bad:
            raise SystemExit(f"{bad} of {n} tasks did not succeed")
        return {"rate": n / (last - t0), "seconds": last - t0, "enqueue": n / (t_enq - t0),
                "broker_cpu": bcpu, "worker_cpu": wcpu,
                "worker_parts": parts, "cmd": worker.cmd}
    finally:
        worker.stop()


def round_trip(broker: Broker, calls: int, loglevel: str, tmp: str) -> dict:
    worker = WorkerProc(broker.address, "processes", 1, 1, loglevel, os.path.join(tmp, "worker-latency.log"))
    try:
        warm_up(worker)
        for _ in range(50):
            noop.delay().get(timeout=10)
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            noop.delay().get(timeout=10)
            samples.append(time.perf_counter() - t0)
        samples.sort()
        return {"p50": samples[len(samples) // 2] * 1000, "p99": samples[int(len(samples) * 0.99)] * 1000,
                "max": samples[-1] * 1000}
    finally:
        worker.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="tasks in each end-to-end run (default 10000)")
    ap.add_argument("--pools", default="processes,threads", help="pools to run end to end (default processes,threads)")
    ap.add_argument("-c", "--concurrency", type=int, default=2, help="worker concurrency (default 2)")
    ap.add_argument("--prefetch-multiplier", type=int, default=64,
                    help="worker prefetch multiplier (default 64); 0: none given, the worker's adaptive credit")
    ap.add_argument("--confirmed", type=int, default=3000, help="delay() calls for the confirmed enqueue rate (default 3000)")
    ap.add_argument("--latency", type=int, default=1000, help="sequential delay().get() calls (default 1000); 0 skips")
    ap.add_argument("--broker-args", default="", help='extra brokerd flags, e.g. --broker-args="--fsync never"')
    ap.add_argument("--worker-loglevel", default="warning", help="worker --loglevel (default warning: no per-task lines)")
    ap.add_argument("--profile", metavar="DIR", help="cProfile the worker's main thread into DIR/worker-<pool>.prof")
    ap.add_argument("--profile-broker", metavar="FILE",
                    help="run brokerd under cProfile, its profile written to FILE when it stops (SIGTERM)")
    ap.add_argument("--events-cost", type=int, default=0, metavar="R",
                    help="also run each pool R times with and R times without task events (--no-task-events)")
    a = ap.parse_args(argv)
    pools = [p for p in a.pools.split(",") if p]

    print(f"brokerd bench/tasks.py: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"broker args {a.broker_args or 'none'}")
    with tempfile.TemporaryDirectory(prefix="brokerd-bench-") as tmp:
        if a.profile_broker:
            # BrokerProcess runs ``sys.executable -m broker ...``: for this one start, a wrapper
            # that runs the same interpreter under cProfile (stopped by SIGTERM, so it is written).
            wrapper = os.path.join(tmp, "python-cprofile")
            with open(wrapper, "w") as fh:
                fh.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cProfile '
                         f'-o {shlex.quote(os.path.abspath(a.profile_broker))} "$@"\n')
            os.chmod(wrapper, 0o755)
            real, sys.executable = sys.executable, wrapper
            try:
                broker = Broker(shlex.split(a.broker_args), os.path.join(tmp, "data"))
            finally:
                sys.executable = real
        else:
            broker = Broker(shlex.split(a.broker_args), os.path.join(tmp, "data"))
        app.conf.broker_url = broker.address
        try:
            rates = enqueue_rates(a.n, a.confirmed)
            print("enqueue, one sync producer, no worker running")
            print(f"  pipelined            {rates['pipelined']:>9,.0f} tasks/s  (publish confirm=False x {a.n}, then wait_for_confirms)")
            print(f"  confirmed delay()    {rates['confirmed']:>9,.0f} tasks/s  ({a.confirmed} calls, one confirm each)")
            if a.profile:
                os.makedirs(a.profile, exist_ok=True)
            for pool in pools:
                prof = os.path.join(a.profile, f"worker-{pool}.prof") if a.profile else None
                r = end_to_end(broker, pool, a.n, a.concurrency, a.prefetch_multiplier, a.worker_loglevel, prof, tmp)
                mult = f"--prefetch-multiplier {a.prefetch_multiplier}" if a.prefetch_multiplier else "adaptive credit"
                print(f"end to end, {a.n:,} no-op tasks, --pool {pool} -c {a.concurrency} {mult}")
                print(f"  tasks/s              {r['rate']:>9,.0f}  ({r['seconds']:.2f} s first publish -> last result stored;"
                      f" producer enqueued at {r['enqueue']:,.0f}/s meanwhile)")
                print(f"  CPU seconds          broker {r['broker_cpu']:.2f}, worker {r['worker_cpu']:.2f} (with its children)")
                wp = r["worker_parts"]
                print(f"  worker CPU by part   main thread {wp['main']:.2f}, other threads {wp['threads']:.2f}, "
                      f"pool processes {wp['children']:.2f}")
            for pool in pools if a.events_cost else ():
                runs = {"with": [], "without": []}
                for _ in range(a.events_cost):
                    for label, extra in (("with", ()), ("without", ("--no-task-events",))):
                        runs[label].append(end_to_end(broker, pool, a.n, a.concurrency, a.prefetch_multiplier,
                                                      a.worker_loglevel, None, tmp, extra))

                def median(label, key, scale=1.0):
                    v = sorted(r[key] * scale for r in runs[label])
                    return v[len(v) // 2]

                us = 1e6 / a.n
                print(f"cost of task events, --pool {pool}, {a.events_cost} runs each way, alternating (medians)")
                for label, flag in (("with", "task events (default)"), ("without", "--no-task-events")):
                    each = ", ".join(f"{r['rate']:,.0f}" for r in runs[label])
                    print(f"  {flag:<22} {median(label, 'rate'):>7,.0f} tasks/s  (runs: {each}); "
                          f"CPU per task: broker {median(label, 'broker_cpu', us):.0f} us, "
                          f"worker {median(label, 'worker_cpu', us):.0f} us")
                on, off = median("with", "rate"), median("without", "rate")
                print(f"  throughput cost        {(off - on) / off * 100:>7.1f} %")
            if a.latency:
                r = round_trip(broker, a.latency, a.worker_loglevel, tmp)
                print(f"round trip, noop.delay().get() x {a.latency}, sequential, --pool processes -c 1")
                print(f"  p50 {r['p50']:.3f} ms   p99 {r['p99']:.3f} ms   max {r['max']:.3f} ms")
        finally:
            app.close()
            broker.stop()
    cmd = ["python", "bench/tasks.py", "-n", str(a.n), "--pools", a.pools, "-c", str(a.concurrency),
           "--prefetch-multiplier", str(a.prefetch_multiplier), "--confirmed", str(a.confirmed),
           "--latency", str(a.latency), "--worker-loglevel", a.worker_loglevel]
    if a.events_cost:
        cmd += ["--events-cost", str(a.events_cost)]
    if a.broker_args:
        cmd.append(f"--broker-args={a.broker_args}")
    print("reproduce: ", shlex.join(cmd))


if __name__ == "__main__":
    main()
