"""``brokerd-worker``: run a worker for an app, from a shell.

    brokerd-worker proj.tasks:app -Q high,low -c 8
    brokerd-worker proj.tasks --pool threads -c 50 -b 10.0.0.5:7700
    python -m client.worker_cli proj.tasks:app --pool trio
    brokerd-worker proj.tasks --autoscale 8,2 --max-memory-per-child 200000 --no-task-events

Exit codes (named below): 0 after a warm stop, 2 for a usage error (bad flag, app not
importable), 3 when brokerd cannot be reached at start, 4 after a cold stop, 1 for a bug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_COLD_STOP = 4

LOGLEVELS = ("debug", "info", "warning", "error", "critical")


class UsageError(Exception):
    """A command-line mistake; the message says how to fix it."""


def _positive_int(flag):
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number (got {text!r})") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1 (got {n})")
        return n
    return parse


def _seconds(flag, allow_zero=False):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number of seconds (got {text!r})") from None
        if v != v or v < 0 or (v == 0 and not allow_zero) or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be a number of seconds {'>= 0' if allow_zero else '> 0'} (got {text!r})")
        return v
    return parse


def _queues(text):
    names = [q.strip() for q in text.split(",")]
    if not text.strip() or any(not q for q in names):
        raise argparse.ArgumentTypeError(f"-Q takes queue names separated by commas, e.g. -Q high,low (got {text!r})")
    seen = set()
    for q in names:
        if q in seen:
            raise argparse.ArgumentTypeError(f"queue {q!r} is listed twice in -Q")
        seen.add(q)
    return names


def _autoscale(text):
    parts = text.split(",")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = None
    if nums is None or len(nums) != 2:
        raise argparse.ArgumentTypeError(f"--autoscale takes MAX,MIN, two whole numbers such as 10,3 (got {text!r})")
    amax, amin = nums
    if amax < 1 or amin < 0:
        raise argparse.ArgumentTypeError(f"--autoscale needs MAX >= 1 and MIN >= 0 (got {text!r})")
    if amin > amax:
        raise argparse.ArgumentTypeError(f"--autoscale is MAX,MIN: MAX ({amax}) must not be below MIN ({amin})")
    return amax, amin


def _broker(text):
    from client.options import parse_address

    try:
        host, port = parse_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-b takes HOST:PORT, e.g. 127.0.0.1:7700 (got {text!r})") from None
    if not host or not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"-b takes HOST:PORT with a port from 1 to 65535 (got {text!r})")
    return text


def _loglevel(text):
    t = text.lower()
    if t == "warn":
        t = "warning"
    if t not in LOGLEVELS:
        raise argparse.ArgumentTypeError(f"--loglevel must be one of {', '.join(LOGLEVELS)} (got {text!r})")
    return t


def _pool(text):
    t = text.lower()
    if t == "prefork":  # Celery's name for it
        t = "processes"
    if t not in ("processes", "threads", "trio"):
        hint = " (use --pool threads -c 1 for one task at a time in the worker process)" if t == "solo" else ""
        raise argparse.ArgumentTypeError(f"--pool must be processes, threads or trio (got {text!r}){hint}")
    return t


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="brokerd-worker",
        description="Run tasks of a brokerd app: consume its queues, run each task, store its result.",
        epilog="Exit codes: 0 stopped, 2 usage error, 3 brokerd unreachable at start, 4 cold stop.",
    )
    ap.add_argument("app", metavar="MODULE[:APP]",
                    help="the module that defines your App, and its attribute name (default: 'app', or the module's only App)")
    ap.add_argument("-Q", "--queues", type=_queues, metavar="Q1,Q2",
                    help="queues to consume, in preference order (default: the app's task_default_queue)")
    ap.add_argument("-c", "--concurrency", type=_positive_int("-c/--concurrency"), metavar="N",
                    help="tasks run at once (default: CPU count for processes, 10 threads, 100 for trio)")
    ap.add_argument("-P", "--pool", type=_pool, default="processes",
                    help="processes (default), threads, or trio (async def tasks on one event loop)")
    ap.add_argument("--prefetch-multiplier", type=_positive_int("--prefetch-multiplier"), metavar="M",
                    help="prefetch credit = concurrency x M (default 1)")
    ap.add_argument("--max-tasks-per-child", type=_positive_int("--max-tasks-per-child"), metavar="K",
                    help="replace a pool process after it ran K tasks (processes pool)")
    ap.add_argument("--max-memory-per-child", type=_positive_int("--max-memory-per-child"), metavar="KB",
                    help="replace a pool process whose resident memory is above KB KiB after a task (processes pool)")
    ap.add_argument("--autoscale", type=_autoscale, metavar="MAX,MIN",
                    help="grow the pool up to MAX while tasks wait, shrink to MIN when idle")
    ap.add_argument("-E", "--task-events", dest="task_events", action="store_true", default=None,
                    help="send task events (received, started, succeeded...) to brokerd: the default")
    ap.add_argument("--no-task-events", dest="task_events", action="store_false",
                    help="send no task events (worker heartbeats are still sent)")
    ap.add_argument("--heartbeat-interval", type=_seconds("--heartbeat-interval"), default=2.0, metavar="SECONDS",
                    help="seconds between worker-heartbeat events (default 2); brokerd shows a worker as lost "
                         "after three missed")
    ap.add_argument("-n", "--hostname", metavar="NAME",
                    help="this worker's name in results and logs; %%h is the host name (default brokerd@%%h)")
    ap.add_argument("-l", "--loglevel", type=_loglevel, default="info", metavar="LEVEL",
                    help="debug, info (default), warning, error or critical")
    ap.add_argument("-b", "--broker", type=_broker, metavar="HOST:PORT",
                    help="brokerd address (default: the app's broker)")
    ap.add_argument("--grace", type=_seconds("--grace", allow_zero=True), default=30.0, metavar="SECONDS",
                    help="on SIGTERM, how long running tasks may take to finish (default 30)")
    ap.add_argument("--time-limit", type=_seconds("--time-limit"), metavar="SECONDS",
                    help="hard time limit for tasks without their own")
    ap.add_argument("--soft-time-limit", type=_seconds("--soft-time-limit"), metavar="SECONDS",
                    help="soft time limit for tasks without their own")
    ap.add_argument("--refuse-duplicate-name", action="store_true",
                    help="exit (code 2) if a worker with this name is already online, instead of adding the pid to it")
    ap.add_argument("--connect-timeout", type=_seconds("--connect-timeout", allow_zero=True), default=None,
                    metavar="SECONDS", help="at start, give up (exit 3) if brokerd cannot be reached this long "
                    "(default: wait for it, retrying every few seconds with a log line each time)")
    ap.add_argument("--signing-public-key", dest="signing_public_keys", action="append", type=_public_key,
                    metavar="KID=PATH", help="trust task signatures by this Ed25519 public key (PEM file); once "
                    "any is given (here or in the app's task_signing_public_keys) unsigned tasks are refused. "
                    "Repeat to trust several keys while rotating")
    return ap


def _public_key(text):
    kid, sep, path = text.partition("=")
    if not sep or not kid or not path:
        raise argparse.ArgumentTypeError(f"--signing-public-key takes KID=PATH, e.g. 3f1c0e9a7b2d4c55=/etc/brokerd/tasks.pub "
                                         f"(got {text!r}); python -m client.signing keygen prints the KID")
    return kid, path


def load_app(spec: str):
    """``MODULE:ATTR`` or ``MODULE`` → the App; UsageError with a message saying what to fix."""
    from client.app import App

    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise UsageError(f"{spec!r} names no module: give MODULE:APP, e.g. proj.tasks:app")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like python -m: the project directory is importable
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"cannot import {module_name!r}: {exc} (run from your project directory, or set PYTHONPATH)") from None
        raise UsageError(f"error while importing {module_name!r}:\n{traceback.format_exc()}") from None
    except Exception:
        raise UsageError(f"error while importing {module_name!r}:\n{traceback.format_exc()}") from None
    if attr:
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise UsageError(f"{module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not isinstance(obj, App):
            raise UsageError(f"{module_name}:{attr} is a {type(obj).__name__}, not a brokerd App")
        return obj
    obj = getattr(module, "app", None)
    if isinstance(obj, App):
        return obj
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if len(apps) == 1:
        return apps[0]
    if apps:
        names = sorted(k for k, v in vars(module).items() if isinstance(v, App))
        raise UsageError(f"{module_name!r} holds several Apps ({', '.join(names)}): name one, e.g. {module_name}:{names[0]}")
    raise UsageError(f"{module_name!r} has no attribute 'app' (and no App instance): give MODULE:APP")


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # argparse printed the message
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if args.max_tasks_per_child and args.pool != "processes":
        return _usage(ap, "--max-tasks-per-child applies to --pool processes only")
    if args.max_memory_per_child and args.pool != "processes":
        return _usage(ap, "--max-memory-per-child applies to --pool processes only")
    if args.autoscale and args.pool == "trio":
        return _usage(ap, "--autoscale applies to --pool processes or threads (the trio pool has no slots to grow)")
    if args.autoscale and args.concurrency:
        return _usage(ap, "give either -c/--concurrency or --autoscale MAX,MIN, not both")
    c = args.autoscale[0] if args.autoscale else args.concurrency
    if c and args.prefetch_multiplier and c * args.prefetch_multiplier > 65535:
        return _usage(ap, f"concurrency x --prefetch-multiplier is {c * args.prefetch_multiplier}; brokerd allows at most 65535")
    if args.hostname is not None and not args.hostname.strip():
        return _usage(ap, "-n/--hostname must not be empty")
    if args.soft_time_limit and args.time_limit and args.soft_time_limit >= args.time_limit:
        return _usage(ap, "--soft-time-limit must be below --time-limit (the soft limit warns the task first)")
    try:
        app = load_app(args.app)
    except UsageError as exc:
        return _usage(ap, str(exc))

    if args.signing_public_keys:
        keys = dict(app.conf.get("task_signing_public_keys") or {})
        keys.update(args.signing_public_keys)
        app.conf["task_signing_public_keys"] = keys

    from client.worker import BrokerUnreachable, ColdStop, DuplicateName, Worker

    try:
        worker = Worker(
            app, queues=args.queues, concurrency=args.concurrency, pool=args.pool,
            prefetch_multiplier=args.prefetch_multiplier, max_tasks_per_child=args.max_tasks_per_child,
            autoscale=args.autoscale, hostname=args.hostname, loglevel=args.loglevel, grace=args.grace,
            time_limit=args.time_limit, soft_time_limit=args.soft_time_limit, broker=args.broker,
            connect_timeout=args.connect_timeout, task_events=args.task_events,
            heartbeat_interval=args.heartbeat_interval, max_memory_per_child=args.max_memory_per_child,
            on_duplicate_name="refuse" if args.refuse_duplicate_name else "rename",
        )
    except ValueError as exc:
        return _usage(ap, str(exc))
    try:
        profile = os.environ.get("BROKERD_WORKER_PROFILE")  # bench/tasks.py --profile: the main loop's profile
        if profile:
            import cProfile

            prof = cProfile.Profile()
            try:
                prof.runcall(worker.run)
            finally:
                prof.dump_stats(profile)
        else:
            worker.run()
    except BrokerUnreachable as exc:
        print(f"brokerd-worker: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except DuplicateName as exc:
        print(f"brokerd-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ColdStop as exc:
        print(f"brokerd-worker: {exc}", file=sys.stderr)
        return EXIT_COLD_STOP
    except KeyboardInterrupt:
        return EXIT_COLD_STOP
    except Exception:
        traceback.print_exc()
        return EXIT_INTERNAL
    return EXIT_OK


def _usage(ap, message) -> int:
    ap.print_usage(sys.stderr)
    print(f"{ap.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
