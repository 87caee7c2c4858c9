"""``brokerd-ctl``: run brokerd's admin commands and remote control of workers from a shell.

    brokerd-ctl ping                             # exit 0 when brokerd answers (a health check)
    brokerd-ctl -b 10.0.0.5:7700 queues
    brokerd-ctl --json queue emails | jq .ready
    brokerd-ctl purge emails
    brokerd-ctl inspect active
    brokerd-ctl control pool-grow 2
    brokerd-ctl events                           # streams until Ctrl-C
    python -m client.ctl workers

Output: for people, the admin text brokerd writes (protocol.md §7), without its closing
``END``; with ``--json``, the result of the binary operation (protocol.md §5), as JSON (one
JSON object per line for ``events``).  Errors go to stderr as ``brokerd-ctl: CODE: message``.

Exit codes: 0 done; 1 brokerd refused or failed (an error code, unreachable, no worker
replied); 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading

from client.options import redact

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_BROKER = "127.0.0.1:7700"
CONTROL_TIMEOUT = 1.0  # seconds brokerd waits for the workers' replies (Celery's default)


class Failed(Exception):
    """The command failed: the message says why; exit 1."""


# -- output ---------------------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, (bytes, bytearray)):
        return {"$bytes": bytes(o).hex()}
    return repr(o)


def dump_json(obj, out=None, indent=2) -> None:
    out = out or sys.stdout
    out.write(json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False) + "\n")
    out.flush()


def print_admin(text: str) -> None:
    """An admin reply as brokerd wrote it, less the closing END and with plain newlines."""
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    if len(lines) > 1 and lines[-1] == "END":
        lines.pop()
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def parse_table(text: str) -> list[dict]:
    """The table of a multi-line admin reply as dicts (columns are separated by 2+ spaces;
    the last column may hold single spaces)."""
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")[1:]
    if lines and lines[-1] == "END":
        lines.pop()
    if not lines:
        return []
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = []
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=len(header) - 1)
        row = {}
        for k, v in zip(header, cells + [""] * (len(header) - len(cells))):
            row[k.lower()] = _typed(v)
        rows.append(row)
    return rows


def _typed(v: str):
    if v == "-":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


# -- the commands -------------------------------------------------------------------------------
def _client(args):
    from client.errors import BrokerdError
    from client.producer import Client

    try:
        # reconnect=0: one command, one connection; a list finds the group's leader
        return Client(args.broker, name="brokerd-ctl", timeout=args.timeout, heartbeat=0, reconnect=0)
    except (BrokerdError, OSError) as exc:
        raise Failed(f"cannot reach brokerd at {redact(args.broker)}: {exc}") from None


def _admin(c, line: str) -> str:
    return c.admin(line)


def cmd_ping(c, args):
    seconds = c.ping()
    if args.json:
        dump_json({"ok": True, "seconds": seconds, "server": c.server_info.get("server")})
    else:
        print(f"OK brokerd at {redact(args.broker)} answered in {seconds * 1000:.2f} ms")


def cmd_stats(c, args):
    if args.json:
        dump_json(c.stats())
    else:
        print_admin(_admin(c, "STATS"))


def cmd_queues(c, args):
    if args.json:
        dump_json(c.stats()["queues"])
    else:
        print_admin(_admin(c, "QUEUES"))


def cmd_queue(c, args):
    if args.json:
        dump_json(c.stats(args.name))
    else:
        print_admin(_admin(c, f"QUEUE {args.name}"))


def cmd_purge(c, args):
    if args.json:
        dump_json({"queue": args.name, "purged": c.purge(args.name)})
    else:
        print_admin(_admin(c, f"PURGE {args.name}"))


def cmd_pause(c, args):
    if args.json:
        c.pause(args.name)
        dump_json({"queue": args.name, "paused": True})
    else:
        print_admin(_admin(c, f"PAUSE {args.name}"))


def cmd_resume(c, args):
    if args.json:
        c.resume(args.name)
        dump_json({"queue": args.name, "paused": False})
    else:
        print_admin(_admin(c, f"RESUME {args.name}"))


def cmd_dead(c, args):
    text = _admin(c, f"DEAD {args.name} {args.n}")
    if args.json:
        dump_json({"queue": args.name, "dead_letters": parse_table(text)})
    else:
        print_admin(text)


def cmd_requeue_dead(c, args):
    text = _admin(c, f"REQUEUE-DEAD {args.name}")
    if args.json:
        m = re.search(r"requeued (\d+)", text)
        dump_json({"queue": args.name, "requeued": int(m.group(1)) if m else None})
    else:
        print_admin(text)


def cmd_result(c, args):
    if args.json:
        dump_json(c.get_result(args.id))
    else:
        print_admin(_admin(c, f"RESULT {args.id}"))


def cmd_revoke(c, args):
    n = c.revoke([args.id], terminate=args.terminate)
    if args.json:
        dump_json({"id": args.id, "revoked": n, "terminate": args.terminate})
    else:
        print(f"OK revoked {args.id}" + (" (running copies told to terminate)" if args.terminate else ""))


def cmd_rate_limit(c, args):
    """Without a limit: every rate and cap brokerd enforces (RATES); with one, set it (RATE_LIMIT)."""
    if args.name is None:
        text = _admin(c, "RATES")
        if args.json:
            dump_json(parse_table(text))
        else:
            print_admin(text)
        return
    if args.limit is None:
        raise Failed("rate-limit NAME needs a LIMIT: 10/s, 100/m, 1000/h, or 0 to lift it")
    out = c.rate_limit(args.name, args.limit, queue=args.queue)
    if args.json:
        dump_json(out)
    else:
        print(f"OK {out['kind']} {out['name']} limited to {out['limit'] or 'nothing (no limit)'}"
              f" (was {out['previous'] or 'no limit'})")


def cmd_promote(c, args):
    """Make the follower at --broker/--url the leader (protocol.md §5.45): a manual failover."""
    reason = " ".join(args.reason) or "brokerd-ctl promote"
    text = _admin(c, f"PROMOTE {reason}")
    if args.json:
        words = text.split()
        dump_json({"role": "leader", "epoch": int(words[-1]) if words and words[-1].isdigit() else None})
    else:
        print_admin(text)


def cmd_schedules(c, args):
    if args.json:
        dump_json(c.schedule_list())
    else:
        print_admin(_admin(c, "SCHEDULES"))


def cmd_workers(c, args):
    if args.json:
        dump_json(c.workers())
    else:
        print_admin(_admin(c, "WORKERS"))


def cmd_task(c, args):
    if args.json:
        info = c.task_info(args.id)
        dump_json(info if info is not None else {"id": args.id, "state": "PENDING", "events": []})
    else:
        print_admin(_admin(c, f"TASK {args.id}"))


def cmd_events(args) -> int:
    """Stream events until Ctrl-C (or until brokerd goes away: exit 1)."""
    if args.json:
        from client.errors import BrokerdError

        c = _client(args)
        gone = threading.Event()
        lock = threading.Lock()

        def show(events, dropped):
            with lock:
                if dropped:
                    dump_json({"dropped": dropped}, indent=None)
                for ev in events:
                    dump_json(ev, indent=None)

        try:
            c.subscribe_events(show, replay=args.replay)
            while not gone.wait(0.5):
                if not c.is_open:
                    raise Failed("the connection to brokerd was lost")
        except KeyboardInterrupt:
            return EXIT_OK
        except BrokerdError as exc:
            raise Failed(_error_text(exc)) from None
        finally:
            c.close(timeout=1)
    from client.options import MAX_REDIRECTS, broker_url, parse_leader

    url = broker_url(args.broker)
    order = list(url.addresses)  # a replica group: the first reachable, then the leader it names
    errors = []
    while order:
        host, port = order.pop(0)
        try:
            sock = socket.create_connection((host, port), timeout=args.timeout)
            if url.tls:  # brokerds://: the admin text of EVENTS inside TLS
                from client.tls import context

                sock = context(url).wrap_socket(sock, server_hostname=host)
        except OSError as exc:  # ssl.SSLError is an OSError
            errors.append(f"{host}:{port}: {exc}")
            continue
        sock.settimeout(None)
        sock.sendall(f"EVENTS {args.replay}\n".encode())
        f = sock.makefile("rb")
        first = f.readline().decode("utf-8", "replace").rstrip("\r\n")
        if first.startswith("ERR NOT_LEADER") and len(errors) < MAX_REDIRECTS:
            sock.close()
            errors.append(f"{host}:{port}: a follower")
            order.insert(0, parse_leader(first))
            continue
        break
    else:
        raise Failed(f"cannot reach brokerd at {url}: {'; '.join(errors)}")
    try:
        if not first.startswith("OK"):
            raise Failed(first.removeprefix("ERR ") or "brokerd closed the connection")
        for raw in f:
            sys.stdout.write(raw.decode("utf-8", "replace").rstrip("\r\n") + "\n")
            sys.stdout.flush()
        raise Failed("brokerd closed the connection")
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        sock.close()


def _replies_or_fail(replies: dict, args) -> dict:
    if not replies:
        raise Failed(f"no worker replied within {args.control_timeout:g} s (WORKERS lists the ones brokerd knows)")
    return replies


def cmd_inspect(c, args):
    replies = _replies_or_fail(c.control(args.what, None, timeout=args.control_timeout,
                                         destination=args.destination), args)
    if args.json:
        dump_json(replies)
        return
    for host, reply in sorted(replies.items()):
        if isinstance(reply, dict) and "error" in reply:
            print(f"-> {host}: ERROR {reply['error']}")
        elif args.what == "ping":
            print(f"-> {host}: {reply.get('ok', reply) if isinstance(reply, dict) else reply}")
        elif args.what == "active":
            print(f"-> {host}: {len(reply)} active task{'s' if len(reply) != 1 else ''}")
            for t in reply:
                print(f"    * {t.get('id')}  {t.get('name')}{t.get('args')}  pid {t.get('worker_pid')}")
        elif args.what == "registered":
            print(f"-> {host}: {len(reply)} registered task{'s' if len(reply) != 1 else ''}")
            for name in reply:
                print(f"    * {name}")
        else:
            print(f"-> {host}:")
            for line in json.dumps(reply, indent=2, default=_json_default).splitlines():
                print("    " + line)


CONTROLS = {"pool-grow": "pool_grow", "pool-shrink": "pool_shrink", "shutdown": "shutdown"}


def cmd_control(c, args):
    command = CONTROLS[args.what]
    cargs = {"n": args.n} if command != "shutdown" else None
    replies = _replies_or_fail(c.control(command, cargs, timeout=args.control_timeout,
                                         destination=args.destination), args)
    if args.json:
        dump_json(replies)
        return
    failed = False
    for host, reply in sorted(replies.items()):
        if isinstance(reply, dict) and "error" in reply:
            failed = True
            print(f"-> {host}: ERROR {reply['error']}")
        else:
            print(f"-> {host}: {reply.get('ok', reply) if isinstance(reply, dict) else reply}")
    if failed:
        raise Failed("a worker refused the command")


class UsageError(Exception):
    pass


def _positive(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (got {text!r})") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def _seconds(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds (got {text!r})") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 (got {text!r})")
    return v


def cmd_user(args) -> int:
    """``user add NAME --users-file F --grant KIND=GLOBS``: a new user in brokerd's users file.

    Works on the file, not through brokerd (the hashing and the writer are client.userfile's,
    shared with brokerd); brokerd reads the file when it starts.  Prints the token once: only
    its hash is stored.
    """
    from client.userfile import AuthError, add_user, parse_grant_args

    path = args.users_file or os.environ.get("BROKERD_USERS_FILE")
    if not path:
        raise UsageError("user add needs --users-file FILE (or BROKERD_USERS_FILE)")
    try:
        grants = parse_grant_args(args.grant or [])
        if not grants:
            raise UsageError("user add needs at least one --grant KIND=GLOB[,GLOB...], e.g. --grant publish=emails")
        token = add_user(path, args.name, grants)
    except AuthError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise Failed(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"# user {args.name} added to {path}; restart brokerd to load it. The token is shown only this once:",
          file=sys.stderr)
    print(token)
    print(f"# connect with brokerd://{args.name}:<token>@HOST:PORT", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="brokerd-ctl",
        description="Admin commands and remote control of workers, for brokerd.",
        epilog="Exit codes: 0 done, 1 brokerd refused or is unreachable (or no worker replied), 2 usage error.",
    )
    ap.add_argument("-b", "--broker", default=os.environ.get("BROKERD_URL") or os.environ.get("BROKERD_BROKER", DEFAULT_BROKER),
                    metavar="URL", help=f"brokerd://[user:token@]host:port, brokerds://...?ca=FILE for TLS, or HOST:PORT "
                    f"(default $BROKERD_URL, $BROKERD_BROKER or {DEFAULT_BROKER})")
    ap.add_argument("--json", action="store_true", help="machine-readable JSON instead of the admin text")
    ap.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                    help="seconds to wait for brokerd to connect and answer (default 10)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, fn, help, *args):
        p = sub.add_parser(name, help=help, description=help)
        for a in args:
            p.add_argument(a, metavar=a.upper())
        p.set_defaults(fn=fn)
        return p

    add("ping", cmd_ping, "is brokerd there? exit 0 when it answers, 1 when not")
    add("stats", cmd_stats, "broker-wide figures")
    add("queues", cmd_queues, "every queue with its depth")
    add("queue", cmd_queue, "one queue: depth, counters, options", "name")
    add("purge", cmd_purge, "drop every ready and delayed message of a queue", "name")
    add("pause", cmd_pause, "stop delivering from a queue", "name")
    add("resume", cmd_resume, "start delivering from a queue again", "name")
    p = add("dead", cmd_dead, "the first messages of a queue's dead-letter queue", "name")
    p.add_argument("n", nargs="?", type=_positive, default=10, metavar="N", help="how many (default 10)")
    add("requeue-dead", cmd_requeue_dead, "move a queue's dead letters back to it", "name")
    add("result", cmd_result, "a task's stored result", "id")
    p = add("revoke", cmd_revoke, "never run a task (kept a day, across restarts)", "id")
    p.add_argument("--terminate", action="store_true", help="also stop it where it runs")
    p = add("rate-limit", cmd_rate_limit, "show every rate limit and cap, or set a task's (or queue's) rate live")
    p.add_argument("name", nargs="?", metavar="NAME", help="a task name (or a queue with --queue)")
    p.add_argument("limit", nargs="?", metavar="LIMIT", help="10/s, 100/m, 1000/h; 0 lifts the limit")
    p.add_argument("--queue", action="store_true", help="NAME is a queue: limit every message of it")
    p = add("promote", cmd_promote, "make this follower the leader (epoch + 1): a manual failover; then restart "
            "the old leader with --follow this one")
    p.add_argument("--url", dest="broker", default=argparse.SUPPRESS, metavar="URL",
                   help="the follower to promote (the same as --broker)")
    p.add_argument("reason", nargs="*", metavar="REASON", help="why, for the brokerds' logs")
    add("schedules", cmd_schedules, "every periodic schedule")
    add("workers", cmd_workers, "every worker brokerd has heard of, with its state")
    add("task", cmd_task, "a task's state, args, result or traceback, and timeline of events", "id")
    p = add("events", None, "stream events as they happen, until Ctrl-C")
    p.add_argument("--replay", type=int, default=0, metavar="N", help="show the last N events first")
    p = add("inspect", cmd_inspect, "ask the workers: active, registered, stats or ping")
    p.add_argument("what", choices=("active", "registered", "stats", "ping"))
    p = add("control", cmd_control, "change the workers: pool-grow N, pool-shrink N or shutdown (warm)")
    p.add_argument("what", choices=tuple(CONTROLS))
    p.add_argument("n", nargs="?", type=_positive, metavar="N")
    p = add("user", cmd_user, "manage brokerd's users file")
    usub = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    pa = usub.add_parser("add", help="add a user with grants and print its token once",
                         description="add a user with grants and print its token once")
    pa.add_argument("name", metavar="NAME")
    pa.add_argument("--users-file", dest="users_file", metavar="FILE", help="the users file (default $BROKERD_USERS_FILE)")
    pa.add_argument("--grant", action="append", metavar="KIND=GLOB[,GLOB...]",
                    help="a grant, repeatable: publish, consume, manage, results-read, results-write, schedules, "
                         "control or admin, with queue-name globs")
    for p in (sub.choices["inspect"], sub.choices["control"]):
        p.add_argument("-d", "--destination", action="append", metavar="WORKER",
                       help="only this worker (repeat for several; default: every live worker)")
        p.add_argument("--control-timeout", type=_seconds, default=CONTROL_TIMEOUT, metavar="SECONDS",
                       help=f"how long brokerd waits for the workers' replies (default {CONTROL_TIMEOUT:g})")
    return ap


def _error_text(exc) -> str:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"{code}: {message}" if code else message


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    from client.errors import BrokerdError

    try:
        if args.command == "control":
            if args.what != "shutdown" and args.n is None:
                raise UsageError(f"control {args.what} needs N, the number of pool slots")
            if args.what == "shutdown" and args.n is not None:
                raise UsageError("control shutdown takes no N")
        if args.command == "events":
            return cmd_events(args)
        if args.command == "user":
            return cmd_user(args)
        c = _client(args)
        try:
            args.fn(c, args)
        finally:
            c.close(timeout=2)
    except UsageError as exc:
        ap.print_usage(sys.stderr)
        print(f"brokerd-ctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Failed as exc:
        print(f"brokerd-ctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokerdError as exc:
        print(f"brokerd-ctl: {_error_text(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `brokerd-ctl events | head`
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
