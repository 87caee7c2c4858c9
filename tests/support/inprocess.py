"""brokerd inside the test's own trio loop, on a real log with a fault seam.

For the faults a subprocess cannot be given (a full disk at a chosen byte,
an I/O error on fsync): the same ``Server`` and ``Durability`` that brokerd
runs, over a ``WriteAheadLog`` with a ``FaultPlan``, on real TCP.
"""

from __future__ import annotations

import cbor2

from broker.config import Config
from broker.runtime.durability import Durability
from broker.runtime.server import Server
from broker.state import BrokerState
from broker.wal import WriteAheadLog


async def serve_with_fault(tmp_path, nursery, fault, *, fsync: str = "always"):
    """Start a server on ``tmp_path/data`` whose log obeys ``fault``; return (server, port)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = Config(port=0, http_port=0, data_dir=str(data_dir), heartbeat=0)
    wal = WriteAheadLog(str(data_dir), fsync=fsync, fault=fault)
    state = BrokerState()
    state.replay(((r.lsn, r.type, cbor2.loads(r.payload)) for r in wal.open()), 0.0)
    state.enable_log()
    server = Server(config, state, Durability(wal, state, config))
    port = await nursery.start(server.serve)
    return server, port


def replayed_state(data_dir) -> BrokerState:
    """What a restart would recover from ``data_dir`` (a healthy log, opened and closed)."""
    state = BrokerState()
    wal = WriteAheadLog(str(data_dir), fsync="never")
    state.replay(((r.lsn, r.type, cbor2.loads(r.payload)) for r in wal.open()), 0.0)
    wal.close()
    return state
