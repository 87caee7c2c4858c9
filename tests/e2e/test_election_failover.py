"""Two real brokerd processes elected through a real etcd: kill -9 the leader, the other leads.

Needs the replication roles (broker/runtime/roles.py: promote, follow, fence); etcd is started
here on loopback ports (Debian's etcd-server; .ci/run installs it).
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.support.etcd import (
    EtcdProcess,
    elected_broker,
    etcd_binary,
    leads,
    publish_until_confirmed,
    stats_value,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (apt-get install etcd-server; .ci/run does it)"),
]
TTL = 2  # seconds: the lease; a dead leader is replaced within about this long
WAIT = 20.0  # seconds: the bound on every wait here (a loaded CI box)
# Two brokerds: with the --election default (--sync-replicas 1) the survivor of a kill has no
# follower and refuses writes until one is back (as a quorum queue without its majority), which
# test_the_election_default_refuses_writes_without_a_follower shows; these tests are about the
# handover, so they confirm on the leader's disk alone.
TWO_NODES = ("--sync-replicas", "0")
_n = itertools.count()


@pytest.fixture
def etcd(tmp_path):
    proc = EtcdProcess(tmp_path / "etcd").start()
    yield proc
    proc.stop()


def queue_total(broker, queue: str) -> int:
    for line in broker.admin("QUEUES\n").splitlines():
        parts = line.split()
        if parts and parts[0] == queue:
            return sum(int(p) for p in parts[1:4])
    return 0


def test_kill_9_the_leader_and_the_other_brokerd_is_elected_and_takes_a_publish(etcd, tmp_path):
    prefix = f"/e2e-{next(_n)}"
    a = elected_broker(tmp_path / "a", etcd, prefix, TTL, *TWO_NODES).start()
    b = None
    try:
        wait_until(lambda: leads(a), WAIT, "the first brokerd to be elected")
        b = elected_broker(tmp_path / "b", etcd, prefix, TTL, *TWO_NODES).start()
        wait_until(lambda: stats_value(b, "replication_leader") == a.address, WAIT, "the second to follow the first")
        assert not leads(b)
        publish_until_confirmed(a.address, "jobs", b"before", WAIT)
        a_lsn = int(stats_value(a, "replication_lsn"))
        wait_until(lambda: int(stats_value(b, "replication_lsn") or 0) >= a_lsn, WAIT, "the follower to catch up")

        a.kill()  # kill -9: no step-down, no lease released; etcd lets the lease expire
        killed = time.monotonic()
        confirmed = publish_until_confirmed(b.address, "jobs", b"after", WAIT)
        assert leads(b)
        assert confirmed - killed < TTL + 5.0  # the lease's expiry, the poll and the promotion (loose: CI load)
        # the publish confirmed by the old leader is there, and the new one beside it
        assert queue_total(b, "jobs") == 2
        assert int(stats_value(b, "replication_epoch") or 0) >= 2  # a new term
    finally:
        a.kill()
        if b is not None:
            b.terminate()


def test_a_stopped_leader_hands_over_at_once_and_a_paused_one_takes_no_write_after_it_resumes(etcd, tmp_path):
    import os
    import signal

    prefix = f"/e2e-{next(_n)}"
    a = elected_broker(tmp_path / "a", etcd, prefix, TTL, *TWO_NODES).start()
    b = None
    try:
        wait_until(lambda: leads(a), WAIT, "the first brokerd to be elected")
        b = elected_broker(tmp_path / "b", etcd, prefix, TTL, *TWO_NODES).start()
        wait_until(lambda: stats_value(b, "replication_leader") == a.address, WAIT, "the second to follow the first")
        # SIGTERM: a fences and revokes its lease, so b need not wait for the lease to run out
        a.terminate()
        stopped = time.monotonic()
        publish_until_confirmed(b.address, "jobs", b"x", WAIT)
        assert time.monotonic() - stopped < TTL, "b waited for the lease to expire: a did not release it"
        a.restart()  # comes back fenced and follows b
        wait_until(lambda: stats_value(a, "replication_leader") == b.address, WAIT, "a to follow b")

        # SIGSTOP the leader past its lease: a is elected meanwhile; b, resumed, refuses writes
        os.kill(b.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: leads(a), WAIT, "a to be elected while b is paused")
        finally:
            os.kill(b.pid, signal.SIGCONT)
        from client import Client
        from client.errors import NotLeader

        with pytest.raises(NotLeader):  # fenced by its own timer the moment it ran again
            with Client(b.address, timeout=5) as c:
                c.publish("jobs", b"to the deposed leader")
        wait_until(lambda: stats_value(b, "replication_leader") == a.address, WAIT, "b to follow a")
    finally:
        a.kill()
        if b is not None:
            b.terminate()


def test_the_election_default_refuses_writes_without_a_follower(etcd, tmp_path):
    # --election makes --sync-replicas default to 1: a leader alone confirms nothing (a confirm
    # means two disks); once a second brokerd follows it, the same publish is confirmed.
    from client import Client
    from client.errors import BrokerdError

    prefix = f"/e2e-{next(_n)}"
    a = elected_broker(tmp_path / "a", etcd, prefix, TTL).start()
    b = None
    try:
        wait_until(lambda: leads(a), WAIT, "the first brokerd to be elected")
        with pytest.raises(BrokerdError) as refused:
            with Client(a.address, timeout=5, reconnect=0) as c:
                c.publish("jobs", b"alone")
        assert refused.value.code == "NOT_ENOUGH_REPLICAS", refused.value
        b = elected_broker(tmp_path / "b", etcd, prefix, TTL).start()
        wait_until(lambda: stats_value(b, "replication_leader") == a.address, WAIT, "the second to follow the first")
        publish_until_confirmed(a.address, "jobs", b"two disks", WAIT)
    finally:
        a.kill()
        if b is not None:
            b.terminate()
