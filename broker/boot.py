"""Boot: open the data directory and its log, replay it into a fresh state, build the server.

Blocking and run once, before serving: everything the daemon knows at start-up
comes from the write-ahead log in ``config.data_dir``.  ``broker.cli`` parses
the arguments and calls ``open_server``; the server it returns is started by
the trio runtime.
"""

from __future__ import annotations

import gc
import logging
import os
import time

import cbor2

from broker.config import Config
from broker.runtime import history, notify
from broker.runtime.durability import Durability
from broker.runtime.replication import Follower, LeaderReplication
from broker.runtime.history import HistoryFile
from broker.runtime.server import Server
from broker.state import BrokerState
from broker.state import log_records as R
from broker.state.replay import NotACheckpoint
from broker.wal import CorruptLog, WalError, WriteAheadLog

# The cyclic GC's first-generation threshold while serving (Python's default is 700).  Every
# request allocates a few short-lived containers (its frame, reply, records), so at the default a
# young collection ran every ~20 tasks of W2 and walked whatever had not died yet; brokerd makes
# few cycles, and a larger young generation costs at most a millisecond or two per collection.
# Measured (bench/w2_wire.py, 20,000 tasks, GC time from gc.callbacks): 0.207 CPU-s in 350
# collections at 700, 0.104 s in 43 at 5,000, 0.095-0.142 s at 20,000-50,000.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """The GC settings of a serving brokerd (after replay; bench/w2_wire.py uses them too)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)

log = logging.getLogger("brokerd")


class UsersFileError(Exception):
    """The users file cannot be read or used; the message names the file, the user and the key."""


