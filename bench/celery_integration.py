#!/usr/bin/env python3
"""Celery's own integration suite, run against Redis and against brokerd (issue 13 item 4).

A suite nobody here wrote is the proof that an unchanged Celery app runs on
brokerd.  This script:

1. gets Celery's ``t/`` tree from Celery's source release at the *installed*
   Celery version (``pip download --no-binary :all: celery==X``), cached in
   ``--cache`` (default ``~/.cache/brokerd-bench``);
2. starts its own redis-server (installed with apt-get when absent and we are
   root) and its own brokerd, both on 127.0.0.1 with free ports and their own
   data dirs, and stops both by pid at the end;
3. runs the chosen files (default ``test_tasks.py test_canvas.py``) with
   Celery's integration conftest, once with ``TEST_BROKER=TEST_BACKEND=redis://``
   and once with ``brokerd://`` (adjacent runs, same machine, same code), each
   file in its own pytest process with a per-test timeout and a time budget; a
   test that hangs past its timeout is failed as hung and the file resumes after
   it in a new process (one hang costs one test);
   brokerd's backend is named ``redis-sidechannel-brokerd://`` there, so the ~100
   tests that skip without a ``redis`` backend URL but use Redis only as a side
   channel run too (``bench/celery_redis_sidechannel.py``; ``--no-side-channel``
   to let them skip);
4. prints pass/fail/error/skip/xfail/xpass per file for both, every test that
   fails on brokerd but passes on Redis with its first error line, and the
   brokerd failures grouped by that line.

``--sdk`` adds a third run: the same files through a name-mapping layer
(``bench/celery_sdk_shim/``: a ``celery`` package that maps Celery's names onto
our SDK, ``client.app`` and ``brokerd-worker``) against brokerd: issue 14's measure.

Not a CI test: it downloads Celery's source and takes minutes.  Needs, in the
running Python: celery, redis, pydantic, pytest-timeout, pytest-rerunfailures
(``--install-deps`` installs what is missing with this Python's pip).

    python bench/celery_integration.py                      # Redis and brokerd, tasks + canvas
    python bench/celery_integration.py --sdk                # and our SDK through the shim
    python bench/celery_integration.py --targets brokerd -k chord --files test_canvas.py
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
from tests.support.broker import BrokerProcess  # noqa: E402  (the one brokerd launcher)

DEFAULT_FILES = ["test_tasks.py", "test_canvas.py"]
# import name -> pip name: what Celery's integration conftest and tasks.py import
NEEDED = {"celery": "celery", "redis": "redis", "pydantic": "pydantic",
          "pytest_timeout": "pytest-timeout", "pytest_rerunfailures": "pytest-rerunfailures"}
# Per test, seconds: Celery's own canvas tests wait up to 60 s for a result (their TIMEOUT), so
# a test that needs longer is hung, not slow; no single hang stalls the run.
TEST_TIMEOUT = 90
# Per pytest process (one file on one target), seconds: a run that wedges past every
# per-test timeout (a stuck worker thread at teardown) is killed, and what it reached is kept.
FILE_BUDGET = 1800
# The watch on each pytest process: a test still without an outcome HANG_GRACE seconds after its own
# timeout ran out is hung (pytest-timeout's failure was swallowed, e.g. by a subtests block, or the
# process is stuck where no signal reaches); one with no timeout at all gets DEFAULT_HANG_LIMIT.
HANG_GRACE = 30.0  # seconds: room for pytest-timeout's own failure and the test's teardown
DEFAULT_HANG_LIMIT = 600.0  # seconds
WATCH_INTERVAL = 1.0  # seconds between looks at a running pytest's outcome file
MAX_RESUMES = 25  # per file and target: a file that hangs that often is reported as it stands
REDIS_START_TIMEOUT = 10.0  # seconds for redis-server to answer PING
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- dependencies and sources

def ensure_python_deps(install: bool) -> None:
    missing = [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", *missing]
    if not install:
        sys.exit(f"missing Python packages: {', '.join(missing)}\n"
                 f"install them with: {' '.join(cmd)}   (or rerun with --install-deps)")
    log(f"installing {', '.join(missing)}")
    subprocess.run(cmd, check=True)


def celery_source(cache: Path) -> Path:
    """Celery's ``t/`` tree and pyproject.toml at the installed version, unpacked once into the cache.

    Only ``t/`` and the pytest config are unpacked: the installed Celery is what runs, so
    the source's own ``celery/`` package must not shadow it on sys.path."""
    version = metadata.version("celery")
    root = cache / f"celery-{version}"
    if (root / "t" / "integration" / "conftest.py").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as dl:
        log(f"downloading Celery {version}'s source release")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", f"celery=={version}", "-d", dl], check=True)
        (sdist,) = Path(dl).glob("celery-*.tar.gz")
        staging = Path(dl) / "out"
        prefix = f"celery-{version}/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix + "t/") or m.name == prefix + "pyproject.toml"]
            tar.extractall(staging, members=members, filter="data")
        shutil.move(str(staging / f"celery-{version}"), str(root))
    return root


