"""Promotion of a hot standby against a restart's replay.  A benchmark, not a test.

    python bench/promote.py              # 200,000 queued messages of 100 B
    python bench/promote.py -n 1000000

It starts a leader and a follower (``--follow``) on loopback with their own data directories,
publishes n messages to the leader (confirmed, pipelined), waits until the follower has them,
then times PROMOTE on the follower (the op round trip: placing the standby's messages, writing
and fsyncing the EPOCH record) and, for comparison, the replay a cold start of the same data
directory takes (its ``recovery_seconds``).  Every brokerd is stopped by its pid.  The last line
printed is the command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import wire  # noqa: E402
from tests.support.broker import BrokerProcess  # noqa: E402
from tests.support.wireclient import Raw  # noqa: E402

BATCH = 2000  # publishes in flight at once


def stat(b: BrokerProcess, key: str) -> str:
    for line in b.admin("STATS\n", timeout=60).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == key:
            return parts[1]
    return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        leader = BrokerProcess(Path(d) / "leader").start()
        follower = BrokerProcess(Path(d) / "follower", "--follow", f"127.0.0.1:{leader.port}").start()
        try:
            raw = Raw(leader.port)
            body = b"x" * args.size
            for i in range(0, args.n, BATCH):
                rids = [raw.request(wire.OP_PUBLISH, "q", body, None, 0, None) for _ in range(min(BATCH, args.n - i))]
                for r in rids:
                    assert raw.reply(r)[0] == wire.OP_OK
            raw.close()
            want = stat(leader, "replication_lsn")
            t0 = time.monotonic()
            while stat(follower, "replication_lsn") != want:
                time.sleep(0.05)
            caught = time.monotonic() - t0
            leader.terminate()
            f = Raw(follower.port, heartbeat=0)
            t0 = time.monotonic()
            reply = f.call(wire.OP_PROMOTE, "bench")
            promote = time.monotonic() - t0
            assert reply[0] == wire.OP_OK, reply
            f.close()
            follower.terminate()
            cold = BrokerProcess(follower.data_dir).start(timeout=300)
            replay = float(stat(cold, "recovery_seconds"))
            cold.terminate()
        finally:
            for b in (leader, follower):
                if b.proc is not None and b.proc.poll() is None:
                    b.kill()
    print(f"{args.n:,} queued messages of {args.size} B")
    print(f"follower caught up {caught:.2f} s after the last confirm")
    print(f"PROMOTE round trip (epoch {reply[2]['epoch']}): {promote * 1000:.1f} ms")
    print(f"a cold start's replay of the same log: {replay * 1000:.1f} ms")
    print(f"reproduce: python bench/promote.py -n {args.n} --size {args.size}")


if __name__ == "__main__":
    main()
