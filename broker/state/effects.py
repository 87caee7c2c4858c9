"""What a batch of state calls asks of the outside world, as one value.

The runtime applies it after each batch: ``frames`` go to their connections
(``frames[conn_id]`` in order), ``records`` go to the write-ahead log (they take
the LSNs up to ``BrokerState.last_lsn``, in order), and the ticker sleeps until
``next_wakeup`` at most (a wall-clock time; ``inf`` when nothing is timed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Effects:
    frames: dict  # conn id -> list of frames to send
    records: list  # (type, payload) log records, oldest first; empty without a log
    next_wakeup: float
