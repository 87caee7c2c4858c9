"""When the running broker writes a checkpoint (broker/runtime/durability.py): after enough records,
after compaction deleted the segment a restart would start from, and its pointer only once the
checkpoint is on disk.  Durability over a real log, driven by hand."""

from broker.config import Config
from broker.runtime.durability import Durability
from broker.state.core import BrokerState
from broker.wal.log import WriteAheadLog


async def test_a_checkpoint_is_due_after_enough_records_and_pointed_at_once_written(tmp_path, monkeypatch):
    wal = WriteAheadLog(str(tmp_path), fsync="never")
    list(wal.open())
    state = BrokerState()
    state.enable_log()
    state.connect(1)
    dur = Durability(wal, state, Config(port=0, data_dir=str(tmp_path)))
    monkeypatch.setattr(Durability, "CHECKPOINT_RECORDS", 100)
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
