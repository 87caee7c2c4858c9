"""``brokerd-worker``: run a worker for an app, from a shell.

    brokerd-worker proj.tasks:app -Q high,low -c 8
    brokerd-worker proj.tasks --pool threads -c 50 -b 10.0.0.5:7700
    python -m client.worker_cli proj.tasks:app --pool trio
    brokerd-worker proj.tasks --autoscale 8,2 --max-memory-per-child 200000 --no-task-events
    brokerd-worker -A proj worker -l INFO -B --pidfile /run/w.pid    # Celery's service-file form

Celery's worker flags are all accepted: each is implemented (``-A``, ``-B``, ``-P solo``,
``--pidfile``, ``--logfile``, ``--detach``, ``--purge``, ``--include``, ``--uid/--gid``) or, where it
has nothing to do in brokerd, accepted with one log line saying why (``-O fair``, ``--without-gossip``,
``--without-mingle``, ``--without-heartbeat``, ``-s/--schedule``, ``--statedb``).

Exit codes (named below): 0 after a warm stop, 2 for a usage error (bad flag, app not
importable), 3 when brokerd cannot be reached at start, 4 after a cold stop, 1 for a bug.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback

from client.errors import BadRequest

log = logging.getLogger("brokerd.worker")

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
    if t in ("solo", "gevent", "eventlet"):
        return t  # Celery's; mapped in main() with a log line
    if t not in ("processes", "threads", "trio"):
        raise argparse.ArgumentTypeError(f"--pool must be processes, threads or trio (or Celery's prefork, solo, "
                                         f"gevent, eventlet) (got {text!r})")
    return t


def _optimization(text):
    if text not in ("fair", "default"):
        raise argparse.ArgumentTypeError(f"-O takes fair or default (got {text!r})")
    return text


def _modules(text):
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--include takes module names separated by commas (got {text!r})")
    return names


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="brokerd-worker",
        description="Run tasks of a brokerd app: consume its queues, run each task, store its result.",
        epilog="Exit codes: 0 stopped, 2 usage error, 3 brokerd unreachable at start, 4 cold stop.",
    )
    ap.add_argument("app", metavar="MODULE[:APP]", nargs="?",
                    help="the module that defines your App, and its attribute name (default: 'app', or the module's only App)")
    ap.add_argument("-A", "--app", dest="app_option", metavar="MODULE[:APP]",
                    help="Celery's spelling of MODULE[:APP]; 'proj' also finds proj.celery or proj.app, as Celery does")
    ap.add_argument("-Q", "--queues", type=_queues, metavar="Q1,Q2",
                    help="queues to consume, in preference order (default: the app's task_default_queue)")
    ap.add_argument("-c", "--concurrency", type=_positive_int("-c/--concurrency"), metavar="N",
                    help="tasks run at once (default: CPU count for processes, 10 threads, 100 for trio)")
    ap.add_argument("-P", "--pool", type=_pool, default="processes",
                    help="processes (default), threads, or trio (async def tasks on one event loop)")
    ap.add_argument("--prefetch-multiplier", type=_positive_int("--prefetch-multiplier"), metavar="M",
                    help="fixed prefetch credit = concurrency x M (default: adaptive, concurrency to concurrency x 64)")
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
    # Celery's flags (see the module docstring)
    celery = ap.add_argument_group("Celery's worker flags")
    celery.add_argument("-B", "--beat", action="store_true",
                        help="push the app's periodic tasks to brokerd at start (brokerd runs the schedule)")
    celery.add_argument("-s", "--schedule", metavar="FILE", help="accepted, unused: the schedule lives in brokerd")
    celery.add_argument("-S", "--scheduler", metavar="CLASS", help="accepted, unused: the schedule lives in brokerd")
    celery.add_argument("-O", dest="optimization", type=_optimization, metavar="fair",
                        help="accepted: brokerd already gives a task only to a free slot (prefetch credits)")
    celery.add_argument("--pidfile", metavar="FILE", help="write the worker's pid here; refuse to start if a live "
                        "worker's pid is in it; removed at exit")
    celery.add_argument("-f", "--logfile", metavar="FILE", help="append the log (and the tasks' stdout/stderr) to FILE")
    celery.add_argument("-D", "--detach", action="store_true",
                        help="run in the background (a daemon): use with --pidfile and --logfile")
    celery.add_argument("--purge", "--discard", dest="purge", action="store_true",
                        help="drop every waiting task of the worker's queues before consuming")
    celery.add_argument("-I", "--include", type=_modules, action="append", metavar="MOD1,MOD2",
                        help="import these modules (task modules) at start")
    celery.add_argument("--statedb", metavar="FILE", help="accepted, unused: brokerd keeps revokes across restarts")
    celery.add_argument("--without-gossip", action="store_true", help="accepted: workers do not gossip here")
    celery.add_argument("--without-mingle", action="store_true", help="accepted: workers do not mingle here")
    celery.add_argument("--without-heartbeat", action="store_true",
                        help="accepted: heartbeats keep this worker shown online in brokerd, so they stay")
    celery.add_argument("--uid", metavar="USER", help="run as this user (the worker must start as root)")
    celery.add_argument("--gid", metavar="GROUP", help="run as this group (the worker must start as root)")
    return ap


def _drop_privileges(uid, gid) -> None:
    """--uid/--gid: become that user/group (from root), or check we already are."""
    if uid is None and gid is None:
        return
    import grp  # lazy import: POSIX only, and only these flags need them
    import pwd

    def lookup(value, db, what):
        try:
            return int(value)
        except ValueError:
            try:
                return (db.getpwnam(value).pw_uid if db is pwd else db.getgrnam(value).gr_gid)
            except KeyError:
                raise UsageError(f"--{what} {value!r}: no such {'user' if what == 'uid' else 'group'}") from None

    want_gid = lookup(gid, grp, "gid") if gid is not None else None
    want_uid = lookup(uid, pwd, "uid") if uid is not None else None
    if os.geteuid() == 0:
        if want_gid is not None:
            os.setgid(want_gid)
        elif want_uid is not None:
            os.setgid(pwd.getpwuid(want_uid).pw_gid)
        if want_uid is not None:
            os.setuid(want_uid)
        return
    if (want_uid is not None and want_uid != os.geteuid()) or (want_gid is not None and want_gid != os.getegid()):
        raise UsageError("--uid/--gid need the worker to start as root (it is not); start it as root, or as the "
                         "user itself without these flags")


def _check_pidfile(path: str) -> None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"--pidfile {path}: {exc}") from None
    try:
        pid = int(text)
    except ValueError:
        return  # garbage: a stale file we may overwrite
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # stale: that process is gone
    except PermissionError:
        pass
    raise UsageError(f"--pidfile {path}: process {pid} (another worker?) is running; stop it, or remove the file "
                     f"if that pid is not a worker")


def _write_pidfile(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # a reader never sees a half-written pid


def _remove_pidfile(path: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return  # not ours (a pool child exiting, or another worker took it over)
        os.unlink(path)
    except OSError:
        pass


def _detach() -> None:
    """Become a daemon: fork twice (the parent exits 0 at once), new session, stdin from /dev/null."""
    if os.fork() > 0:
        os._exit(EXIT_OK)
    os.setsid()
    if os.fork() > 0:
        os._exit(EXIT_OK)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)


def _log_to(path: str) -> None:
    """Send stdout and stderr (the log, the tasks' prints, the pool children's) to FILE, appended."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


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
    for name in ("app", "celery"):  # Celery's names for it
        obj = getattr(module, name, None)
        if isinstance(obj, App):
            return obj
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if not apps and hasattr(module, "__path__"):
        # a package (Celery's `-A proj`): its app lives in proj.celery or proj.app
        for sub in ("celery", "app"):
            try:
                submodule = importlib.import_module(f"{module_name}.{sub}")
            except ModuleNotFoundError as exc:
                if exc.name == f"{module_name}.{sub}":
                    continue
                raise UsageError(f"error while importing {module_name}.{sub}:\n{traceback.format_exc()}") from None
            except Exception:
                raise UsageError(f"error while importing {module_name}.{sub}:\n{traceback.format_exc()}") from None
            found = [v for v in vars(submodule).values() if isinstance(v, App)]
            for name in ("app", "celery"):
                if isinstance(getattr(submodule, name, None), App):
                    return getattr(submodule, name)
            if len(found) == 1:
                return found[0]
    if len(apps) == 1:
        return apps[0]
    if apps:
        names = sorted(k for k, v in vars(module).items() if isinstance(v, App))
        raise UsageError(f"{module_name!r} holds several Apps ({', '.join(names)}): name one, e.g. {module_name}:{names[0]}")
    raise UsageError(f"{module_name!r} has no attribute 'app' (and no App instance, nor {module_name}.celery or "
                     f"{module_name}.app module with one): give MODULE:APP")


