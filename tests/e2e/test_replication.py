"""Replication (issue 16 items 1-2): followers as hot standbys, confirms on N disks.

Real brokerd processes on loopback with real data dirs, stopped by pid.
"""

from __future__ import annotations

import time

import pytest

from client import wire
from tests.support.broker import BrokerProcess
from tests.support.wireclient import Raw, drain

WAIT = 20.0  # seconds any wait here may take at most


def publish(raw: Raw, queue: str, n: int, start: int = 0, size: int = 8) -> list:
    """Publish n messages (every PUBLISH is confirmed; pipelined); return the replies in order."""
    rids = [raw.request(wire.OP_PUBLISH, queue, (b"m%d-" % i).ljust(size, b"x"), f"id-{queue}-{i}", 0, None)
            for i in range(start, start + n)]
    return [raw.reply(r) for r in rids]


def stats_line(broker: BrokerProcess, key: str) -> str:
    for line in broker.admin("STATS\n").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == key:
            return parts[1]
    return ""


def wait_for(pred, what: str):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {WAIT}s waiting for {what}")


def queue_ready(broker: BrokerProcess, queue: str) -> int:
    """Messages the broker holds for ``queue``: ready + delayed + in flight (a standby holds a
    leader's in-flight deliveries as ready: they come back redelivered after a failover)."""
    for line in broker.admin("QUEUES\n").splitlines():
        parts = line.split()
        if parts and parts[0] == queue:
            return int(parts[1]) + int(parts[2]) + int(parts[3])
    return -1


def drain_bodies(port: int, queue: str, n: int) -> dict:
    """Consume and ack ``n`` messages of ``queue``: {id: body}."""
    c = Raw(port)
    c.ok(wire.OP_CONSUME, [queue], 100)
    got = {}
    while len(got) < n:
        ds = c.deliveries(1, timeout=WAIT)
        for d in ds:
            got[d[4]] = d[5]
        c.ok(wire.OP_ACK, [d[2] for d in ds])
    c.close()
    return got


@pytest.fixture
def group(tmp_path):
    started = []

    def start(name, *args, env=None):
        b = BrokerProcess(tmp_path / name, *args, env=env).start()
        started.append(b)
        return b

    yield start
    for b in started:
        if b.proc is not None and b.proc.poll() is None:
            b.kill()


def test_empty_follower_catches_up_from_snapshot_and_tail(group):
    # A small segment size so the leader compacts and drops its first segments: the new
    # follower must start from the oldest kept one (the snapshot) and then take the tail.
    leader = group("leader", "--segment-bytes", "65536")
    raw = Raw(leader.port)
    assert all(r[0] == wire.OP_OK for r in publish(raw, "q", 600, size=1000))
    got = raw.ok(wire.OP_CONSUME, ["q"], 550)
    tags = [d[2] for d in raw.deliveries(550)]
    raw.ok(wire.OP_ACK, tags)
    wait_for(lambda: int(stats_line(leader, "wal_segments_deleted") or 0) > 0, "the leader to compact")
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}")
    # the leader keeps taking writes while the follower catches up
    assert all(r[0] == wire.OP_OK for r in publish(raw, "other", 50))
    leader_lsn = int(stats_line(leader, "replication_lsn"))
    wait_for(lambda: int(stats_line(follower, "replication_lsn") or 0) >= leader_lsn, "the follower to catch up")
    assert stats_line(follower, "replication_role") == "follower"
    assert stats_line(follower, "replication_leader") == f"127.0.0.1:{leader.port}"
    assert any("snapshot" in line for line in leader.log), leader.log[-5:]
    for q in ("q", "other"):  # the batch is applied to the live state a moment after its fsync
        wait_for(lambda: queue_ready(follower, q) == queue_ready(leader, q), f"the standby's {q} to match")
    raw.close()
    assert got is not None


def test_a_follower_behind_the_oldest_segment_drops_its_log_and_takes_the_snapshot(group):
    leader = group("leader", "--segment-bytes", "65536")
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}")
    raw = Raw(leader.port)
    assert all(r[0] == wire.OP_OK for r in publish(raw, "early", 20))
    wait_for(lambda: queue_ready(follower, "early") == 20, "the follower to have the first 20")
    follower.terminate()
    # while it is away the leader writes, acks and compacts its first segments away
    assert all(r[0] == wire.OP_OK for r in publish(raw, "q", 600, size=1000))
    raw.ok(wire.OP_CONSUME, ["q"], 550)
    raw.ok(wire.OP_ACK, [d[2] for d in raw.deliveries(550)])
    wait_for(lambda: int(stats_line(leader, "wal_segments_deleted") or 0) > 0, "the leader to compact")
    follower.start()
    wait_for(lambda: stats_line(follower, "replication_lsn") == stats_line(leader, "replication_lsn")
             and stats_line(follower, "replication_connected") == "yes", "the follower to catch up")
    assert any("to take the leader's snapshot" in line for line in follower.log), follower.log[-5:]
    for q in ("early", "q"):
        wait_for(lambda: queue_ready(follower, q) == queue_ready(leader, q), f"the standby's {q} to match")
    raw.close()


