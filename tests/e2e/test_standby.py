"""Hot standby, epochs, promotion and fencing (issue 16 items 1, 3, the manual promote of 4, and 6).

Real brokerd processes on loopback with real data dirs, stopped by pid.  One leader+follower pair
is shared by the read-only tests of this module; the tests that change roles start their own.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from client import wire
from tests.e2e.test_replication import publish, queue_ready, stats_line, wait_for
from tests.support.broker import BrokerProcess
from tests.support.wireclient import Raw


def queues(broker: BrokerProcess) -> dict:
    """queue -> (ready, delayed, inflight) from the admin QUEUES table."""
    out = {}
    for line in broker.admin("QUEUES\n").splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 4 and parts[1].isdigit():
            out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
    return out


def stop(*brokers) -> None:
    for b in brokers:
        if b.proc is not None and b.proc.poll() is None:
            b.terminate()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    leader = BrokerProcess(d / "leader").start()
    follower = BrokerProcess(d / "follower", "--follow", f"127.0.0.1:{leader.port}").start()
    try:
        yield leader, follower
    finally:
        stop(follower, leader)


def test_the_standby_applies_each_batch_to_its_live_state_in_flight_included(pair):
    leader, follower = pair
    raw = Raw(leader.port)
    assert all(r[0] == wire.OP_OK for r in publish(raw, "hs", 5))
    wait_for(lambda: queues(follower).get("hs") == (5, 0, 0), "the standby to hold the 5 messages")
    # Two deliveries on the leader: the standby shows them in flight (a replay of the log would
    # show them ready again: that is what the state is after a restart, not while the leader lives).
    raw.ok(wire.OP_CONSUME, ["hs"], 2)
    tags = [d[2] for d in raw.deliveries(2)]
    wait_for(lambda: queues(follower).get("hs") == (3, 0, 2), "the standby to count 2 in flight")
    raw.ok(wire.OP_ACK, tags[:1])
    raw.deliveries(1)  # the freed slot takes the next message
    wait_for(lambda: queues(follower).get("hs") == queues(leader)["hs"] == (2, 0, 2),
             "the standby's depths to equal the leader's after the ack")
    raw.close()


def test_stats_show_role_epoch_leader_and_each_followers_lsn_and_lag(pair):
    leader, follower = pair
    wait_for(lambda: stats_line(follower, "replication_lsn") == stats_line(leader, "replication_lsn"),
             "the follower to catch up")
    lsn = stats_line(leader, "replication_lsn")
    assert stats_line(follower, "replication_role") == "follower"
    assert stats_line(follower, "replication_epoch") == stats_line(leader, "replication_epoch") == "0"
    assert stats_line(follower, "replication_leader") == f"127.0.0.1:{leader.port}"
    assert stats_line(leader, "replication_role") == "leader"
    assert stats_line(leader, "replication_leader") == f"127.0.0.1:{leader.port}"
    lines = [ln for ln in leader.admin("STATS\n").splitlines() if ln.startswith("replication_follower.127.0.0.1:")]
    assert len(lines) == 1, lines
    assert f"lsn={lsn} lag_records=0 lag_seconds=0" in lines[0]


def test_promote_then_the_old_leader_cuts_its_divergent_tail_and_follows(tmp_path):
    a = BrokerProcess(tmp_path / "a").start()
    b = BrokerProcess(tmp_path / "b", "--follow", f"127.0.0.1:{a.port}").start()
    a2 = None
    try:
        raw = Raw(a.port)
        assert all(r[0] == wire.OP_OK for r in publish(raw, "q", 5))
        wait_for(lambda: queue_ready(b, "q") == 5, "the standby to hold the 5 messages")
        f = Raw(b.port).call(wire.OP_PUBLISH, "q", b"x", None, 0, None)
        assert f[0] == wire.OP_ERROR and f[2] == "NOT_LEADER", f
        # a manual failover: brokerd-ctl promote
        out = subprocess.run([sys.executable, "-m", "client.ctl", "promote", "--url",
                              f"brokerd://127.0.0.1:{b.port}", "a", "is", "gone"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "leader, epoch 1" in out.stdout, (out.stdout, out.stderr)
        assert stats_line(b, "replication_role") == "leader" and stats_line(b, "replication_epoch") == "1"
        assert any("promoted to leader, epoch 1" in ln and "a is gone" in ln for ln in b.log), b.log[-5:]
        # A never heard of it and still confirms alone (--sync-replicas 0): a divergent, unconfirmed tail
        assert all(r[0] == wire.OP_OK for r in publish(raw, "q", 3, start=100))
        raw.close()
        rb = Raw(b.port)
        assert all(r[0] == wire.OP_OK for r in publish(rb, "q", 2, start=200))  # B takes writes
        assert queue_ready(b, "q") == 7 and queue_ready(a, "q") == 8
        a.terminate()
        a2 = BrokerProcess(a.data_dir, "--follow", f"127.0.0.1:{b.port}").start()
        # its 3 publishes, and the checkpoint its clean stop wrote after them (broker/state/replay.py)
        wait_for(lambda: any(re.search(r"truncated ([3-9]|\d\d+) records", ln) for ln in a2.log),
                 "the old leader to cut its tail")
        wait_for(lambda: stats_line(a2, "replication_connected") == "yes", "the old leader to follow the new one")
        b_lsn = stats_line(b, "replication_lsn")
        wait_for(lambda: stats_line(a2, "replication_lsn") == b_lsn, "the old leader to catch up")
        # B's messages, without A's 3 unconfirmed ones (the batch is applied a moment after its fsync)
        wait_for(lambda: queue_ready(a2, "q") == 7, "the old leader to hold B's 7 messages")
        assert stats_line(a2, "replication_epoch") == "1"
        assert publish(rb, "q", 1, start=300)[0][0] == wire.OP_OK
        wait_for(lambda: queue_ready(a2, "q") == 8, "the old leader to take the new leader's next write")
        # a brokerd that shows B a newer epoch than B's own deposes B: STALE_EPOCH, and B stops writing
        stale = Raw(b.port)
        f = stale.call(wire.OP_REPLICATE, 1, 9)
        assert f[0] == wire.OP_ERROR and f[2] == "STALE_EPOCH" and "epoch 9" in f[3], f
        f = rb.call(wire.OP_PUBLISH, "q", b"late", None, 0, None)
        assert f[0] == wire.OP_ERROR and f[2] == "NOT_LEADER", f
        assert stats_line(b, "replication_role") == "fenced"
        rb.close()
    finally:
        stop(*(x for x in (a2, b, a) if x is not None))


def test_promote_needs_the_admin_grant_refuses_bad_reasons_and_a_leader(tmp_path):
    from client.userfile import add_user

    users = tmp_path / "users.toml"
    app_token = add_user(str(users), "app", {"publish": ("*",)})
    ops_token = add_user(str(users), "ops", {"admin": ("*",)})
    leader = BrokerProcess(tmp_path / "leader", "--users-file", str(users)).start()
    try:
        app = Raw(leader.port, extra={"user": "app", "token": app_token})
        f = app.call(wire.OP_PROMOTE, None)
        assert f[0] == wire.OP_ERROR and f[2] == "ACCESS_REFUSED" and "admin" in f[3], f
        ops = Raw(leader.port, extra={"user": "ops", "token": ops_token})
        for hostile in (12345, "x" * 201, [b"\x00"], {"a": 1}):
            f = ops.call(wire.OP_PROMOTE, hostile)
            assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST" and "field 2" in f[3], (hostile, f)
        f = ops.call(wire.OP_PROMOTE, "try")
        assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST" and "already the leader" in f[3], f
        text = leader.admin(f"AUTH ops {ops_token}\nPROMOTE now\n")
        assert "ERR BAD_REQUEST this brokerd is already the leader" in text, text
        # nothing of that cost the broker anything
        assert publish(app, "q", 1)[0][0] == wire.OP_OK
        stats = leader.admin(f"AUTH ops {ops_token}\nSTATS\n").splitlines()
        assert ["replication_role", "leader"] in [ln.split() for ln in stats], stats
        app.close()
        ops.close()
    finally:
        stop(leader)


def test_a_hostile_epoch_in_replicate_costs_only_that_connection(pair):
    leader, follower = pair
    for bad in (-1, "1", 2**64, [1]):
        raw = Raw(leader.port)
        f = raw.call(wire.OP_REPLICATE, 1, bad)
        assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST" and "field 3" in f[3] and "epoch" in f[3], (bad, f)
        raw.close()
    # a follower past the leader's end in the same term is not told to cut: the leader lost records
    raw = Raw(leader.port)
    f = raw.call(wire.OP_REPLICATE, 10**9, 0)
    assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST" and "diverged" in f[3], f
    raw.close()
    # the leader still leads and its follower still follows
    raw = Raw(leader.port)
    assert publish(raw, "after", 1)[0][0] == wire.OP_OK
    wait_for(lambda: queue_ready(follower, "after") == 1, "the follower to take the next write")
    assert stats_line(leader, "replication_role") == "leader"
    raw.close()


def _get(broker: BrokerProcess, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{broker.http_port}{path}", timeout=10) as r:
        return r.read().decode()


def test_metrics_and_the_page_show_role_epoch_and_each_followers_lag(pair):
    leader, follower = pair
    wait_for(lambda: stats_line(follower, "replication_lsn") == stats_line(leader, "replication_lsn"),
             "the follower to catch up")
    lsn = stats_line(leader, "replication_lsn")
    m = _get(leader, "/metrics").splitlines()
    assert 'brokerd_replication_role{role="leader"} 1' in m and 'brokerd_replication_role{role="follower"} 0' in m
    assert "brokerd_replication_epoch 0" in m
    mine = [ln for ln in m if ln.startswith("brokerd_replication_follower_")]
    assert len(mine) == 3, mine
    assert any(ln.startswith('brokerd_replication_follower_lsn{follower="127.0.0.1:') and ln.endswith(f" {lsn}")
               for ln in mine), mine
    assert any(ln.startswith("brokerd_replication_follower_lag_records{") and ln.endswith(" 0") for ln in mine)
    fm = _get(follower, "/metrics").splitlines()
    assert 'brokerd_replication_role{role="follower"} 1' in fm
    assert not [ln for ln in fm if ln.startswith("brokerd_replication_follower_lsn{")]
    page = _get(leader, "/")
    box = page[page.index('data-section="replication"'):]
    assert "<b>leader</b> · epoch 0" in box and "<th>durable lsn</th>" in box and f"<td>{lsn}</td>" in box
    fpage = _get(follower, "/")
    fbox = fpage[fpage.index('data-section="replication"'):]
    assert "<b>follower</b> · epoch 0" in fbox and f"leader 127.0.0.1:{leader.port}" in fbox
