"""Repair: make a damaged log replayable, dropping only what cannot be read.

Repair (``open(repair=True)``, ``brokerd --repair``) drops only what it cannot
read.  It checks every segment; at a bad record it resynchronises on the next
record whose CRC passes with the segment's salt and whose lsn is plausible
(greater than the last kept one, below the next segment's first, and at most
one lsn per 18 skipped bytes); a damaged header is rebuilt from the file name
and its salt solved from an intact record's CRC (CRC-32 is affine in its seed)
and confirmed by the record after it.  A segment that lost anything is
rewritten under the same name (same salt, the kept records' bytes unchanged,
temporary file + rename), and every lsn range now missing becomes a manifest
gap.  Each dropped range is logged and reported (``recovery.dropped``: file,
offset, bytes, lsns).  Repair is idempotent: a crash during it, rerun it.

``salvage`` runs before the replay (``WriteAheadLog.open(repair=True)``) and
leaves a directory that ``recovery.replay_segments`` accepts: damaged bytes
cut out, every lost lsn range written to the manifest as a gap.
"""

from __future__ import annotations

import os
import re
import zlib

from .errors import WalFormatError, WalVersionError
from .files import LogFiles
from .format import (
    CRC_START,
    MANIFEST_NAME,
    MAX_LSN,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    LSN_FIELD,
    DecodedRecord,
    TruncatedRecord,
    UnsupportedVersion,
    decode_record,
    decode_segment_header,
    encode_segment_header,
)
from .recovery import DroppedRange, ReplayState

__all__ = ["salvage", "resync", "solve_salt", "recover_salt", "valid_at", "add_gap"]


def salvage(
    files: LogFiles, manifest: tuple[int, dict[int, int]] | None, st: ReplayState
) -> tuple[int, dict[int, int]] | None:
    """``open(repair=True)``: make the directory replayable, dropping only what cannot be read.

    Every segment is checked record by record.  At a bad record the scan
    resynchronises on the next record whose header, CRC and lsn check out
    (``resync``); a damaged segment header is rebuilt from its file name
    and the salt solved from an intact record (``recover_salt``).  A
    segment that lost anything is rewritten (same name, same salt, the
    valid records' bytes unchanged: temporary file, fsync, rename), and
    the lsn ranges that are now missing go into the manifest as gaps,
    which replay then accepts.  Returns the manifest to replay with.
    """
    listing = files.list_segments()
    start = manifest[0] if manifest is not None else None
    gaps = dict(manifest[1]) if manifest is not None else {}
    changed = False
    # First, which files can be read at all (and with which salt).  A file
    # none of whose records validates is moved aside, not deleted, and does
    # not limit the lsns of the segment before it (a stray file).
    readable: list[tuple[int, str, int, str | None]] = []
    for index, (name_lsn, name) in enumerate(listing):
        path = os.path.join(files.directory, name)
        with open(path, "rb") as f:
            data = f.read()
        header_problem = None
        salt = None
        try:
            header = decode_segment_header(data)
            salt = header.salt
            if header.first_lsn != name_lsn:
                header_problem = f"segment header says its first lsn is {header.first_lsn}"
        except UnsupportedVersion as e:
            raise WalVersionError(path, e.version, 1) from None
        except WalFormatError as e:
            if index == len(listing) - 1 and (len(data) < SEGMENT_HEADER_SIZE or data.count(0) == len(data)):
                continue  # a crash while creating it: the replay deletes it
            header_problem = str(e)
        if header_problem is not None:
            salt = recover_salt(data, name_lsn, trust_first=True)
        elif len(data) > SEGMENT_HEADER_SIZE and valid_at(data, SEGMENT_HEADER_SIZE, salt, name_lsn, MAX_LSN)[0] is None:
            # The first record fails: the record, or the salt in the header?
            solved = recover_salt(data, name_lsn, trust_first=False)
            if solved is not None and solved != salt:
                header_problem = f"segment header salt 0x{salt:08x} does not match its records (0x{solved:08x} does)"
                salt = solved
        if salt is None:
            aside = path + ".damaged"
            os.replace(path, aside)
            files.fsync_directory()
            drop(files, st, name, 0, len(data), None, None, None,
                       f"{header_problem} and no record in it can be validated; moved it to {os.path.basename(aside)}")
            changed = True
            continue
        readable.append((name_lsn, name, salt, header_problem))

    prev: int | None = None  # last kept lsn
    for index, (name_lsn, name, salt, header_problem) in enumerate(readable):
        is_last = index == len(readable) - 1
        limit = readable[index + 1][0] - 1 if not is_last else MAX_LSN  # lsns this file may hold
        path = os.path.join(files.directory, name)
        with open(path, "rb") as f:
            data = f.read()
        # Where the log (re)starts, and gaps before this file.
        if prev is None:
            if start is None or name_lsn > start:
                if start is not None:
                    drop(files, st, name, 0, 0, start, name_lsn - 1, name_lsn - start,
                               f"segment files holding lsns {start}..{name_lsn - 1} are missing")
                start = name_lsn
                changed = True
            prev = name_lsn - 1
        elif name_lsn > prev + 1:
            drop(files, st, name, 0, 0, prev + 1, name_lsn - 1, name_lsn - prev - 1,
                       f"no segment holds lsns {prev + 1}..{name_lsn - 1}")
            add_gap(gaps, prev + 1, name_lsn - 1)
            changed = True
            prev = name_lsn - 1
        kept: list[tuple[int, int]] = []  # (offset, end) of the records kept
        pos = SEGMENT_HEADER_SIZE
        size = len(data)
        lost = header_problem is not None
        if lost:
            st.warn(f"repair of {files.directory}: {header_problem} in {name}; rebuilt its header")
        while pos < size:
            rec, reason = valid_at(data, pos, salt, prev + 1, limit)
            if rec is not None:
                kept.append((rec.offset, rec.end))
                if rec.lsn > prev + 1:
                    drop(files, st, name, pos, 0, prev + 1, rec.lsn - 1, rec.lsn - prev - 1,
                               f"no record holds lsns {prev + 1}..{rec.lsn - 1}")
                    add_gap(gaps, prev + 1, rec.lsn - 1)
                    changed = True
                prev = rec.lsn
                pos = rec.end
                continue
            slack = sum(b - a + 1 for a, b in gaps.items() if b > prev)
            found = resync(data, pos + 1, salt, prev + 1, limit, slack)
            lost = True
            if found is None:
                if is_last and data.count(0, pos) == size - pos:
                    reason = "zero bytes (a torn tail)"
                drop(files, st, name, pos, size - pos, prev + 1, None if is_last else limit,
                           None if is_last else max(0, limit - prev), reason)
                if not is_last and limit > prev:
                    add_gap(gaps, prev + 1, limit)
                    prev = limit
                break
            drop(files, st, name, pos, found.offset - pos, prev + 1, found.lsn - 1, found.lsn - prev - 1, reason)
            if found.lsn > prev + 1:
                add_gap(gaps, prev + 1, found.lsn - 1)
                prev = found.lsn - 1
            pos = found.offset
        if lost:
            out = bytearray(encode_segment_header(salt, name_lsn))
            for a, b in kept:
                out += data[a:b]
            files.replace_segment(path, name, out)
            changed = True
    if not readable and start is not None:
        drop(files, st, MANIFEST_NAME, 0, 0, start, None, None,
                   f"the log starts at lsn {start} but no segment file is left")
        st.allow_empty = True
    if changed or manifest is None:
        if start is None:
            start = st.min_next_lsn
        files.write_manifest(start, gaps)
        st.repaired = st.repaired or changed
        return (start, gaps)
    return manifest