def test_writes_to_a_follower_get_not_leader_naming_the_leader(group):
    leader = group("leader")
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}")
    raw = Raw(follower.port)
    f = raw.call(wire.OP_PUBLISH, "q", b"x", None, 0, None)
    assert f[0] == wire.OP_ERROR and f[2] == "NOT_LEADER", f
    assert f"127.0.0.1:{leader.port}" in f[3]
    # admin writes too; admin reads are answered
    assert "NOT_LEADER" in follower.admin("PURGE q\n") and f"127.0.0.1:{leader.port}" in follower.admin("PURGE q\n")
    assert raw.ok(wire.OP_STATS) is not None
    raw.close()


def test_replicate_needs_its_grant_and_a_sane_lsn(group, tmp_path):
    from client.userfile import add_user

    users = tmp_path / "users.toml"
    pub_token = add_user(str(users), "app", {"publish": ("*",)})
    rep_token = add_user(str(users), "standby", {"replicate": ("*",)})
    leader = group("leader", "--users-file", str(users))
    raw = Raw(leader.port, extra={"user": "app", "token": pub_token})
    f = raw.call(wire.OP_REPLICATE, 1)
    assert f[0] == wire.OP_ERROR and f[2] == "ACCESS_REFUSED" and "replicate" in f[3], f
    raw.close()
    raw = Raw(leader.port, extra={"user": "standby", "token": rep_token})
    f = raw.call(wire.OP_REPLICATE, "not an lsn")
    assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST" and "lsn" in f[3], f
    raw.close()
    raw = Raw(leader.port, extra={"user": "standby", "token": rep_token})
    f = raw.call(wire.OP_REPLICATE, 10**9)
    assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST" and "diverged" in f[3], f
    raw.close()
    # the broker is untouched by all that, and a follower with the grant follows
    # the token travels in the environment, never on the command line (ps shows argv)
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}", "--follow-user", "standby",
                     env={"BROKERD_FOLLOW_TOKEN": rep_token})
    raw = Raw(leader.port, extra={"user": "app", "token": pub_token})
    assert publish(raw, "q", 3)[-1][0] == wire.OP_OK
    wait_for(lambda: queue_ready(follower, "q") == 3, "the follower to have the 3 messages")
    raw.close()


def test_sync_replicas_refuses_without_the_follower_and_resumes(group):
    leader = group("leader", "--sync-replicas", "1")
    raw = Raw(leader.port)
    f = publish(raw, "q", 1)[0]
    assert f[0] == wire.OP_ERROR and f[2] == "NOT_ENOUGH_REPLICAS" and "sync-replicas" in f[3], f
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}")
    wait_for(lambda: stats_line(leader, "replication_followers_in_sync") == "1", "the follower to be in sync")
    assert all(r[0] == wire.OP_OK for r in publish(raw, "q", 20))
    follower.kill()
    wait_for(lambda: stats_line(leader, "replication_followers_in_sync") == "0", "the leader to notice")
    f = publish(raw, "q", 1, start=100)[0]
    assert f[0] == wire.OP_ERROR and f[2] == "NOT_ENOUGH_REPLICAS", f
    follower.start()
    wait_for(lambda: stats_line(leader, "replication_followers_in_sync") == "1", "the follower to be back")
    assert publish(raw, "q", 1, start=200)[0][0] == wire.OP_OK
    raw.close()


def test_kill_9_leader_every_confirmed_message_is_on_the_follower(group):
    leader = group("leader", "--sync-replicas", "1")
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}")
    wait_for(lambda: stats_line(leader, "replication_followers_in_sync") == "1", "the follower to be in sync")
    raw = Raw(leader.port)
    replies = publish(raw, "q", 200)
    confirmed = sum(1 for r in replies if r[0] == wire.OP_OK)
    assert confirmed == 200
    leader.kill()  # SIGKILL
    follower.terminate()
    # the follower's data dir, started as a standalone brokerd, holds every confirmed message
    standalone = BrokerProcess(follower.data_dir).start()
    try:
        assert queue_ready(standalone, "q") >= confirmed
    finally:
        standalone.terminate()


