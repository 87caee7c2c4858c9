"""``brokerd``: argv, environment and config file → Config → run the server.

Exit codes (named so scripts and systemd can tell them apart):
  0 EXIT_OK        stopped cleanly (SIGTERM/SIGINT)
  2 EXIT_USAGE     a flag, environment variable or config value is wrong
  3 EXIT_DATA      the data directory is locked, unreadable or its log is corrupt
  4 EXIT_NETWORK   the address cannot be bound (in use, not ours)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from broker import __version__, notify
from broker.config import (
    FD_RESERVE,
    MAX_CONNECTIONS_AUTO,
    MEMORY_CLEAR_RATIO,
    MEMORY_DEFAULT_FRACTION,
    Config,
    ConfigError,
    load,
)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_NETWORK = 4

log = logging.getLogger("brokerd")


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="brokerd",
        description="brokerd: a task-queue broker. Every flag can also be set as BROKERD_<NAME> "
        "in the environment or as <name> in a TOML file given with --config.",
    )
    p.add_argument("--version", action="version", version=f"brokerd {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (flags and BROKERD_* override it)")
    p.add_argument("--host", help=f"address to listen on (default {d.host})")
    p.add_argument("--port", help=f"TCP port for the protocol and admin text (default {d.port}; 0 picks a free one)")
    p.add_argument("--http-port", dest="http_port", help=f"TCP port for HTTP: /metrics, /api/queues, /healthz, /readyz (default {d.http_port}; 0 picks a free one)")
    p.add_argument("--data-dir", dest="data_dir", help=f"directory for the write-ahead log (default {d.data_dir})")
    p.add_argument("--max-frame", dest="max_frame", help=f"largest frame in bytes (default {d.max_frame})")
    p.add_argument("--heartbeat", help=f"seconds between heartbeats; 0 turns them off (default {d.heartbeat:g})")
    p.add_argument("--handshake-timeout", dest="handshake_timeout", help=f"seconds a new connection has to send its preamble and HELLO (default {d.handshake_timeout:g})")
    p.add_argument("--idle-timeout", dest="idle_timeout", help=f"seconds of silence after which an admin text connection, or a binary one without heartbeats, is closed (default {d.idle_timeout:g})")
    p.add_argument("--max-connections", dest="max_connections", help=f"open connections before new ones are refused with TOO_MANY_CONNECTIONS (default 0: min({MAX_CONNECTIONS_AUTO}, the fd limit minus {FD_RESERVE}))")
    p.add_argument("--max-input-buffer", dest="max_input_buffer", help=f"bytes of partial frames held across all connections; past it the largest are closed with INPUT_LIMIT (default {d.max_input_buffer}; at least --max-frame)")
    p.add_argument("--max-memory", dest="max_memory", help=f"resident bytes past which publishes get MEMORY_LIMIT until memory falls {100 - MEMORY_CLEAR_RATIO * 100:g}%% below it; 0 turns it off (default {MEMORY_DEFAULT_FRACTION * 100:g}%% of the machine's memory)")
    p.add_argument("--output-buffer", dest="output_buffer", help=f"bytes of unsent output per connection before back-pressure (default {d.output_buffer})")
    p.add_argument("--fsync", help=f"when to fsync the log: always, interval or never (default {d.fsync})")
    p.add_argument("--fsync-interval-ms", dest="fsync_interval_ms", help=f"with --fsync interval, milliseconds between fsyncs (default {d.fsync_interval_ms})")
    p.add_argument("--segment-bytes", dest="segment_bytes", help=f"log segment size before rotation (default {d.segment_bytes})")
    p.add_argument("--repair", action="store_const", const="true", help="drop only the parts of a damaged log that cannot be read (keeps every later valid record) and list what was dropped")
    p.add_argument("--result-ttl", dest="result_ttl", help=f"seconds a task result is kept (default {d.result_ttl:g})")
    p.add_argument("--log-level", dest="log_level", help=f"debug, info, warning or error (default {d.log_level})")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    try:
        config = load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"brokerd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    raise_fd_limit()
    try:
        return trio.run(run, config)
    except KeyboardInterrupt:
        return EXIT_OK


async def run(config: Config) -> int:
    try:
        server = await open_server(config)
    except DataDirError as exc:
        log.error("%s", exc)
        return EXIT_DATA
    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(server.serve)
            except OSError as exc:  # exc.filename names the HTTP address when that one failed
                where = exc.filename or f"{config.host}:{config.port}"
                log.error("cannot listen on %s: %s", where, exc.strerror or exc)
                return EXIT_NETWORK
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    await server.stop()
                    break
    finally:
        pass
    log.info("brokerd stopped")
    return EXIT_OK


class _RepairWitness:
    """Under --repair: name the messages whose publish the repair dropped.

    The dropped bytes cannot be read, but later records still name what they
    refer to: a delivery, ack, requeue... of a message seq that was never
    published in the surviving log and is newer than every message published
    before the first dropped lsn (seqs only grow) lost its publish to the repair.
    """

    def __init__(self) -> None:
        self.known: dict[int, int] = {}  # seq -> lsn of its first full record
        self.refs: list[tuple[int, int]] = []  # (lsn, seq) of references

    def watch(self, records):
        import cbor2

        from broker.state import records as R

        full = (R.PUBLISH, R.MESSAGE)
        moved = (R.DEAD, R.MOVE)
        lists = (R.DELIVER, R.ACK)
        firsts = (R.REQUEUE, R.DROP)
        for r in records:
            yield r
            t = r.type
            if t not in full and t not in moved and t not in lists and t not in firsts and t != R.EXPIRE:
                continue
            try:
                p = cbor2.loads(r.payload)
                if t in full:
                    self.known.setdefault(p[0], r.lsn)
                elif t in moved:
                    self.refs.append((r.lsn, p[0]))
                    self.known.setdefault(p[1][0], r.lsn)
                elif t in lists:
                    for seq in p if type(p) is list else (p,):
                        self.refs.append((r.lsn, seq))
                elif t in firsts:
                    self.refs.append((r.lsn, p[0]))
                else:
                    self.refs.append((r.lsn, p))
            except Exception:  # a record the state cannot read fails the replay itself
                continue

    def report(self, rec) -> None:
        firsts = [d.first_lsn for d in rec.dropped if d.first_lsn is not None]
        ranges = ", ".join(
            f"{d.first_lsn}..{'' if d.last_lsn is None else d.last_lsn}"
            for d in rec.dropped if d.records != 0 and d.first_lsn is not None
        )
        unreadable = [d.segment for d in rec.dropped if d.first_lsn is None]
        if unreadable:
            ranges += ("; " if ranges else "") + "unreadable file(s) moved aside: " + ", ".join(unreadable)
        nbytes = sum(d.nbytes for d in rec.dropped)
        count = f"{rec.dropped_records}" if rec.dropped_records_exact else f"at least {rec.dropped_records}"
        log.warning(
            "repair dropped %s log record(s) (%d bytes): lsns %s; every later valid record was kept",
            count, nbytes, ranges or "none",
        )
        if not firsts:
            return
        first = min(firsts)
        newest_before = max((seq for seq, lsn in self.known.items() if lsn < first), default=0)
        lost: dict[int, int] = {}
        for lsn, seq in self.refs:
            if type(seq) is int and seq > newest_before and seq not in self.known:
                lost.setdefault(seq, lsn)
        if lost:
            shown = ", ".join(f"seq {seq} (referred to at lsn {lsn})" for seq, lsn in sorted(lost.items())[:50])
            more = f" and {len(lost) - 50} more" if len(lost) > 50 else ""
            log.warning(
                "repair: the publish of %d message(s) was dropped; later records still refer to them, "
                "so they are gone: %s%s", len(lost), shown, more,
            )


def raise_fd_limit() -> None:
    """Lift the soft descriptor limit to the hard one (as Go's runtime does).

    The soft limit is often 1024 while the hard one is far higher; the
    automatic max_connections is computed from the soft limit afterwards.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20), hard))
    except (ImportError, OSError, ValueError) as exc:
        log.debug("could not raise the descriptor limit: %s", exc)


