"""The ``processes`` pool (the default; concurrency = CPU count): N forked children.

Each child has a socketpair to the parent carrying jobs and outcomes (4-byte length prefix, then
``m`` and a marshal, or ``p`` and a pickle: see ``_jobs_frame``).  A child runs one task at a time;
with a deep backlog (prefetch multiplier > 1) it is handed batches of up to ``MAX_BATCH`` jobs per
write.  Its death is seen through a pidfd (or EOF): the host's ``lost_job`` decides what the task's
outcome is.  Children ignore SIGINT/SIGTERM (the parent decides when they stop) and get SIGKILL if
the parent dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the worker frees its tasks for
redelivery at once.
``max_memory_per_child`` (KiB): a child whose resident memory (``/proc/<pid>/statm``) is above it
once its jobs are done is replaced, like one past ``max_tasks_per_child``.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import marshal
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque

from client import signals
from client.exceptions import EncodeError
from client.worker.channel import forget_app_connection
from client.worker.logs import set_process_label
from client.worker.outcome import S_ACK, exc_meta
from client.worker.pools.base import CHILD_STOP_TIMEOUT, Job, Pool, close_fds
from client.worker.runner import Runner

log = logging.getLogger("brokerd.worker")

FRAME = struct.Struct(">I")  # parent <-> child: 4-byte length, then the payload (_load)
PICKLE = pickle.HIGHEST_PROTOCOL
MARSHAL, PICKLED = b"m", b"p"  # a payload's first byte: how the rest is encoded
_M = MARSHAL[0]
# Result values marshal carries as they are (exact types only: a subclass, an IntEnum say, is pickled)
_PLAIN = frozenset((type(None), bool, int, float, str))
PR_SET_PDEATHSIG = 1
MAX_BATCH = 16  # jobs handed to a pool process in one write when the backlog is deep
OUTCOME_DELAY = 0.0005  # a child sends outcomes at the end of a batch, or once the oldest waited this long

try:
    _PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
except (ValueError, OSError, AttributeError):
    _PAGE_KB = 4


def _rss_kb(pid: int) -> int | None:
    """Resident memory of a process in KiB, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_KB
    except (OSError, ValueError, IndexError):
        return None


def _prctl_pdeathsig():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # not Linux: the child notices the parent is gone at its next read
        pass