def log_bytes(broker: BrokerProcess) -> int:
    """Bytes in a brokerd's log segments (one may be deleted while we look)."""
    total = 0
    for p in broker.data_dir.glob("*.wal"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_a_follower_deletes_what_its_leader_compacted_and_after_a_failover_every_message_comes_out_once(group):
    seg = "65536"
    leader = group("leader", "--segment-bytes", seg)
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}", "--segment-bytes", seg)
    raw = Raw(leader.port)
    # What stays queued through it all: 40 ready, and 5 held in flight by a consumer that never acks.
    assert all(r[0] == wire.OP_OK for r in publish(raw, "keep", 40, size=1000))
    assert all(r[0] == wire.OP_OK for r in publish(raw, "held", 5, size=1000))
    holder = Raw(leader.port)
    holder.ok(wire.OP_CONSUME, ["held"], 5)
    assert len(holder.deliveries(5)) == 5
    wait_for(lambda: queue_ready(follower, "keep") == 40, "the follower to hold the first messages")
    first = sorted(p.name for p in follower.data_dir.glob("*.wal"))[0]
    # Traffic published and acked until the leader has compacted and the follower has deleted too.
    worker = Raw(leader.port)
    worker.ok(wire.OP_CONSUME, ["work"], 200)
    peak = 0
    for round_ in range(40):
        assert all(r[0] == wire.OP_OK for r in publish(worker, "work", 200, start=round_ * 200, size=1000))
        worker.ok(wire.OP_ACK, [d[2] for d in worker.deliveries(200)])
        peak = max(peak, log_bytes(follower))
        if int(stats_line(follower, "wal_segments_deleted") or 0) >= 4 and not (follower.data_dir / first).exists():
            break
    else:
        raise AssertionError(f"the follower never deleted a segment: {stats_line(follower, 'wal_segments')} segments, "
                             f"{log_bytes(follower)} bytes; the leader deleted {stats_line(leader, 'wal_segments_deleted')}")
    history = (round_ + 1) * 200 * 1000
    wait_for(lambda: stats_line(follower, "replication_lsn") == stats_line(leader, "replication_lsn"),
             "the follower to catch up")
    # Its disk is bounded as the leader's: its log starts at or before the leader's (it holds all the
    # leader needs), and only its oldest segment holds records from before the leader's start.
    def starts(broker):
        return sorted(int(p.name.split(".")[0]) for p in broker.data_dir.glob("*.wal"))

    def as_compact_as_the_leader():
        mine, theirs = starts(follower), starts(leader)
        assert mine[0] <= theirs[0], (mine, theirs)
        return len(mine) == 1 or mine[1] > theirs[0]

    wait_for(as_compact_as_the_leader, "the follower to delete what the leader deleted")
    assert log_bytes(follower) < history and log_bytes(follower) < peak, (log_bytes(follower), history, peak)
    # A restart replays the compacted log and goes on from its own last lsn: no snapshot taken.
    follower.kill()
    follower.restart()
    assert all(r[0] == wire.OP_OK for r in publish(raw, "keep", 5, start=40, size=1000))
    wait_for(lambda: stats_line(follower, "replication_lsn") == stats_line(leader, "replication_lsn")
             and stats_line(follower, "replication_connected") == "yes", "the restarted follower to catch up")
    assert not any("snapshot" in line for line in follower.log), [ln for ln in follower.log if "snapshot" in ln]
    for q, n in (("keep", 45), ("held", 5), ("work", 0)):
        wait_for(lambda: queue_ready(follower, q) == n, f"the standby to hold {n} in {q}")
    # The leader dies; the follower is promoted and every message still queued comes out once.
    leader.kill()
    assert "leader, epoch 1" in follower.admin("PROMOTE the leader was killed\n")
    keep = drain(follower.port, "keep")
    assert sorted(keep) == sorted(f"id-keep-{i}" for i in range(45)) and len(keep) == 45
    held = drain(follower.port, "held")
    assert sorted(held) == sorted(f"id-held-{i}" for i in range(5)), held
    assert drain(follower.port, "work") == [] and drain(follower.port, "keep") == []
    for r in (raw, holder, worker):
        r.close()