def drop(
    files: LogFiles, st: ReplayState, name: str, offset: int, nbytes: int,
    first: int | None, last: int | None, records: int | None, reason: str,
) -> None:
    """Account for bytes (and lsns) a repair gives up on: report, warn, count."""
    st.repaired = True
    st.dropped_ranges.append(DroppedRange(name, offset, nbytes, first, last, records, reason))
    st.truncated_bytes += nbytes
    if st.truncated_at is None:
        st.truncated_at = (name, offset)
    if records is None:
        st.dropped_exact = False
    else:
        st.dropped += records
    lsns = (
        "records of unknown lsns" if first is None else
        "no lsn" if records == 0 else
        f"lsns {first}..{last} ({records} record(s))" if last is not None else
        f"the records from lsn {first} on (how many is unknown)"
    )
    st.warn(
        f"repair of {files.directory}: {reason} at byte offset {offset} of {name}; "
        f"dropped {nbytes} bytes holding {lsns}"
    )


def add_gap(gaps: dict[int, int], first: int, last: int) -> None:
    """Record that lsns first..last are gone for good, merging with adjacent gaps."""
    if last < first:
        return
    for a, b in list(gaps.items()):
        if b == first - 1 or (a <= first <= b + 1):
            first = min(first, a)
            last = max(last, b)
            del gaps[a]
        elif a == last + 1 or (first <= a <= last + 1):
            last = max(last, b)
            del gaps[a]
    gaps[first] = last


# --------------------------------------------------------------------------- finding records in damage


def valid_at(data: bytes, pos: int, salt: int, lo: int, hi: int) -> tuple[DecodedRecord | None, str]:
    """The record at ``pos`` if it is valid with an lsn in lo..hi, else (None, why not)."""
    try:
        rec = decode_record(data, pos, salt)
    except TruncatedRecord:
        return None, "record runs past the end of the segment"
    except WalFormatError as e:
        return None, str(e).replace(f"record at offset {pos} ", "record ")
    if rec.lsn < lo:
        return None, f"record lsn {rec.lsn} repeats or goes back (expected at least {lo})"
    if rec.lsn > hi:
        return None, f"record lsn {rec.lsn} belongs to a later segment"
    return rec, ""


_NONZERO = re.compile(rb"[^\x00]")


