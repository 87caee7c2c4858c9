"""When the running broker writes a checkpoint (broker/runtime/durability.py): after enough records,
after compaction deleted the segment a restart would start from, and its pointer only once the
checkpoint is on disk.  Durability over a real log, driven by hand."""

from broker.config import Config
from broker.runtime.durability import Durability
from broker.state.core import BrokerState
from broker.wal.log import WriteAheadLog


def durability(tmp_path, monkeypatch):
    """A fresh log, a state logging to it, and its Durability with a checkpoint due from 100 records."""
    wal = WriteAheadLog(str(tmp_path), fsync="never")
    list(wal.open())
    state = BrokerState()
    state.enable_log()
    state.connect(1)
    monkeypatch.setattr(Durability, "CHECKPOINT_RECORDS", 100)
    return wal, state, Durability(wal, state, Config(port=0, data_dir=str(tmp_path)))


async def test_a_checkpoint_is_due_after_enough_records_and_pointed_at_once_written(tmp_path, monkeypatch):
    wal, state, dur = durability(tmp_path, monkeypatch)
    for i in range(150):
        state.publish(1, "q", b"b%d" % i, None, 0, 1.0)
    dur.submit(state.take_records(), {}, lambda box: None)
    await dur._locked(dur._write_pending)
    assert dur.records == 150 and dur.checkpoint_due()  # 150 >= 100 records and >= 150 queued / 4
    await dur._after_write()  # writes one
    assert dur.checkpoints == 1 and not dur.checkpoint_due()
    assert not (tmp_path / "CHECKPOINT").exists()  # not pointed at before it is on disk
    await dur._locked(dur._write_pending)
    await dur._after_write()
    assert (tmp_path / "CHECKPOINT").exists()
    # compaction deleted the segment holding it: a new one is due at once, whatever the count
    dur._checkpoint_at, dur._checkpoint_lost = None, True
    assert dur.checkpoint_due()
    wal.close()


def test_after_a_start_from_a_checkpoint_the_live_estimate_is_the_whole_logs_average(tmp_path):
    """The records replayed from a checkpoint are few and big (its blocks): their average would
    make the live size look huge and compaction never start while a restarted broker drains."""
    import cbor2

    from broker.state.queue import PACK_AFTER

    wal = WriteAheadLog(str(tmp_path), fsync="never")
    list(wal.open())
    state = BrokerState()
    state.enable_log()
    state.connect(1)
    for i in range(3000):
        state.publish(1, "q", b"x" * 100, None, 0, 1.0)
    first = state.checkpoint()
    for t, p in state.take_records():
        wal.append(t, cbor2.dumps(p))
    wal.write_batch(wal.take_batch())
    wal.sync()
    wal.save_checkpoint(first)
    wal.close()
    wal = WriteAheadLog(str(tmp_path), fsync="never")
    state = BrokerState()
    state.set_body_reader(wal.read_payloads)
    state.replay(((r.lsn, r.type, cbor2.loads(r.payload)) for r in wal.open(use_checkpoint=True)), 2.0,
                 checkpoint=wal.replay_from)
    # not 3,000: the first PACK_AFTER ready messages are records of their own, the rest blocks
    assert wal.replay_from == first and wal.recovery.records < PACK_AFTER + 100
    dur = Durability(wal, state, Config(port=0, data_dir=str(tmp_path)))
    per_message = dur.live_bytes_estimate() / 3000
    assert 100 < per_message < 200, per_message  # a 100-byte body's record, not a block's
    wal.close()


async def test_at_depth_a_checkpoint_is_due_after_a_tenth_of_the_queue_so_a_crash_replays_little(tmp_path, monkeypatch):
    """Past CHECKPOINT_RECORDS, a checkpoint is due once the records since the last one reach a
    tenth of what is queued: what a crash at depth replays one by one (a quarter left 2,500,000
    records, 30 CPU-s of start-up, at 10,000,000 queued)."""
    wal, state, dur = durability(tmp_path, monkeypatch)
    for i in range(5000):
        state.publish(1, "q", b"b%d" % i, None, 0, 1.0)
    dur.submit(state.take_records(), {}, lambda box: None)
    await dur._locked(dur._write_pending)
    await dur._after_write()  # the checkpoint of 5,000 queued
    assert dur.checkpoints == 1
    await dur._locked(dur._write_pending)
    await dur._after_write()
    # Publish one at a time: due exactly when the records since the checkpoint (its own
    # records count: a crash replays them too) reach a tenth of the queued messages.
    i = 0
    while True:
        since = dur.records - dur._records_at_checkpoint
        queued = state.queues["q"].ready_count
        assert dur.checkpoint_due() == (since >= queued // 10), (since, queued)
        if since >= queued // 10:
            break
        state.publish(1, "q", b"c%d" % i, None, 0, 1.0)
        i += 1
        dur.submit(state.take_records(), {}, lambda box: None)
        await dur._locked(dur._write_pending)
    assert i > 0 and since < queued // 4  # due at a tenth, where a quarter would still wait
    wal.close()