def test_a_promoted_follower_leaves_big_queued_bodies_in_its_log_as_a_leader_does(group):
    """A follower keeps its standby's bodies in memory; once promoted it is a leader like any
    other: bodies past --spill-body-bytes go back to its log and come back byte-identical
    (before, a promoted follower never spilled, and past --max-memory only refused)."""
    leader = group("leader", "--fsync", "never")
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}", "--spill-body-bytes", "1000",
                     "--fsync", "never")
    raw = Raw(leader.port)
    bodies = {f"big-{i}": bytes([i % 251, (i * 7) % 256]) * (600 + i % 50) for i in range(600)}
    rids = [raw.request(wire.OP_PUBLISH, "deep", body, mid, 0, None) for mid, body in bodies.items()]
    assert all(raw.reply(r)[0] == wire.OP_OK for r in rids)
    wait_for(lambda: queue_ready(follower, "deep") == 600, "the follower to hold the 600 messages")
    assert int(stats_line(follower, "spilled_messages") or 0) == 0  # a standby reads nothing back
    leader.kill()
    assert "leader, epoch 1" in follower.admin("PROMOTE the leader was killed\n")
    wait_for(lambda: int(stats_line(follower, "spilled_messages") or 0) >= 300,
             "the promoted follower to leave big bodies in its log")
    assert drain_bodies(follower.port, "deep", 600) == bodies
    raw.close()


def test_a_standby_keeps_queued_bodies_in_its_log_not_in_memory(group):
    """A follower writes and fsyncs every record before applying it, so its standby keeps each
    queued message's place in its own log, not the body: 48 MB queued on the leader grow the
    follower by less than the bodies (before: 69 MB for 49.6 MB of bodies; now ~22 MB, the
    replication frames' buffers).  Promoted, every body comes back byte-identical."""
    leader = group("leader", "--fsync", "never")
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}", "--fsync", "never")
    raw = Raw(leader.port)
    publish(raw, "warm", 10)
    wait_for(lambda: queue_ready(follower, "warm") == 10, "the follower to take the first records")
    before = follower.rss()
    bodies = {f"big-{i}": bytes([i % 251]) * 1000 + (b"%06d" % i) * 5000 for i in range(1600)}
    items = list(bodies.items())
    for k in range(0, len(items), 100):
        rids = [raw.request(wire.OP_PUBLISH, "deep", body, mid, 0, None) for mid, body in items[k:k + 100]]
        assert all(raw.reply(r)[0] == wire.OP_OK for r in rids)
    wait_for(lambda: queue_ready(follower, "deep") == 1600, "the follower to hold the 1,600 messages")
    grown = follower.rss() - before
    total = sum(map(len, bodies.values()))
    assert grown < total * 0.75, f"the follower grew {grown} bytes holding {total} bytes of queued bodies"
    leader.kill()
    assert "leader, epoch 1" in follower.admin("PROMOTE the leader was killed\n")
    assert drain_bodies(follower.port, "deep", 1600) == bodies
    raw.close()


def test_publish_batches_logged_as_they_came_reach_a_follower_whole_and_replay_there(group):
    """PUBLISH_BATCH frames of plain items are logged as PUBLISH_FRAME + PUBLISH_NEXT records
    (log_records); a follower gets each frame with its items in one RECORDS batch (4 MiB here, so
    the batches are cut), holds every message as a standby, and its own log replays them whole."""
    leader = group("leader", "--sync-replicas", "1")
    follower = group("follower", "--follow", f"127.0.0.1:{leader.port}")
    wait_for(lambda: stats_line(leader, "replication_followers_in_sync") == "1", "the follower to be in sync")
    raw = Raw(leader.port)
    sent, prio = {}, {}
    for k in range(41):  # the first frame makes the queue (PUBLISH records); 40 more are logged as they came
        items = [["fq", bytes([k, i % 256]) * (300 + 7 * i), f"f{k}-{i}", i % 3, {"dedupe": f"d{k}-{i}"}]
                 for i in range(100)]
        f = raw.call(wire.OP_PUBLISH_BATCH, items)
        assert f[0] == wire.OP_OK and f[2] is None, f
        sent.update((it[2], it[1]) for it in items)
        prio.update((it[2], it[3]) for it in items)
    raw.close()
    wait_for(lambda: queue_ready(follower, "fq") == len(sent), "the standby to hold every message")
    leader.kill()  # SIGKILL: every confirm was on the follower's disk too
    follower.kill()  # and the follower's: no checkpoint at a clean stop, its log replayed record by record
    standalone = BrokerProcess(follower.data_dir).start()
    try:
        assert queue_ready(standalone, "fq") == len(sent)
        got = drain_bodies(standalone.port, "fq", len(sent))
        assert got == sent
        # in delivery order: by priority, then as published (the priorities came from the frames)
        assert list(got) == sorted(sent, key=lambda mid: -prio[mid])
    finally:
        standalone.terminate()