def load_users(config: Config):
    """The configured users (broker.auth.Users), or None when ``users_file`` is not set."""
    if not config.users_file:
        return None
    from broker import auth

    try:
        with open(config.users_file, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise UsersFileError(f"users_file {config.users_file!r} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsersFileError(f"users_file {config.users_file!r} is not UTF-8 text: {exc}") from None
    try:
        users = auth.parse_users(text, f"users_file {config.users_file!r}")
    except auth.AuthError as exc:
        raise UsersFileError(str(exc)) from None
    log.info("users_file %s: %d user%s; every connection must log in", config.users_file, len(users),
             "s" if len(users) != 1 else "")
    return users


class DataDirError(Exception):
    """The data directory cannot be used: locked, corrupt, unreadable."""


def open_server(config: Config) -> Server:
    """Open the write-ahead log, replay it into a fresh state, build the server."""
    users = load_users(config)  # first: a bad users file refuses start before the log is touched
    # Said at start-up: a brokerd started from another folder with the default ./brokerd-data
    # would otherwise start empty without a word.
    where = os.path.abspath(config.data_dir)
    try:
        had_log = any(n.endswith(".wal") for n in os.listdir(config.data_dir))
    except OSError:  # absent (created below) or unreadable (the makedirs/open below names why)
        had_log = False
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
    follower = bool(config.follow)
    if not follower:  # a follower logs only what its leader sends: replay decides nothing here
        state.enable_log()
    state.default_result_ttl = config.result_ttl
    # Queued bodies may live in the log (broker/state/spill.py); the queues replay makes know
    # the size past which they do.  Nothing is read back before replay ends.  A follower's
    # standby keeps no body either: each message points at its record in the follower's own log
    # (written and fsynced before it is applied), read back only once promoted, so a standby of
    # a deep queue of big bodies does not hold them all in memory.
    state.set_body_reader(wal.read_payloads)
    if not follower:
        state.configure_spill(config.spill_body_bytes)
    t0 = time.monotonic()
    # Replay allocates one long-lived object per live message; the cyclic GC
    # would rescan the growing heap again and again (~17% of a 1M-message
    # replay). Pause it, and afterwards freeze what was recovered so later full
    # collections in the running broker do not walk it either.
    gc.disable()
    try:
        # A leader (not a follower: its replay is the leader's log, record by record) starts
        # from the newest checkpoint when there is a sound one (broker/state/replay.py).
        records = wal.open(repair=config.repair, use_checkpoint=not follower)
        if notify.enabled():  # tell systemd how far the replay got, and to wait for it
            segments = sum(1 for n in os.listdir(config.data_dir) if n.endswith(".wal"))
            notify.notify(
                f"STATUS=recovering: replaying {segments} log segments in {config.data_dir}",
                f"EXTEND_TIMEOUT_USEC={notify.usec(notify.REPLAY_EXTEND)}",
            )
            records = notify.replay_progress(records, segments, time.monotonic)
        seen = RepairWitness() if config.repair else None
        if seen is not None:
            records = seen.watch(records)
        decoded = ((r.lsn, r.type, loads(r.payload)) for r in records)
        if follower:  # a hot standby: the records applied, the messages placed only at promotion
            state.standby_begin()
            replayed = state.standby_apply(decoded, time.time())
        else:
            replayed = state.replay(decoded, time.time(), checkpoint=wal.replay_from)
        # A repair (or a deleted half-created segment) can leave the log's next
        # lsn past the last replayed record: the state numbers records the same way.
        state.align_lsn(wal.next_lsn - 1)
    except CorruptLog as exc:
        raise DataDirError(f"{exc}") from None
    except NotACheckpoint as exc:
        raise DataDirError(f"{exc}") from None
    except WalError as exc:
        raise DataDirError(f"{exc}") from None
    except OSError as exc:
        raise DataDirError(f"cannot read the log in {config.data_dir!r}: {exc}") from None
    finally:
        gc.enable()
    gc.freeze()
    tune_gc()
    rec = wal.recovery
    if seen is not None and rec is not None and rec.repaired:
        seen.report(rec)
    stats = state.statistics()
    log.info("data directory %s%s", where, "" if had_log else " (new: no log in it yet, starting empty)")
    log.info(
        "recovered %d log records from %d segments%s in %.3fs: %d queues, %d ready, %d delayed%s",
        replayed, rec.segments if rec else 0,
        f" (from the checkpoint at lsn {wal.replay_from})" if wal.replay_from else "",
        time.monotonic() - t0, stats.queues, stats.ready, stats.delayed,
        f"; truncated a torn tail of {rec.truncated_bytes} bytes" if rec and rec.truncated_bytes else "",
    )
    if not follower:
        # What replay queued may leave memory for the log (broker/state/spill.py): big bodies now.
        state.spill(wal.written_lsn, everything=True)
    durability = Durability(wal, state, config)
    # Replay may have decided things (dead-lettering in-flight messages past
    # max_attempts); log them before serving.
    leftover = state.take_records()
    if leftover:
        durability.submit(leftover, {}, lambda box: None)
    server = Server(config, state, durability)
    if follower:
        server.follower = Follower(server, config.follow, config.follow_user, config.follow_token)
        log.info("following the leader at %s (a standby: reads only, writes get NOT_LEADER)", config.follow)
    else:
        server.replication = LeaderReplication(server, config.sync_replicas)
        if config.sync_replicas:
            durability.replica_lsn = server.replication.replica_lsn
            log.info("confirms wait for %d followers' fsync (--sync-replicas)", config.sync_replicas)
    # The page's task list from before the restart (its own file: broker.runtime.history)
    server.history = HistoryFile(config.data_dir)
    kept = history.restore(state, server.history)
    if kept:
        log.info("task history: %d tasks read back from %s", kept, server.history.path)
    from broker.auth import AuthThrottle

    server.users = users  # None: no users, nothing is checked (broker.runtime.connection)
    server.auth_throttle = AuthThrottle()
    return server


class RepairWitness:
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
        full = (R.PUBLISH, R.MESSAGE, R.PUBLISH_FRAME)  # payload item 0: the message's seq
        moved = (R.DEAD, R.MOVE)
        lists = (R.DELIVER, R.ACK)
        firsts = (R.REQUEUE, R.DROP)
        for r in records:
            yield r
            t = r.type
            if t == R.PUBLISH_NEXT:  # the message whose seq is its lsn
                self.known.setdefault(r.lsn, r.lsn)
                continue
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