# ---------------------------------------------------------------- servers

class Redis:
    """redis-server on 127.0.0.1:<free port>, no persistence, its own dir; stopped by pid."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Redis":
        exe = shutil.which("redis-server")
        if exe is None:
            if os.geteuid() != 0:
                sys.exit("redis-server is not installed; install it with: apt-get install -y redis-server")
            log("installing redis-server with apt-get")
            subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True,
                           stdout=subprocess.DEVNULL)
            exe = shutil.which("redis-server")
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=open(self.dir / "redis.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        sys.exit(f"redis-server did not answer PING within {REDIS_START_TIMEOUT} s; see {self.dir}/redis.log")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def brokerd_registration() -> tuple[list[str], str | None]:
    """The pytest arguments that make ``brokerd://`` resolvable by Celery, or why it is not.

    First as kombu finds transports (by name, or a package's entry point); failing that, after
    ``import client.celery`` (the one extra line the README gives when kombu has no hook), which
    the run then loads as a pytest plugin (``-p client.celery``) since Celery's conftest is not ours."""
    probe = ("from kombu.transport import resolve_transport; resolve_transport('brokerd');"
             "from celery.app.backends import by_name; by_name('brokerd')")
    last = "?"
    for pre, plugin in (("", []), ("import client.celery;", ["-p", "client.celery"])):
        r = subprocess.run([sys.executable, "-c", pre + probe], capture_output=True, text=True, cwd=ROOT,
                           timeout=60)
        if r.returncode == 0:
            return plugin, None
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
    return [], f"Celery cannot resolve brokerd:// here ({last}); is client/celery/ on this branch and installed?"


# ---------------------------------------------------------------- one run

def read_outcomes(path: Path) -> tuple[dict, dict]:
    """The outcome file: ({nodeid: outcome record}, {nodeid: its last "started" record})."""
    results, started = {}, {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill mid-write
                continue
            if rec.get("outcome") == "started":
                started[rec["test"]] = rec
            else:
                results[rec["test"]] = rec
    return results, started


def run_file(source: Path, test_file: str, target: str, env_extra: dict, out: Path, test_timeout: int,
             budget: int, keyword: str | None, pythonpath: list[Path], reruns: bool,
             plugins: list[str]) -> dict:
    """One file on one target: Celery's conftest, pytest processes until every selected test has an
    outcome.  Returns {"results": {nodeid: outcome-record}, ...}.

    One hang costs one test: a test with no outcome HANG_GRACE seconds past its own timeout (or one
    during which pytest died) is recorded as failed, its process group is killed, and a new pytest
    process resumes with every test that has an outcome deselected."""
    outcomes = out / f"{target}-{test_file}.jsonl"
    outcomes.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(env_extra)
    env["CELERY_OUTCOMES"] = str(outcomes)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*pythonpath, BENCH]) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    base = [sys.executable, "-m", "pytest", "-c", str(source / "pyproject.toml"), "--rootdir", str(source),
            "-p", "celery.contrib.pytest", "-p", "celery_outcomes", *plugins, "-p", "no:cacheprovider", "-q",
            "-rN", "--no-header", f"--timeout={test_timeout}", f"t/integration/{test_file}"]
    if keyword:
        base += ["-k", keyword]
    if not reruns:
        # Celery's @flaky reruns a failing test up to 5 times; without reruns a test counts as
        # passed only if it passes at its first try, on every target alike (and a run is faster)
        base += ["-p", "no:rerunfailures"]
    logfile = out / f"{target}-{test_file}.log"
    logfile.unlink(missing_ok=True)
    t0 = time.monotonic()
    killed = False
    exit_code = None
    hung: list[str] = []
    for attempt in range(MAX_RESUMES + 1):
        results, _ = read_outcomes(outcomes)
        cmd = base + [a for n in results for a in ("--deselect", n.split("::teardown")[0])
                      if not n.endswith("::teardown")]
        how, current = _run_watched(cmd, source, env, logfile, outcomes, budget - (time.monotonic() - t0),
                                    attempt)
        exit_code = how
        if how == "budget":
            killed = True
            break
        if current is None:
            break  # pytest ended with no test left running: the file is done
        # a test hung (or pytest died under it): that test fails, the rest of the file goes on
        why = ("hung: no outcome %.0f s after its %s s timeout; its pytest process was killed and the "
               "file resumed after it" % (HANG_GRACE, current.get("timeout")) if how == "hung" else
               f"crashed: pytest exited ({how}) while it ran; the file resumed after it")
        with open(outcomes, "a") as fh:
            fh.write(json.dumps({"test": current["test"], "outcome": "failed", "detail": why,
                                 "seconds": None}) + "\n")
        hung.append(current["test"])
        log(f"  {short(current['test'])}: {why}")
    results, _ = read_outcomes(outcomes)
    return {"results": results, "seconds": time.monotonic() - t0, "killed": killed,
            "exit": exit_code if isinstance(exit_code, int) else 1, "log": str(logfile), "hung": hung}


