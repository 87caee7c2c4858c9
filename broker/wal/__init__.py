"""The write-ahead log: ``records`` is the byte format, ``log`` the files.

``WriteAheadLog`` is the entry point; see ``broker/wal/log.py`` for the
on-disk format and the durability rules.
"""

from .log import (
    DEFAULT_FSYNC_INTERVAL_MS,
    DEFAULT_SEGMENT_BYTES,
    FSYNC_POLICIES,
    Batch,
    CorruptLog,
    Fault,
    FaultPlan,
    Record,
    RecoveryReport,
    SegmentInfo,
    WalError,
    WalFailed,
    WalLocked,
    WalVersionError,
    WriteAheadLog,
)
from .records import FORMAT_VERSION, MAX_RECORD_BYTES, WalFormatError

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
    "WalVersionError",
    "WalFailed",
    "WalFormatError",
    "FSYNC_POLICIES",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_FSYNC_INTERVAL_MS",
    "FORMAT_VERSION",
    "MAX_RECORD_BYTES",
]