def _strip_worker_word(argv: list) -> list:
    """``celery -A proj worker -l INFO`` → drop the ``worker`` sub-command word (first, or after -A X)."""
    out = list(argv)
    for i, tok in enumerate(out):
        if tok == "worker" and (i == 0 or (i >= 2 and out[i - 2] in ("-A", "--app"))
                                or (i >= 1 and out[i - 1].startswith("--app="))):
            del out[i]
            break
    return out


def main(argv=None, app=None) -> int:
    """Run a worker; ``app`` (``App.worker_main``) stands for MODULE[:APP]."""
    ap = build_parser()
    argv = _strip_worker_word(sys.argv[1:] if argv is None else argv)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # argparse printed the message
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if args.app and args.app_option:
        return _usage(ap, f"give the app once: either MODULE[:APP] ({args.app}) or -A ({args.app_option})")
    args.app = args.app or args.app_option
    if not args.app and app is None:
        return _usage(ap, "which app? give MODULE[:APP] or -A MODULE, e.g. brokerd-worker -A proj")
    notes = []  # log lines for the Celery flags that are no-ops here, written once logging is set up
    if args.pool == "solo":
        args.pool, args.concurrency = "threads", 1
        notes.append("-P solo: running one task at a time (the threads pool with one thread)")
    elif args.pool in ("gevent", "eventlet"):
        notes.append(f"-P {args.pool}: using the threads pool (-c threads) instead; async def tasks can use -P trio")
        args.pool = "threads"
    if args.optimization == "fair":
        notes.append("-O fair: nothing to do, brokerd gives a task only to a free slot (prefetch credits)")
    for flag, why in (("without_gossip", "workers do not gossip here"), ("without_mingle", "workers do not mingle here"),
                      ("without_heartbeat", "heartbeats are kept: brokerd shows the worker online by them")):
        if getattr(args, flag):
            notes.append(f"--{flag.replace('_', '-')}: accepted, {why}")
    if args.schedule or args.scheduler:
        notes.append("-s/-S: accepted, unused: periodic tasks are kept and run by brokerd")
    if args.statedb:
        notes.append("--statedb: accepted, unused: brokerd keeps revokes across restarts")
    if args.detach and not args.logfile:
        return _usage(ap, "--detach needs --logfile FILE: a detached worker has no terminal to log to")
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
        _drop_privileges(args.uid, args.gid)
    except UsageError as exc:
        return _usage(ap, str(exc))
    if app is None:
        try:
            app = load_app(args.app)
        except UsageError as exc:
            return _usage(ap, str(exc))
    if args.include:
        app.conf["include"] = [*(app.conf.get("include") or ()), *(m for group in args.include for m in group)]
    if args.pidfile:
        try:
            _check_pidfile(args.pidfile)
        except UsageError as exc:
            return _usage(ap, str(exc))
    if args.detach:
        _detach()  # the parent exits 0 here; the daemon goes on
    if args.logfile:
        try:
            _log_to(args.logfile)
        except OSError as exc:
            return _usage(ap, f"--logfile {args.logfile}: {exc}")
    if args.pidfile:
        _write_pidfile(args.pidfile)

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
    from client.worker import setup_logging

    setup_logging(args.loglevel)  # the worker sets it up too (once); the lines below need it now
    for note in notes:
        log.info("%s", note)
    try:
        app.init_worker()  # Django setup, include/autodiscover imports (the worker would do it in run())
    except ImportError:
        print(f"brokerd-worker: error while importing the app's task modules:\n{traceback.format_exc()}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.purge or args.beat:
        try:
            if args.purge:
                for q in worker.queues:
                    n = app.client.purge(q)
                    log.warning("--purge: dropped %d waiting task%s of queue %s", n, "" if n == 1 else "s", q)
            if args.beat:
                from client import beat  # lazy import: only -B needs the schedule code

                done = beat.push(app)
                log.info("-B: %d periodic task%s pushed to brokerd, which runs the schedule (no beat process "
                         "needed)", len(done["put"]), "" if len(done["put"]) == 1 else "s")
        except (ValueError, BadRequest) as exc:  # a schedule brokerd refuses: the app's to fix
            print(f"brokerd-worker: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except Exception as exc:  # noqa: BLE001 - brokerd unreachable at start
            print(f"brokerd-worker: cannot reach brokerd at start: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
    try:
        profile = os.environ.get("BROKERD_WORKER_PROFILE")  # bench/tasks.py --profile: the main loop's profile
        if profile:
            import cProfile

            # CPU time of this thread, not the wall clock: on a loaded machine the wall clock
            # charges a syscall with the time the scheduler gave the other processes
            prof = cProfile.Profile(time.thread_time)
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
    except ImportError:  # an include/autodiscover module, imported as the worker starts
        print(f"brokerd-worker: error while importing the app's task modules:\n{traceback.format_exc()}",
              file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        traceback.print_exc()
        return EXIT_INTERNAL
    finally:
        if args.pidfile:
            _remove_pidfile(args.pidfile)
    return EXIT_OK


def _usage(ap, message) -> int:
    ap.print_usage(sys.stderr)
    print(f"{ap.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