def _write_all(fd, data):
    """Write everything, waiting for room if the fd is non-blocking and full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class _Child:
    __slots__ = ("pid", "fd", "pidfd", "buf", "jobs", "done", "assigned", "idle_since", "label", "index")


class ProcessPool(Pool):
    """N forked children; jobs and outcomes cross a socketpair as length-prefixed pickles.

    A child runs its jobs one after another.  With a deep backlog (prefetch multiplier > 1) a
    child is handed a *batch* of up to ``MAX_BATCH`` jobs in one write, and topped up with the
    next batch while it runs the last job of the current one, so it never waits for the parent;
    with the default multiplier of 1 every batch is one job.  Outcomes come back one frame per
    job, written at the end of a batch or once the oldest unsent one is ``OUTCOME_DELAY`` old.
    On a warm stop the children get SIGUSR1 and hand back the jobs they have not started.
    """

    kind = "processes"
    unit = "processes"

    def __init__(self, worker, size: int, max_tasks_per_child=None, max_memory_per_child=None):
        super().__init__(worker, size)
        self.max_tasks = max_tasks_per_child
        self.max_memory = max_memory_per_child  # KiB of resident memory; a child past it is replaced
        self.children: dict[int, _Child] = {}  # by parent-end fd
        self.by_pidfd: dict[int, _Child] = {}
        self._index = itertools.count(1)

    # -- lifecycle --
    def spawn(self):
        w = self.w
        parent_end, child_end = socket.socketpair()
        index = next(self._index)
        label = f"ForkPoolWorker-{index}"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                _prctl_pdeathsig()
                parent_end.close()
                self._child_setup()
                _child_main(child_end.detach(), w, label)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        child_end.close()
        c = _Child()
        c.pid = pid
        c.fd = parent_end.detach()
        os.set_blocking(c.fd, False)  # a stale poll event must never block the main loop
        c.index = index
        try:
            c.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            c.pidfd = None
        c.buf = bytearray()
        c.jobs = deque()
        c.done = 0
        c.assigned = 0
        c.idle_since = time.monotonic()
        c.label = label
        self.children[c.fd] = c
        w.poller.register(c.fd, select.POLLIN)
        if c.pidfd is not None:
            self.by_pidfd[c.pidfd] = c
            w.poller.register(c.pidfd, select.POLLIN)
        self.idle.append(c)
        log.debug("started %s (pid %d)", label, pid)
        return c

    def _child_setup(self):
        """In a fresh child: drop the parent's fds and signal handling."""
        for other in list(self.children.values()):
            close_fds((other.fd, other.pidfd))
        self.w.forget_parent_fds()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _forget(self, c: _Child):
        self.children.pop(c.fd, None)
        try:
            self.w.poller.unregister(c.fd)
        except (KeyError, ValueError):
            pass
        os.close(c.fd)
        if c.pidfd is not None:
            self.by_pidfd.pop(c.pidfd, None)
            try:
                self.w.poller.unregister(c.pidfd)
            except (KeyError, ValueError):
                pass  # closed by _reap, once the process is gone
        if c in self.idle:
            self.idle.remove(c)

    def _reap(self, c: _Child, block=True) -> str:
        try:
            pid, status = os.waitpid(c.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid, status = c.pid, 0
        if pid == 0:
            return "still running"
        if c.pidfd is not None:
            os.close(c.pidfd)
            c.pidfd = None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return f"was killed by {name}"
        return f"exited with code {os.waitstatus_to_exitcode(status)}"

    def _reap_soon(self, c: _Child) -> str:
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT
        while True:
            status = self._reap(c, block=False)
            if status != "still running":
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                try:
                    os.kill(c.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return self._reap(c)
            if c.pidfd is not None:
                select.select([c.pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.01))

    # -- the main loop's interface --
    @property
    def current(self) -> int:
        return len(self.children)

    def dispatch(self, backlog: deque, running: dict, now: float) -> None:
        """Hand waiting jobs to idle children (and top up busy ones when the backlog is deep)."""
        batch = 1
        autoscale = self.w.autoscale
        # While autoscale may still add processes, a job waits for one rather than queue behind a busy one.
        if len(backlog) > len(self.children) and (autoscale is None or self.size >= autoscale[0]):
            batch = min(MAX_BATCH, -(-len(backlog) // max(1, len(self.children))))
        if self.idle:
            for c in list(self.idle):
                if not backlog:
                    break
                self.idle.remove(c)
                self._send(c, backlog, batch, running, now)
        if batch > 1 and backlog:
            batchable = self.w.batchable
            for c in self.children.values():
                # It is on its last job: queue the next batch now, unless that job may run long
                # (w.batchable): jobs queued behind it could not be given back by a RECALL.
                if len(c.jobs) == 1 and backlog and batchable(c.jobs[0]):
                    self._send(c, backlog, batch, running, now)

    def _send(self, c: _Child, backlog, batch, running, now):
        if self.max_tasks:
            batch = min(batch, self.max_tasks - c.assigned)
            if batch <= 0:
                return
        jobs = []
        for _ in range(batch):
            if not backlog:
                break
            job = backlog.popleft()
            job.slot = c
            running[job.seq] = job
            if not c.jobs:
                self.w.job_started(job)
                if job.hard:
                    job.deadline = now + job.hard
            c.jobs.append(job)
            jobs.append(job)
            if batch > 1 and not self.w.batchable(job):
                break  # nothing queued behind a job that may run long (see dispatch)
        c.assigned += len(jobs)
        data = _jobs_frame(jobs)
        try:
            _write_all(c.fd, data)
        except OSError:
            pass  # the child is gone: its pidfd / EOF tells the main loop, which hands the jobs back

    def on_ready(self, fd):
        """A child's socket or pidfd is readable."""
        c = self.children.get(fd)
        if c is not None:
            try:
                data = os.read(fd, 262144)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self._received(c, data)
                return
            self._died(c)
            return
        c = self.by_pidfd.get(fd)
        if c is not None:
            # Take what it wrote before it exited, then treat it as gone.
            while c.fd in self.children:
                try:
                    data = os.read(c.fd, 262144)
                except OSError:  # BlockingIOError included: nothing more was written
                    data = b""
                if not data:
                    break
                self._received(c, data)
            if c.fd in self.children:
                self._died(c)

    def _received(self, c: _Child, data: bytes):
        buf = c.buf
        buf += data
        pos = 0
        end = len(buf)
        w = self.w
        jobs = c.jobs
        while end - pos >= 4:
            (n,) = FRAME.unpack_from(buf, pos)
            if end - pos - 4 < n:
                break
            payload = buf[pos + 5: pos + 4 + n]
            seq, outcome, runtime = marshal.loads(payload) if buf[pos + 4] == _M else pickle.loads(payload)
            pos += 4 + n
            if not jobs or jobs[0].seq != seq:
                continue  # settled already (it cannot happen; be safe)
            job = jobs.popleft()
            c.done += 1
            if outcome is None:
                w.hand_back_job(job)  # not started: the child was told to stop
            else:
                w.finish(job, outcome, runtime)
            if jobs:
                nxt = jobs[0]
                w.job_started(nxt)
                if nxt.hard:
                    nxt.deadline = time.monotonic() + nxt.hard
        if pos:
            del buf[:pos]
        if not jobs and c.fd in self.children:
            if self.max_tasks and c.done >= self.max_tasks:
                log.info("%s (pid %d) ran %d tasks (--max-tasks-per-child): replacing it", c.label, c.pid, c.done)
                self.retire(c)  # maintain() starts its successor
                w.process_replaced(c.pid, "max-tasks-per-child", tasks=c.done)
            elif self.max_memory and (rss := _rss_kb(c.pid)) is not None and rss > self.max_memory:
                log.info("%s (pid %d) uses %d KiB, over --max-memory-per-child %d KiB: replacing it",
                         c.label, c.pid, rss, self.max_memory)
                self.retire(c)
                w.process_replaced(c.pid, "max-memory-per-child", rss_kb=rss, tasks=c.done)
            elif self.current > self.size:  # the pool was shrunk while it worked
                self.retire(c)
            else:
                c.idle_since = time.monotonic()
                self.idle.append(c)

    def retire(self, c: _Child):
        """Close its pipe (it exits at EOF) and reap it."""
        self._forget(c)
        status = self._reap_soon(c)
        log.debug("%s (pid %d) %s", c.label, c.pid, status)

    def _died(self, c: _Child):
        jobs = list(c.jobs)
        c.jobs.clear()
        self._forget(c)
        status = self._reap(c)
        w = self.w
        if jobs:
            job = jobs[0]
            log.error("Process %s (pid %d) %s while running %s[%s]", c.label, c.pid, status, job.name, job.task_id)
            w.lost_job(job, f"process {c.label} (pid {c.pid}) {status}")
            for job in jobs[1:]:  # queued behind it in a batch, never started: not their fault
                w.hand_back_job(job, "its pool process died before it started")
        elif not w.stopping:
            log.warning("Process %s (pid %d) %s", c.label, c.pid, status)

    def kill_job(self, job: Job):
        """Hard time limit: SIGKILL the child that runs ``job``; maintain() starts another."""
        c = job.slot
        rest = [j for j in c.jobs if j is not job]
        c.jobs.clear()
        try:
            os.kill(c.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._forget(c)
        self._reap(c)
        log.error("Process %s (pid %d) killed: hard time limit of %s[%s]", c.label, c.pid, job.name, job.task_id)
        for j in rest:  # queued behind it, never started
            self.w.hand_back_job(j, "its pool process was killed at a hard time limit")

    def soft_limit(self, job):
        pass  # children enforce soft limits themselves (SIGALRM)

    def drain(self):
        """Warm stop: children hand back the jobs they have not started."""
        for c in self.children.values():
            if len(c.jobs) > 1:
                try:
                    os.kill(c.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

    def pids(self) -> list:
        return sorted(c.pid for c in self.children.values())

    def close(self, cold: bool):
        """Stop every child: SIGKILL (cold) or close its pipe and wait for it to exit."""
        children = list(self.children.values())
        for c in children:
            if cold:
                try:
                    os.kill(c.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._forget(c)
        for c in children:
            self._reap_soon(c)


_drain = False


def _on_drain(signum, frame):
    global _drain
    _drain = True


def _child_main(fd: int, w, label: str):
    """A pool process: read a batch of jobs, run them, write their outcomes; exit at EOF."""
    set_process_label(label)
    runner = Runner(w.app, w.hostname, alarm=True)
    signal.signal(signal.SIGUSR1, _on_drain)
    forget_app_connection(w.app)  # a child makes its own connection if a task publishes
    signals.worker_process_init.send(sender=None)  # per-process resources (a DB connection) open here
    try:
        _child_loop(fd, w, runner)
    finally:
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)


def _load(payload):
    """A frame's payload (after its length): ``m`` and a marshal, or ``p`` and a pickle."""
    return marshal.loads(payload[1:]) if payload[0] == _M else pickle.loads(payload[1:])


def _jobs_frame(jobs) -> bytes:
    """One frame of jobs for a pool process, each with the envelope the main loop decoded and checked
    already (the child does not decode it again).  Marshal when it carries them exactly (plain CBOR
    values: it refuses anything else); else pickle (a naive datetime); else, when pickle cannot carry
    something in an envelope either (a CBOR tag nobody registered, ``undefined``), the message bodies
    for the child to decode."""
    out = [job.to_runner(True) for job in jobs]
    try:
        data = MARSHAL + marshal.dumps(out)
    except Exception:  # noqa: BLE001 - ValueError: unmarshallable, or nested too deep
        try:
            data = PICKLED + pickle.dumps(out, PICKLE)
        except Exception:  # noqa: BLE001 - pickle raises several kinds (PicklingError, TypeError, RecursionError)
            data = PICKLED + pickle.dumps([job.to_runner(False) for job in jobs], PICKLE)
    return FRAME.pack(len(data)) + data


def _outcome_payload(seq, outcome, runtime, msg_id, hostname) -> bytes:
    """A pool process's report of one job: marshal for the common outcome (a plain value, no meta but
    the ignore_result marker, no retry), else pickle; a value pickle cannot carry either (CBOR took it)
    makes the task a FAILURE saying so, and the pool process lives on."""
    if outcome is None or (type(outcome[2]) in _PLAIN and (outcome[3] is None or type(outcome[3]) is str)
                           and outcome[4] is None and outcome[5] is None):
        return MARSHAL + marshal.dumps((seq, outcome, runtime))
    try:
        return PICKLED + pickle.dumps((seq, outcome, runtime), PICKLE)
    except Exception as exc:  # a value CBOR took but pickle does not: report it, don't die
        meta = exc_meta(EncodeError(f"result of task {msg_id} cannot cross to the worker process: {exc}"), hostname)
        return PICKLED + pickle.dumps((seq, (S_ACK, "FAILURE", None, meta, None, None), runtime), PICKLE)


def _child_loop(fd: int, w, runner):
    buf = bytearray()
    read = os.read
    pack = FRAME.pack
    clock = time.perf_counter
    execute = runner.execute
    hostname = w.hostname
    while True:
        while len(buf) < 4 or len(buf) - 4 < FRAME.unpack_from(buf, 0)[0]:
            data = read(fd, 262144)
            if not data:
                return
            buf += data
        (n,) = FRAME.unpack_from(buf, 0)
        jobs = _load(buf[4: 4 + n])
        del buf[: 4 + n]
        out = []
        oldest = 0.0
        last = len(jobs) - 1
        for i, job in enumerate(jobs):
            runtime = None
            if _drain:
                outcome = None  # not started: the parent hands it back to brokerd
            else:
                t0 = clock()
                outcome = execute(job)
                runtime = clock() - t0
            data = _outcome_payload(job[0], outcome, runtime, job[2], hostname)
            if not out:
                oldest = clock()
            out.append(pack(len(data)))
            out.append(data)
            if i == last or clock() - oldest >= OUTCOME_DELAY:
                _write_all(fd, b"".join(out))
                out = []