def resync(data: bytes, start: int, salt: int, lo: int, hi: int, slack: int = 0) -> DecodedRecord | None:
    """The first valid record at or after ``start`` with a plausible lsn, or None.

    A candidate must pass its CRC (with this segment's salt) and carry an lsn
    the damage could have skipped to: between ``lo`` and ``hi``, and at most
    one lsn per 18 bytes skipped (a record is at least that long) plus
    ``slack`` (the lsns of gaps a repair recorded earlier).  That makes a
    chance match in payload bytes vanishingly rare (a CRC and an lsn in a
    narrow window).  Candidates are found with ``bytes.find`` on the lsn
    field's fixed leading bytes and zero runs are skipped, so garbage costs
    C speed, not a Python step per byte.
    """
    size = len(data)
    last = size - RECORD_HEADER_SIZE
    top = min(hi, lo + (size - start) // RECORD_HEADER_SIZE + 1 + slack)
    if top < lo:
        return None
    low_field, top_field = LSN_FIELD.pack(lo), LSN_FIELD.pack(top)
    k = 0
    while k < 8 and low_field[k] == top_field[k]:
        k += 1
    prefix = low_field[:k]
    zero_prefix = not any(prefix)
    unpack = RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    o = start
    with memoryview(data) as view:
        while o <= last:
            if k:
                hit = data.find(prefix, o + CRC_START)
                if hit == -1:
                    return None
                o = hit - CRC_START
                if o > last:
                    return None
            length, crc, lsn, type_, _flags = unpack(data, o)
            if lo <= lsn <= top and type_ != 0 and lsn <= lo + (o - start) // RECORD_HEADER_SIZE + 1 + slack:
                end = o + RECORD_HEADER_SIZE + length
                if end <= size and crc32(view[o + CRC_START : end], salt) == crc:
                    return decode_record(data, o, salt)
            elif lsn == 0 and zero_prefix:
                # Inside a run of zeros: the next candidate's lsn field must
                # hold the run's first nonzero byte.
                m = _NONZERO.search(data, o + CRC_START)
                if m is None:
                    return None
                o = max(o + 1, m.start() - 15)
                continue
            o += 1
    return None


def solve_salt(body: bytes | memoryview, crc: int) -> int | None:
    """The salt ``s`` with ``zlib.crc32(body, s) == crc``.

    CRC-32 is affine in its starting value: ``crc32(body, s) ^ crc32(body, 0)``
    is a linear map of ``s`` over GF(2) (multiplication by x^(8n) mod the
    CRC polynomial, so invertible); Gaussian elimination on its 32 columns
    gives the one salt that matches.
    """
    base = zlib.crc32(body, 0)
    basis: dict[int, tuple[int, int]] = {}  # pivot bit -> (vector, salt bits making it)
    for i in range(32):
        v, c = zlib.crc32(body, 1 << i) ^ base, 1 << i
        while v:
            p = v.bit_length() - 1
            if p not in basis:
                basis[p] = (v, c)
                break
            bv, bc = basis[p]
            v ^= bv
            c ^= bc
    t, s = crc ^ base, 0
    while t:
        p = t.bit_length() - 1
        if p not in basis:
            return None
        bv, bc = basis[p]
        t ^= bv
        s ^= bc
    return s


SALT_PROBE_LSNS = 64  # when the first record is damaged too, look for any of the next this-many lsns
SALT_PROBE_MAX_BYTES = 1 << 20  # solve only from records up to this size (33 CRCs of it)


def recover_salt(data: bytes, name_lsn: int, *, trust_first: bool) -> int | None:
    """Find the salt of a segment whose header is damaged, from its records.

    The header's own salt field is tried first (the damage may be elsewhere
    in the header).  Otherwise the salt is solved from a record's stored CRC
    (``solve_salt``: any bytes solve to *some* salt) and accepted only if the
    record after it validates with it too.  ``trust_first``: the header is
    known to be damaged, so a lone first record with the lsn the file name
    promises is accepted on its own (its CRC cannot be checked any other way).
    """
    size = len(data)
    if size >= 16:
        raw = int.from_bytes(data[12:16], "big")
        first, _ = valid_at(data, SEGMENT_HEADER_SIZE, raw, name_lsn, MAX_LSN)
        if first is not None:
            return raw
    candidates = [SEGMENT_HEADER_SIZE]
    for lsn in range(name_lsn, min(name_lsn + SALT_PROBE_LSNS, MAX_LSN + 1)):
        hit = data.find(LSN_FIELD.pack(lsn), SEGMENT_HEADER_SIZE + CRC_START)
        if hit != -1:
            candidates.append(hit - CRC_START)
    for p in candidates:
        if p + RECORD_HEADER_SIZE > size:
            continue
        length, crc, lsn, _type, _flags = RECORD_HEADER.unpack_from(data, p)
        end = p + RECORD_HEADER_SIZE + length
        if lsn < name_lsn or length > SALT_PROBE_MAX_BYTES or end > size:
            continue
        with memoryview(data) as view:
            salt = solve_salt(view[p + CRC_START : end], crc)
        if salt is None:
            continue
        if end < size:
            if valid_at(data, end, salt, lsn + 1, MAX_LSN)[0] is not None:
                return salt
        elif trust_first and p == SEGMENT_HEADER_SIZE and lsn == name_lsn:
            return salt
    return None
