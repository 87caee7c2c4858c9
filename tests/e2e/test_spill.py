"""Queues deeper than memory (protocol.md §9, README "Memory"): queued bodies left in the log
come back byte-identical, after a restart and after compaction rewrote them; past the
--max-memory watermark every queued body spills.  A real brokerd, real TCP, a real data dir.
"""

import subprocess
import sys

from client import wire
from tests.support.wireclient import Raw
from tests.support.waiting import wait_for

KiB = 1024


def stats(port: int) -> dict:
    r = Raw(port, name="stats")
    try:
        return r.ok(wire.OP_STATS, None)["broker"]
    finally:
        r.close()




def publish_all(port: int, queue: str, messages: list) -> None:
    p = Raw(port, name="producer")
    for mid, body in messages:
        f = p.call(wire.OP_PUBLISH, queue, body, mid, 0, None)
        assert f[0] == wire.OP_OK, f
    p.close()


def consume(port: int, queue: str, n: int) -> list:
    c = Raw(port, name="consumer")
    c.ok(wire.OP_CONSUME, [queue], 50)
    got = []
    while len(got) < n:
        for d in c.deliveries(1, timeout=10):
            got.append((d[4], d[5]))
            assert c.ok(wire.OP_ACK, d[2]) == 1
    c.close()
    return got


def churn_until_compacted(broker) -> None:
    """Traffic through another queue until compaction has rewritten queued messages forward."""
    p = Raw(broker.port, name="churn")
    c = Raw(broker.port, name="churn-consumer")
    c.ok(wire.OP_CONSUME, ["churn"], 100)

    def compacted():
        for _ in range(100):
            assert p.call(wire.OP_PUBLISH, "churn", b"c" * 2000, None, 0, None)[0] == wire.OP_OK
        for d in c.deliveries(100, timeout=10):
            c.ok(wire.OP_ACK, d[2])
        return any("compaction: rewrote" in line and "rewrote 0 " not in line for line in broker.log)

    wait_for(compacted, 60, "compaction to rewrite the queued messages")
    p.close()
    c.close()


def test_spilled_bodies_come_back_byte_identical_after_compaction_and_a_restart(broker_factory):
    broker = broker_factory("--spill-body-bytes", "1000", "--segment-bytes", "65536", "--fsync", "never")
    # Bodies of 1000 bytes or more are left in the log; smaller ones stay in memory; ids the
    # broker makes and ids the producer gives.
    messages = [(f"job-{i}" if i % 3 else None, bytes([i % 256, (i * 7) % 256]) * (500 + (i % 700)))
                for i in range(600)]
    publish_all(broker.port, "deep", messages)
    st = wait_for(lambda: (s := stats(broker.port))["spilled_messages"] > 300 and s, 10, "bodies to spill")
    assert st["spilled_blocks"] >= 1
    # Traffic through another queue until compaction has rewritten the spilled messages forward
    # and deleted the segments their PUBLISH records were in.
    churn_until_compacted(broker)
    wait_for(lambda: stats(broker.port)["spilled_messages"] > 300, 10, "the rewritten bodies to spill again")
    first = consume(broker.port, "deep", 200)
    broker.terminate()
    broker.restart()
    assert stats(broker.port)["spilled_messages"] > 0  # big bodies stay in the log after a restart too
    rest = consume(broker.port, "deep", 400)
    got = first + rest
    assert [b for _, b in got] == [b for _, b in messages]
    assert [mid for mid, _ in got][1::3] == [mid for mid, _ in messages][1::3]  # the ids given
    assert stats(broker.port)["spill_reads"] > 0


def test_past_the_watermark_every_queued_body_spills_and_comes_back(broker_factory):
    # --max-memory 1: past it from the start, so every body spills once written; the hard
    # limit (refusals) well above what this run uses.
    broker = broker_factory("--max-memory", "1", "--max-memory-hard", "4G", "--fsync", "never")
    wait_for(lambda: stats(broker.port)["memory_spilling"], 10, "the watermark to be noticed")
    messages = [(None if i % 2 else f"t-{i}", b"%06d" % i + b"." * 94) for i in range(2500)]
    publish_all(broker.port, "backlog", messages)
    st = wait_for(lambda: (s := stats(broker.port))["spilled_messages"] >= 2048 and s, 10, "small bodies to spill")
    assert st["memory_hard_limit"] == 4 * 1024 ** 3 and st["memory_alarm"] is False
    got = consume(broker.port, "backlog", 2500)
    assert [b for _, b in got] == [b for _, b in messages]
    assert stats(broker.port)["spill_reads"] >= 2


