"""Failover time through an etcd election.  A benchmark, not a test.

    python bench/failover.py                 # 20 failovers, --election-ttl 2
    python bench/failover.py --runs 5 --ttl 5

Starts a real etcd (Debian's etcd-server) and two brokerd processes with ``--election etcd://...``
on loopback ports, each with its own data dir.  Each run: a confirmed publish to the leader, the
follower caught up, then ``kill -9`` of the leader; the clock runs from the kill to the first
publish the other brokerd confirms (a client retrying every 10 ms through NOT_LEADER and
refusals).  The killed one is started again on its data dir (it follows the new leader) before
the next run, so the roles alternate.

Prints each failover, then p50 and max, and last the command that reproduces them.  What it is
made of: the lease running out (at most --ttl after the last renewal the dead leader sent), the
candidate's next read of the leader key (POLL_INTERVAL, 0.25 s), the promotion (an EPOCH record
fsynced), the client's next retry.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the standard
# library's http (urllib and http.client import it): replace that entry with the project root.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tests.support.etcd import (  # noqa: E402
    EtcdProcess,
    elected_broker,
    etcd_binary,
    leads,
    publish_until_confirmed,
    stats_value,
    wait_until,
)

WAIT = 30.0  # seconds: the bound on each wait (start, catch-up, failover)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="failovers to measure (default 20)")
    ap.add_argument("--ttl", type=int, default=2, help="--election-ttl of both brokers, seconds (default 2)")
    args = ap.parse_args(argv)
    if etcd_binary() is None:
        print("etcd is not installed: apt-get install etcd-server", file=sys.stderr)
        return 2
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="brokerd-failover-") as tmp:
        tmp = Path(tmp)
        etcd = EtcdProcess(tmp / "etcd").start()
        brokers = []
        try:
            first = elected_broker(tmp / "a", etcd, "/bench", args.ttl, "--sync-replicas", "0").start()
            brokers.append(first)
            wait_until(lambda: leads(first), WAIT, "the first brokerd to be elected")
            brokers.append(elected_broker(tmp / "b", etcd, "/bench", args.ttl, "--sync-replicas", "0").start())
            leader, follower = brokers
            for run in range(1, args.runs + 1):
                wait_until(lambda: stats_value(follower, "replication_leader") == leader.address, WAIT,
                           "the follower to follow the leader")
                publish_until_confirmed(leader.address, "bench", b"before %d" % run, WAIT)
                lsn = int(stats_value(leader, "replication_lsn"))
                wait_until(lambda: int(stats_value(follower, "replication_lsn") or 0) >= lsn, WAIT,
                           "the follower to catch up")
                leader.kill()
                killed = time.monotonic()
                confirmed = publish_until_confirmed(follower.address, "bench", b"after %d" % run, WAIT)
                times.append(confirmed - killed)
                print(f"run {run}: kill -9 {leader.address} -> first confirmed publish on {follower.address} "
                      f"{times[-1]:.3f} s", flush=True)
                leader.restart()  # same port and data dir: it comes back fenced and follows
                leader, follower = follower, leader
        finally:
            for b in brokers:
                b.kill()
            etcd.stop()
    times.sort()
    print(f"failover (kill -9 of the leader -> first confirmed publish on the new one), {len(times)} runs, "
          f"--election-ttl {args.ttl}: p50 {statistics.median(times):.3f} s, max {times[-1]:.3f} s")
    print("command: python " + " ".join(shlex.quote(a) for a in ["bench/failover.py", *(argv or sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