class DataDirError(Exception):
    """The data directory cannot be used: locked, corrupt, unreadable."""


async def open_server(config: Config):
    """Open the write-ahead log, replay it into a fresh state, build the server."""
    import gc
    import os
    import time

    import cbor2

    from broker.durability import Durability
    from broker.server import Server
    from broker.state import BrokerState
    from broker.wal import CorruptLog, WalError, WriteAheadLog

    try:
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"cannot create data directory {config.data_dir!r}: {exc.strerror}") from None
    wal = WriteAheadLog(
        config.data_dir,
        # Under "always", Durability fsyncs itself after each write, so that
        # deliveries can go out between the write and the fsync.
        fsync="never" if config.fsync == "always" else config.fsync,
        fsync_interval_ms=config.fsync_interval_ms,
        segment_bytes=config.segment_bytes,
    )
    state = BrokerState(boot_id=format(int(time.time() * 1000) % 0xFFFFFFFF, "x"))
    loads = cbor2.loads
    # Logging is on during replay: what replay *decides* (dead-lettering a message
    # past max_attempts, firing a chord whose last result was logged but not its
    # firing) must itself be logged, or a second crash would decide it again.
    state.log_enabled = True
    state.default_result_ttl = config.result_ttl
    t0 = time.monotonic()
    # Replay allocates one long-lived object per live message; the cyclic GC
    # would rescan the growing heap again and again (~17% of a 1M-message
    # replay). Pause it, and afterwards freeze what was recovered so later full
    # collections in the running broker do not walk it either.
    gc.disable()
    try:
        records = wal.open(repair=config.repair)
        if notify.enabled():  # issue 7: tell systemd how far the replay got, and to wait for it
            segments = sum(1 for n in os.listdir(config.data_dir) if n.endswith(".wal"))
            notify.notify(
                f"STATUS=recovering: replaying {segments} log segments in {config.data_dir}",
                f"EXTEND_TIMEOUT_USEC={notify.usec(notify.REPLAY_EXTEND)}",
            )
            records = notify.replay_progress(records, segments, time.monotonic)
        seen = _RepairWitness() if config.repair else None
        if seen is not None:
            records = seen.watch(records)
        replayed = state.replay(((r.lsn, r.type, loads(r.payload)) for r in records), time.time())
        # A repair (or a deleted half-created segment) can leave the log's next
        # lsn past the last replayed record: the state numbers records the same way.
        state.last_lsn = max(state.last_lsn, wal.next_lsn - 1 + len(state.records))
    except CorruptLog as exc:
        raise DataDirError(f"{exc}") from None
    except WalError as exc:
        raise DataDirError(f"{exc}") from None
    except OSError as exc:
        raise DataDirError(f"cannot read the log in {config.data_dir!r}: {exc}") from None
    finally:
        gc.enable()
    gc.freeze()
    rec = wal.recovery
    if seen is not None and rec is not None and rec.repaired:
        seen.report(rec)
    stats = state.statistics()
    log.info(
        "recovered %d log records from %d segments in %.3fs: %d queues, %d ready, %d delayed%s",
        replayed, rec.segments if rec else 0, time.monotonic() - t0, stats.queues, stats.ready, stats.delayed,
        f"; truncated a torn tail of {rec.truncated_bytes} bytes" if rec and rec.truncated_bytes else "",
    )
    durability = Durability(wal, state, config)
    # Replay may have decided things (dead-lettering in-flight messages past
    # max_attempts); log them before serving.
    leftover = state.take_records()
    if leftover:
        durability.submit(leftover, {}, lambda box: None)
    return Server(config, state, durability)
