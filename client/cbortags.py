"""Two CBOR tags of brokerd's own, for what Celery accepts as task arguments and CBOR's standard tags
cannot carry: a naive ``datetime`` and a ``datetime.time`` (protocol.md §8.1).  Pure: no clock.

``dumps_value`` encodes an argument (the common case pays nothing extra: only a value cbor2 refuses is
walked for these two types); ``tag_times`` is the walk; ``untag`` is the decoder's ``tag_hook``.
"""

from __future__ import annotations

import datetime as _dt

import cbor2

# Celery accepts a naive ``datetime`` or a ``datetime.time`` as an argument and the task gets it back as
# it was.  CBOR's own date/time tags need a UTC offset and have no time of day, so these two travel as
# brokerd's own tags, ISO 8601 text without (datetime) or with an optional (time) offset:
NAIVE_DATETIME_TAG = 50001  # "2026-12-02T10:30:00.000001": a datetime without tzinfo, round-trips naive
TIME_OF_DAY_TAG = 50002  # "10:30:00" or "10:30:00+02:00": a datetime.time
TAGGED_TEXT_MAX = 64  # characters: longer text under these tags is not a datetime, refused at decode
TAGGED_DEPTH_MAX = 64  # nesting levels searched for them in arguments (CBOR itself refuses deeper values)


def tag_times(value, depth=0):
    """``value`` with every naive datetime and every time replaced by its tag (containers copied)."""
    if depth > TAGGED_DEPTH_MAX:
        return value
    if isinstance(value, _dt.datetime):
        return cbor2.CBORTag(NAIVE_DATETIME_TAG, value.isoformat()) if value.tzinfo is None else value
    if isinstance(value, _dt.time):
        return cbor2.CBORTag(TIME_OF_DAY_TAG, value.isoformat())
    if isinstance(value, (list, tuple)):
        return [tag_times(v, depth + 1) for v in value]  # a CBOR array either way
    if isinstance(value, dict):
        return {k: tag_times(v, depth + 1) for k, v in value.items()}
    return value


def dumps_value(value) -> bytes:
    """CBOR of a task argument: as is, or (when CBOR refused it) with naive datetimes and times tagged.
    The common case pays nothing; only a value cbor2 refuses is walked."""
    try:
        return cbor2.dumps(value)
    except Exception:  # noqa: BLE001 - cbor2 raises several kinds; retry with the tags, else re-raise that
        return cbor2.dumps(tag_times(value))


def untag(*args):
    # cbor2 6 calls tag_hook(tag, immutable); cbor2 5 called tag_hook(decoder, tag)
    tag = args[0] if isinstance(args[0], cbor2.CBORTag) else args[1]
    if tag.tag in (NAIVE_DATETIME_TAG, TIME_OF_DAY_TAG):
        what = "naive datetime" if tag.tag == NAIVE_DATETIME_TAG else "time of day"
        text = tag.value
        if type(text) is not str or len(text) > TAGGED_TEXT_MAX:
            raise ValueError(f"CBOR tag {tag.tag} ({what}) must hold ISO 8601 text of at most {TAGGED_TEXT_MAX} "
                             f"characters (got {type(text).__name__})")
        try:
            if tag.tag == NAIVE_DATETIME_TAG:
                value = _dt.datetime.fromisoformat(text)
                if value.tzinfo is not None:
                    raise ValueError("it has a UTC offset")
                return value
            return _dt.time.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"CBOR tag {tag.tag} ({what}) holds {text[:TAGGED_TEXT_MAX]!r}, not ISO 8601: {exc}") from None
    return tag