def test_bad_spill_settings_are_named():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=30)

    r = run("--spill-body-bytes", "-5")
    assert r.returncode == 2 and "spill_body_bytes: must be a number of bytes, or 0" in r.stderr
    r = run("--max-memory-hard", "lots")
    assert r.returncode == 2 and r.stderr.strip() == (
        "brokerd: --max-memory-hard: 'lots' is not a number of bytes (write e.g. 1048576, 512M or 2G)"
    )


def test_a_restart_reads_the_log_from_the_clean_stops_checkpoint_and_loses_nothing(broker_factory):
    """A clean stop writes a checkpoint (broker/state/replay.py): the next start loads the queue's
    index from it instead of replaying every publish; records after it (here: more traffic, then
    a kill -9) are replayed on top.  Every body comes back byte-identical, in order."""
    import re

    def recovered_line():
        return [line for line in broker.log if "recovered" in line and "log records" in line][-1]

    broker = broker_factory("--segment-bytes", "65536", "--fsync", "never")
    messages = [(None if i % 2 else f"ck-{i}", b"%05d" % i + bytes([i % 256]) * (50 + i % 200))
                for i in range(3000)]
    publish_all(broker.port, "ck", messages)
    got = consume(broker.port, "ck", 100)
    broker.terminate()
    broker.restart()
    line = recovered_line()
    assert "from the checkpoint" in line, line
    # 3,000 publishes, 100 deliveries and acks: not replayed one by one (the checkpoint keeps the
    # first PACK_AFTER ready messages of a queue as records of their own, the rest as blocks)
    from broker.state.queue import PACK_AFTER

    assert int(re.search(r"recovered (\d+) log records", line).group(1)) < PACK_AFTER + 100, line
    more = [(f"more-{i}", b"m%04d" % i + b"m" * (50 + i * 3)) for i in range(50)]
    publish_all(broker.port, "ck", more)
    got += consume(broker.port, "ck", 100)
    broker.kill()  # no checkpoint at this stop: the records since the last one are replayed
    broker.restart()
    assert "from the checkpoint" in recovered_line(), "\n".join(broker.log)
    got += consume(broker.port, "ck", len(messages) + len(more) - 200)
    assert [b for _, b in got] == [b for _, b in messages + more]
    assert [mid for mid, _ in got][0:len(messages):2] == [mid for mid, _ in messages][0::2]  # the ids given


def publish_batches(port: int, queue: str, messages: list, per: int = 50) -> None:
    """PUBLISH_BATCH frames of ``per`` items with their own ids: every frame after the one that
    makes the queue is logged as it came (log_records PUBLISH_FRAME)."""
    p = Raw(port, name="batch-producer")
    for s in range(0, len(messages), per):
        f = p.call(wire.OP_PUBLISH_BATCH, [[queue, body, mid, 0, None] for mid, body in messages[s:s + per]])
        assert f[0] == wire.OP_OK and f[2] is None, f
    p.close()


def test_bodies_of_frames_logged_as_they_came_come_back_after_compaction_a_restart_and_a_kill(broker_factory):
    broker = broker_factory("--spill-body-bytes", "1000", "--segment-bytes", "65536", "--fsync", "never")
    messages = [(f"b-{i}", bytes([i % 256, (i * 11) % 256]) * (400 + (i % 900))) for i in range(600)]
    publish_batches(broker.port, "frames", messages)
    wait_for(lambda: stats(broker.port)["spilled_messages"] > 200, 10, "bodies to spill")
    churn_until_compacted(broker)
    first = consume(broker.port, "frames", 150)
    broker.terminate()
    broker.restart()
    second = consume(broker.port, "frames", 150)
    # frames published after the restart, then a kill -9: replayed from the log itself
    more = [(f"m-{i}", bytes([i % 256]) * (1000 + i)) for i in range(200)]
    publish_batches(broker.port, "frames", more, per=40)
    broker.kill()
    broker.restart()
    rest = consume(broker.port, "frames", 300 + 200)
    got = first + second + rest
    assert got == messages + more  # ids and bodies, byte-identical, in order


