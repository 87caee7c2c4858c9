"""W2's long/short mix (issue 18): two brokerd-worker processes with every default but -c 1
(one slot each, so a held task can only wait or be recalled), credit grown on 1,500 no-op tasks,
then SHORTS 10 ms tasks published one every PACE s beside one LONG-second task; then, the credit
grown again, the same shorts alone (the control: what this machine's load costs a short task anyway).
Wait of a short task = its start - its publish (wall clock, one machine).  Reports p50/p99/max
wait of both phases against the target p99 <= 2 x 10 ms, and how many shorts the broker handed the
long task's worker while it ran (each one waits there for a RECALL round trip: the thing the
target is about; the control's p99 is the load's).  Uses tests/e2e/recall_app.py; a benchmark,
not a test."""
import os, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)
from tests.e2e import recall_app
from client import Client
from tests.support.broker import BrokerProcess
# LONG: the long task's seconds (the issue says 30; argv[1]); SHORTS published PACE s apart (argv[2],
# ms), slower than the one free slot runs them (10 ms each), so a wait is being held, not a queue of shorts.
LONG, SHORTS = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0, 200
PACE = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.03
d = tempfile.mkdtemp(prefix="mix-")
b = BrokerProcess(d).start(timeout=30)
app = recall_app.app; app.conf.broker_url = b.address; app.close()
q = "mix"; ws = []


def shorts():
    """SHORTS short tasks PACE apart: [(publish time, start time, worker, task id)], in publish order."""
    sent = []
    for _ in range(SHORTS):
        sent.append((time.time(), recall_app.short_where.apply_async(queue=q)))
        time.sleep(PACE)
    return [(t, *r.get(timeout=120), r.id) for t, r in sent]


def grow():
    """1,500 no-op tasks: the adaptive credit grows past the one slot (x64 at most)."""
    [r.get(timeout=120) for r in [recall_app.noop.apply_async(queue=q) for _ in range(1500)]]


def handed_back(runs):
    """How many were given back unstarted (a RECALL answered): their task events say so."""
    time.sleep(0.2)  # task events leave a worker up to 50 ms late (client/worker/events.py)
    with Client(b.address) as c:
        return sum(1 for *_, tid in runs
                   if any("handed back" in str(e.get("reason")) for e in (c.task_info(tid) or {}).get("events", ())))


def report(what, runs):
    waits = sorted(s - t for t, s, *_ in runs)
    p = lambda f: waits[min(len(waits) - 1, int(f * len(waits)))] * 1000
    print(f"  {what}: short-task wait  p50 {p(0.5):.1f} ms  p99 {p(0.99):.1f} ms  max {waits[-1]*1000:.1f} ms")


try:
    for i in range(2):
        ws.append(subprocess.Popen([sys.executable, "-m", "client.worker_cli", "tests.e2e.recall_app:app", "-b", b.address,
                                    "-Q", q, "-n", f"w{i}@mix", "-l", "warning", "-c", "1"], cwd=ROOT,
                                   env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    grow()
    lg = recall_app.long_where.apply_async((LONG,), queue=q)
    time.sleep(0.2)  # the long task starts on one worker
    mixed = shorts()
    t0, t1, where = lg.get(timeout=LONG + 120)
    grow()  # 10 ms tasks alone bring the credit down: grow it again for the control
    alone = shorts()
    # a short sent 0.5 s or more before the long one ended, and started only after it: held behind it
    late = sum(1 for t, s, *_ in mixed if s >= t1 and t < t1 - 0.5)
    print(f"mix: {SHORTS} x 10 ms shorts every {PACE*1000:.0f} ms on 2 workers -c 1 (adaptive credit), "
          f"beside a {LONG:g} s task, then alone  (target p99 <= 20 ms beside it)")
    report(f"beside {LONG:g} s  ", mixed)
    report("alone (control)", alone)
    print(f"  beside it: shorts that started only after it ended: {late}; handed to its worker and "
          f"given back (RECALL): {handed_back(mixed)}; alone: given back {handed_back(alone)}")
    print(f"command: python bench/recall_mix.py {LONG:g} {PACE*1000:g}")
finally:
    for w in ws:
        w.send_signal(signal.SIGTERM)
    for w in ws:
        try: w.wait(15)
        except subprocess.TimeoutExpired: w.kill()
    app.close(); b.terminate(); shutil.rmtree(d, ignore_errors=True)