def _run_watched(cmd, source, env, logfile, outcomes, budget, attempt):
    """One pytest process, watched.  Returns (how, the test left without an outcome or None):
    how = pytest's exit code, "hung" or "budget"."""
    with open(logfile, "a") as fh:
        if attempt:
            fh.write(f"\n--- resumed (run {attempt + 1}) ---\n")
            fh.flush()
        # its own process group, so a wedged run (with its worker children) is stopped whole, by its pid
        proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + max(0.0, budget)
        seen_at: dict[str, float] = {}  # nodeid -> when we first saw its "started" line
        how = None
        try:
            while how is None:
                try:
                    how = proc.wait(WATCH_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if now >= deadline:
                    how = "budget"
                    break
                results, started = read_outcomes(outcomes)
                for nodeid, rec in started.items():
                    if nodeid in results:
                        continue
                    first = seen_at.setdefault(f"{nodeid}#{rec.get('try')}", now)
                    limit = rec.get("timeout") or DEFAULT_HANG_LIMIT
                    if now - first > limit + HANG_GRACE:
                        how = "hung"
        finally:  # also when we are stopped ourselves (SIGTERM, ^C): the run and its workers go too
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            else:
                with contextlib.suppress(ProcessLookupError):  # workers a crashed pytest left behind
                    os.killpg(proc.pid, signal.SIGKILL)
    results, started = read_outcomes(outcomes)
    left = [rec for n, rec in started.items() if n not in results]
    current = left[-1] if left else None
    if how == "budget" or (isinstance(how, int) and how in (0, 1, 2, 5) and current is None):
        return how, None
    return how, current


def counts(results: dict) -> collections.Counter:
    return collections.Counter(r["outcome"] for r in results.values())


# Tests that pass on Redis and fail on brokerd for a reason that is not a gap in brokerd, each checked
# by reading the test (issue 13): shown beside the failure, so a new gap stands out.  Keyed by the short
# test id (class::name, parameters included).
KNOWN_BROKERD_ONLY = {
    "test_chord::test_chord_on_error":
        "not applicable: reads the Redis backend's own keys (backend.get_key_for_group + ZRANGE); before "
        "that it polls res.children, which AsyncResult cached from brokerd's first ChordError if read "
        "before the failing member's worker rewrote the body's result with its errback child",
    "test_task_redis_result_backend::test_asyncresult_forget_cancels_subscription":
        "not applicable: counts the Redis backend's pub/sub channels (PUBSUB CHANNELS); brokerd's get() "
        "long-polls and subscribes to nothing",
    "test_task_redis_result_backend::test_asyncresult_get_cancels_subscription":
        "not applicable: counts the Redis backend's pub/sub channels (PUBSUB CHANNELS); brokerd's get() "
        "long-polls and subscribes to nothing",
    "test_task_replacement::test_replaced_task_nesting_level_0":
        "race in the test: it resets its flag after delay() returns; delay() waits for brokerd's durable "
        "confirm, and the in-process worker already received the task (task_received set the flag) meanwhile",
}


def known(nodeid: str) -> str:
    why = KNOWN_BROKERD_ONLY.get(short(nodeid))
    return f"  [known: {why}]" if why else ""


def short(nodeid: str) -> str:
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid


def category(detail: str) -> str:
    """A failure's first line with ids, numbers and addresses blotted out, to group alike failures."""
    d = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", detail)
    d = re.sub(r"0x[0-9a-f]+", "<addr>", d)
    d = re.sub(r"\d+(\.\d+)?", "N", d)
    return d[:140]


# ---------------------------------------------------------------- report

def report(runs: dict, files: list[str], targets: list[str], notes: dict) -> None:
    print()
    print(f"Celery {metadata.version('celery')} t/integration, per file "
          f"(p=passed f=failed e=error s=skipped xf=xfailed xp=xpassed)")
    head = f"{'file':<22}{'target':<16}" + "".join(f"{o[:2] if o[0] == 'x' else o[0]:>6}" for o in OUTCOMES)
    print(head + f"{'total':>7}{'secs':>7}  note")
    for f in files:
        for t in targets:
            run = runs.get((t, f))
            if run is None:
                print(f"{f:<22}{t:<16}  not run: {notes.get(t, '')}")
                continue
            c = counts(run["results"])
            note = "KILLED at budget" if run["killed"] else ""
            if run.get("hung"):
                note += f" {len(run['hung'])} hung/crashed, resumed after each"
            if not run["results"]:
                note += f" no test ran (pytest exit {run['exit']}): see {run['log']}"
            print(f"{f:<22}{t:<16}" + "".join(f"{c.get(o, 0):>6}" for o in OUTCOMES)
                  + f"{sum(c.values()):>7}{run['seconds']:>7.0f}  {note}")
    base = "redis"
    for t in targets:
        if t == base:
            continue
        regress = []
        for f in files:
            a, b = runs.get((base, f)), runs.get((t, f))
            if not a or not b:
                continue
            for nodeid, rec in a["results"].items():
                if rec["outcome"] in ("passed", "xpassed"):
                    other = b["results"].get(nodeid)
                    # absent and the run ended normally: not selected there (-k), not a failure
                    reached_end = not b["killed"] and b["exit"] in (0, 1, 5)  # 5: none selected
                    if (other is None and not reached_end) or (other and other["outcome"] in ("failed", "error")):
                        regress.append((f, nodeid, other))
        print()
        print(f"passes on redis, fails on {t}: {len(regress)}")
        for f, nodeid, other in regress:
            why = "not reached (run killed or crashed)" if other is None else other["detail"]
            print(f"  {short(nodeid):<60} {why}{known(nodeid) if t == 'brokerd' else ''}")
        skipped = collections.Counter()  # Redis-only tests (they ask for a redis:// backend) and the like
        for f in files:
            a, b = runs.get((base, f)), runs.get((t, f))
            if a and b:
                for nodeid, rec in b["results"].items():
                    if rec["outcome"] == "skipped" and a["results"].get(nodeid, {}).get("outcome") == "passed":
                        skipped[rec["detail"][:120]] += 1
        if skipped:
            print(f"passes on redis, skipped on {t}: {sum(skipped.values())}")
            for text, n in skipped.most_common():
                print(f"  {n:>4}  {text}")
        cats = collections.Counter()
        for f in files:
            if (t, f) in runs:
                for rec in runs[(t, f)]["results"].values():
                    if rec["outcome"] in ("failed", "error"):
                        cats[category(rec["detail"])] += 1
        if cats:
            print(f"failures on {t} by first line:")
            for text, n in cats.most_common(25):
                print(f"  {n:>4}  {text}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", default=DEFAULT_FILES, help="files of t/integration to run")
    ap.add_argument("--targets", nargs="+", choices=["redis", "brokerd", "brokerd-sdk"],
                    help="default: redis brokerd, less those --baseline brings")
    ap.add_argument("--sdk", action="store_true", help="add the brokerd-sdk target (issue 14's measure)")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression, passed through")
    ap.add_argument("--test-timeout", type=int, default=TEST_TIMEOUT, help="seconds per test")
    ap.add_argument("--file-budget", type=int, default=FILE_BUDGET, help="seconds per file and target")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "brokerd-bench")
    ap.add_argument("--out", type=Path, help="where logs and results.json go (default: a temp dir, kept)")
    ap.add_argument("--baseline", type=Path,
                    help="results.json of an earlier run: its targets are shown and compared, not rerun")
    ap.add_argument("--reruns", action="store_true",
                    help="keep Celery's @flaky reruns (up to 5 per failing test; default: first try counts)")
    ap.add_argument("--no-side-channel", action="store_true",
                    help="brokerd's backend as brokerd:// (the suite then skips its ~100 tests that check for a "
                         "redis:// backend and use Redis only as a side channel)")
    ap.add_argument("--install-deps", action="store_true", help="pip install missing Python packages")
    args = ap.parse_args(argv)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else {}
    from_baseline = {k.split("/", 1)[0] for k in baseline} - set(args.targets or ())
    targets = list(dict.fromkeys(
        (args.targets or [t for t in ("redis", "brokerd") if t not in from_baseline])
        + (["brokerd-sdk"] if args.sdk else [])))

    # a SIGTERM (timeout(1), a CI cancel) unwinds like ^C, so the servers and runs we started are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_python_deps(args.install_deps)
    source = celery_source(args.cache)
    out = args.out or Path(tempfile.mkdtemp(prefix="celery-integration-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="celery-integration-data-"))
    runs: dict = {}
    notes: dict = {}
    # e.g. the Redis figures of a run an hour ago: shown and compared, not run again
    for key, run in baseline.items():
        t, f = key.split("/", 1)
        if t in from_baseline and f in args.files:
            runs[(t, f)] = run
            if t not in targets:
                targets.append(t)
    order = ["redis", "brokerd", "brokerd-sdk"]
    targets.sort(key=order.index)
    redis = Redis(work).start()  # every target gets it: Celery's tasks.py reaches Redis directly in a few tests
    try:
        for target in targets:
            if any(t == target for t, _ in runs):
                continue  # from --baseline
            env = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis.port)}
            pythonpath: list[Path] = [ROOT]
            plugins: list[str] = []
            broker = None
            if target == "redis":
                url = f"redis://127.0.0.1:{redis.port}/0"
                env.update(TEST_BROKER=url, TEST_BACKEND=url)
            else:
                if target == "brokerd":
                    plugins, why = brokerd_registration()
                    if why:
                        notes[target] = why
                        log(why)
                        continue
                if target == "brokerd-sdk":
                    pythonpath.insert(0, BENCH / "celery_sdk_shim")  # its `celery` shadows the real one
                broker = BrokerProcess(work / f"brokerd-{target}").start()
                url = f"brokerd://{broker.address}"
                backend_url = url
                if not args.no_side_channel:
                    # brokerd's backend under a URL the suite's "Requires redis result backend." checks
                    # accept: those tests use Redis only as a side channel (bench/celery_redis_sidechannel.py)
                    backend_url = f"redis-sidechannel-brokerd://{broker.address}"
                    if target == "brokerd":
                        # Celery resolves the URL's scheme through its backend aliases: the plugin adds it
                        plugins = [*plugins, "-p", "celery_redis_sidechannel"]
                    # brokerd-sdk needs no plugin: the SDK's App keeps result_backend only for Celery's
                    # sake (results always live in brokerd), so both brokerd targets run the same tests
                env.update(TEST_BROKER=url, TEST_BACKEND=backend_url)
            try:
                for f in args.files:
                    log(f"running {f} on {target} ({url})")
                    runs[(target, f)] = run_file(source, f, target, env, out, args.test_timeout,
                                                 args.file_budget, args.keyword, pythonpath, args.reruns, plugins)
                    c = counts(runs[(target, f)]["results"])
                    log(f"  {dict(c)} in {runs[(target, f)]['seconds']:.0f} s; log {runs[(target, f)]['log']}")
            finally:
                if broker is not None:
                    died = broker.proc.poll()  # None while it runs: a brokerd that died mid-run is a finding
                    broker.terminate()
                    # the data dir goes with `work`; brokerd's own log stays beside the results
                    (out / f"brokerd-{target}.log").write_text("\n".join(broker.log) + "\n")
                    if died is not None:
                        notes[target] = (f"brokerd exited with code {died} during the run; its log: "
                                         f"{out / f'brokerd-{target}.log'}")
                        log(notes[target])
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(runs, args.files, targets, notes)
    (out / "results.json").write_text(json.dumps(
        {f"{t}/{f}": r for (t, f), r in runs.items()}, indent=1))
    cmd = shlex.join(["python", "bench/celery_integration.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"\nreproduce: {cmd}   (logs and results.json in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