def test_brokerd_logs_a_plain_publish_batch_frame_with_the_bytes_it_came_in(broker_factory):
    import cbor2

    from broker.state import log_records as R
    from broker.wal.log import WriteAheadLog

    broker = broker_factory("--fsync", "never")
    items = [["logged", bytes([i]) * 30, f"f-{i}", i % 2, {"dedupe": f"k-{i}"}] for i in range(5)]
    publish_batches(broker.port, "logged", [("first", b"makes the queue")], per=1)
    p = Raw(broker.port, name="frames")
    f = p.call(wire.OP_PUBLISH_BATCH, items)
    assert f[0] == wire.OP_OK and f[2] is None
    sent = cbor2.dumps([wire.OP_PUBLISH_BATCH, f[1], items])  # the frame as this client encoded it
    p.close()
    broker.terminate()
    wal = WriteAheadLog(str(broker.data_dir), fsync="never")
    records = [(r.lsn, r.type, cbor2.loads(r.payload)) for r in wal.open()]
    wal.close()
    frames = [(lsn, p) for lsn, t, p in records if t == R.PUBLISH_FRAME]
    assert len(frames) == 1
    lsn, (seq, _ts, data) = frames[0]
    assert seq == lsn and data == sent  # byte for byte what came over the socket
    nexts = [(n, p) for n, t, p in records if t == R.PUBLISH_NEXT]
    assert nexts == [(lsn + k, k) for k in range(1, 5)]
    broker.restart()
    assert consume(broker.port, "logged", 6) == [("f-1", bytes([1]) * 30), ("f-3", bytes([3]) * 30),
                                                 ("first", b"makes the queue"), ("f-0", bytes([0]) * 30),
                                                 ("f-2", bytes([2]) * 30), ("f-4", bytes([4]) * 30)]


def test_hostile_publish_batches_logged_as_they_came_cost_nothing_and_replay(broker_factory):
    """What rides along in a PUBLISH_BATCH whose items are plain is logged with it (its bytes as
    they came): unknown CBOR tags, a bignum, deep nesting, control characters in ids, a frame just
    past the size that is logged whole.  A healthy client keeps working beside them, and after a
    kill -9 brokerd replays all of it."""
    import cbor2

    broker = broker_factory("--fsync", "never")
    healthy = Raw(broker.port, name="healthy")
    assert healthy.call(wire.OP_PUBLISH, "ok", b"before", "h-0", 0, None)[0] == wire.OP_OK
    publish_batches(broker.port, "hostile", [("first", b"makes the queue")], per=1)
    nested = []
    for _ in range(200):
        nested = [nested]
    extras = [
        cbor2.CBORTag(55555, [1, "x", b"\x00"]),  # a tag nobody defined: kept as an opaque tag
        2 ** 200,  # a bignum (tag 2)
        nested,  # 200 levels deep
        {"\x00\x1b[31m": "\r\n\x7f"},  # control characters
    ]
    h = Raw(broker.port, name="hostile")
    expected = [("first", b"makes the queue")]
    for k, extra in enumerate(extras):
        items = [["hostile", bytes([k, i]) * 20, f"x{k}-{i}\x00\x1b\n", 255 if i % 2 else None, None] for i in range(5)]
        f = h.call(wire.OP_PUBLISH_BATCH, items, extra)
        assert f[0] == wire.OP_OK and f[2] is None, f
        expected += [(it[2], it[1]) for it in items]
        assert healthy.call(wire.OP_PUBLISH, "ok", b"beside %d" % k, f"h-{k + 1}", 0, None)[0] == wire.OP_OK
    big = [["hostile", b"b" * 1000, f"big-{i}", 0, None] for i in range(1100)]  # ~1.1 MiB: PUBLISH per item
    assert h.call(wire.OP_PUBLISH_BATCH, big)[2] is None
    expected += [(it[2], it[1]) for it in big]
    h.close()
    healthy.close()
    broker.kill()
    from broker.state import log_records as R
    from broker.wal.log import WriteAheadLog

    wal = WriteAheadLog(str(broker.data_dir), fsync="never")
    frames = [cbor2.loads(cbor2.loads(r.payload)[2]) for r in wal.open() if r.type == R.PUBLISH_FRAME]
    wal.close()
    # the four logged as they came, what rode along included (compared as CBOR: a tag decodes its
    # array to a tuple)
    assert [cbor2.dumps(f[3]) for f in frames] == [cbor2.dumps(e) for e in extras]
    broker.restart()
    got = consume(broker.port, "hostile", len(expected))
    # priority 255 first, in publish order, then the rest in publish order
    first = [e for e in expected if e[0].endswith("\x00\x1b\n") and int(e[0].split("-")[1][0]) % 2]
    assert got == first + [e for e in expected if e not in first]
    assert consume(broker.port, "ok", 5) == [(f"h-{i}", b"before" if i == 0 else b"beside %d" % (i - 1))
                                             for i in range(5)]
