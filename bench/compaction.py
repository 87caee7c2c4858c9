"""Log compaction: does it settle, and does a follower's disk follow its leader's?  A benchmark,
not a test (tests/wal/test_durability.py and tests/e2e/test_replication.py hold the promises).

    python bench/compaction.py loop             # big bodies queued, then small traffic
    python bench/compaction.py follower --rounds 40

``loop``: one brokerd (``--segment-bytes 65536 --fsync never``), 200 x 20 KB queued, a clean
restart, then 300 small publish-deliver-ack round trips and 2 s idle.  Prints the compaction
passes during the small traffic and during the idle time, and brokerd's CPU seconds: a trigger
that guesses the live size from recent publishes saw the log as more than twice the live size
for ever and rewrote the same queued bodies on every write (issue 18).

``follower``: a leader and a ``--follow`` follower (``--segment-bytes 65536``), 45 x 1 KB kept
queued, then ROUNDS rounds of 200 x 1 KB published and acked.  Prints both logs' segments and
bytes once the follower has caught up: a follower deletes what its leader compacted (RECORDS
``kept_from``, protocol.md §5.40) or its disk grows with all the history (issue 16).

Every brokerd listens on 127.0.0.1 with its own data dir and is stopped here by pid.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the standard
# library's http: replace that entry with the project root.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from client import wire  # noqa: E402
from tests.e2e.test_replication import log_bytes, publish, stats_line, wait_for  # noqa: E402
from tests.support.broker import BrokerProcess  # noqa: E402
from tests.support.wireclient import Raw  # noqa: E402


def stat(b: BrokerProcess, key: str) -> str | None:
    for line in b.admin("STATS\n").splitlines():
        p = line.split()
        if len(p) >= 2 and p[0] == key:
            return p[1]
    return None


def loop(tmp: Path) -> None:
    b = BrokerProcess(tmp / "data", "--segment-bytes", "65536", "--fsync", "never").start()
    try:
        r = Raw(b.port)
        rids = [r.request(wire.OP_PUBLISH, "big", b"B" * 20000, f"big{i}", 0, None) for i in range(200)]
        for x in rids:
            r.reply(x)
        r.close()
        b.terminate()
        b.start()
        r = Raw(b.port)
        r.ok(wire.OP_CONSUME, ["small"], 100)
        c0, cpu0 = int(stat(b, "wal_compactions")), b.cpu_seconds()
        for _ in range(300):
            r.ok(wire.OP_PUBLISH, "small", b"s" * 100, None, 0, None)
            (d,) = r.deliveries(1)
            r.ok(wire.OP_ACK, d[2])
        busy = int(stat(b, "wal_compactions")) - c0
        time.sleep(2)
        idle = int(stat(b, "wal_compactions")) - c0 - busy
        print(f"compaction passes: {busy} during 300 small round trips, {idle} in the 2 s idle after; "
              f"brokerd CPU {b.cpu_seconds() - cpu0:.2f} s; log {stat(b, 'wal_segments')} segments, "
              f"{stat(b, 'wal_bytes')} B (live, measured: {stat(b, 'wal_live_bytes')} B)")
        r.close()
    finally:
        b.kill()


def follower(tmp: Path, rounds: int) -> None:
    leader = BrokerProcess(tmp / "leader", "--segment-bytes", "65536").start()
    f = BrokerProcess(tmp / "follower", "--follow", f"127.0.0.1:{leader.port}", "--segment-bytes", "65536").start()
    try:
        raw = Raw(leader.port)
        publish(raw, "keep", 45, size=1000)
        raw.ok(wire.OP_CONSUME, ["work"], 200)
        for n in range(rounds):
            publish(raw, "work", 200, start=n * 200, size=1000)
            raw.ok(wire.OP_ACK, [x[2] for x in raw.deliveries(200)])
        wait_for(lambda: stats_line(f, "replication_lsn") == stats_line(leader, "replication_lsn"), "the follower")
        time.sleep(2.5)  # the leader's next RECORDS carries kept_from; the follower deletes after its fsync
        print(f"{rounds} rounds (~{rounds * 200 * 1000:,} B of history): leader {len(list(leader.data_dir.glob('*.wal')))} "
              f"segments {log_bytes(leader):,} B; follower {len(list(f.data_dir.glob('*.wal')))} segments "
              f"{log_bytes(f):,} B")
        raw.close()
    finally:
        f.kill()
        leader.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", choices=("loop", "follower"))
    ap.add_argument("--rounds", type=int, default=40, help="follower: rounds of 200 x 1 KB published and acked")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="brokerd-compaction-") as tmp:
        loop(Path(tmp)) if args.case == "loop" else follower(Path(tmp), args.rounds)
    print("command: python bench/compaction.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
