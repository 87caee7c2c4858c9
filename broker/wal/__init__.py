"""The write-ahead log: blocking file I/O, no trio.

``WriteAheadLog`` is the entry point.  One concept per module:

* ``format``: the bytes on disk (segment header, record, CRC and salt, the
  manifest) and the procedure for bumping the format version;
* ``log``: the ``WriteAheadLog``: append, batches, write/fsync, rotation;
* ``files``: the directory's lock, descriptors, writes and fsyncs;
* ``recovery``: replay at start-up, torn tail or corruption;
* ``repair``: ``--repair``, dropping only what cannot be read;
* ``faults``: the fault-injection seam tests use;
* ``errors``: the ``WalError`` family; catch ``WalError`` for any of them.
"""

from .errors import CorruptLog, WalError, WalFailed, WalFormatError, WalLocked, WalVersionError
from .faults import Fault, FaultPlan
from .format import FORMAT_VERSION, MAX_RECORD_BYTES
from .log import (
    DEFAULT_FSYNC_INTERVAL_MS,
    DEFAULT_SEGMENT_BYTES,
    FSYNC_POLICIES,
    Batch,
    SegmentInfo,
    WriteAheadLog,
)
from .recovery import MissingRecords, Record, RecoveryReport

__all__ = [
    "WriteAheadLog",
    "Record",
    "Batch",
    "SegmentInfo",
    "RecoveryReport",
    "FaultPlan",
    "Fault",
    "WalError",
    "WalLocked",
    "CorruptLog",
    "MissingRecords",
    "WalVersionError",
    "WalFailed",
    "WalFormatError",
    "FSYNC_POLICIES",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_FSYNC_INTERVAL_MS",
    "FORMAT_VERSION",
    "MAX_RECORD_BYTES",
]
