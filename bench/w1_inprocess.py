"""The broker's CPU per message without sockets (issue 18): handlers + state + log-record encoding,
driven in-process the way W1 and W2 drive a real brokerd.  A benchmark, not a test: steadier than
the end-to-end figures on a shared machine (no scheduler, no neighbours' sockets), so a change to
the hot path can be measured A/B (run it in two checkouts, one after the other).

    python bench/w1_inprocess.py                  # W1, the consumer keeping up: 50,000 x 100 B
    python bench/w1_inprocess.py --shape deep     # W1 behind a 5,000-message backlog (packed), kept
                                                  # as deep: 100 acked per 100 published
    python bench/w1_inprocess.py --shape w2       # W2: 10,000 no-op task envelopes, RESULT_SET + tag

W1 shapes: PUBLISH_BATCH frames of 100 items with their own ids and ``dedupe`` keys (what the SDK
sends), a consumer with prefetch 100 acking in lists of 50.  W2: the same publishes of bench.noop
envelopes, a consumer with prefetch 32 and 2 slots storing each result with its delivery's tag, 16
per read.  Every record is CBOR-encoded as the log writer would (durability._encode_record) and
framed; nothing is written.  Prints the median CPU seconds of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
import uuid
from pathlib import Path

# BENCH_ROOT: the checkout whose broker is measured (default: this one), so another checkout's
# code runs under the same driver for an A/B (BENCH_ROOT=/work/main python bench/w1_inprocess.py)
ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parent.parent)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402

from broker.handlers.binary import handle  # noqa: E402
from broker.runtime.durability import _encode_record  # noqa: E402
from broker.state import BrokerState  # noqa: E402
from client.envelope import make_envelope  # noqa: E402
from client.wire import OP_ACK, OP_CONSUME, OP_DELIVER, OP_PUBLISH_BATCH, OP_RESULT_SET  # noqa: E402

P, C = 1, 2  # producer and consumer connection ids
HEADER = struct.Struct(">IIQBB")  # a record header's size, as the log frames each record
BACKLOG = 5_000  # messages queued before the consumer comes (--shape deep)


def drain(s, out: bytearray, got: list) -> None:
    """Encode the records as the log writer would; collect (tag, id) of the consumer's deliveries."""
    eff = s.take_effects()
    for t, p in eff.records:
        d = _encode_record(t, p)
        out += HEADER.pack(len(d), 0, 0, t, 0)
        out += d
    for f in eff.frames.get(C, ()):
        if f[0] == OP_DELIVER:
            got.append((f[2], f[4]))
    if len(out) > 1 << 22:
        del out[:]


def with_raw(frame: list) -> list:
    """``frame`` plus its bytes as a ``RawFrame``, where this checkout's reader keeps them."""
    import client.wire

    raw_type = getattr(client.wire, "RawFrame", None)
    return frame if raw_type is None else [*frame, raw_type(cbor2.dumps(frame))]


def run_w1(n: int, deep: bool) -> float:
    s = BrokerState()
    s.connect(P)
    s.connect(C)
    s.enable_log()
    now = 1000.0
    if deep:
        for start in range(-BACKLOG, 0, 100):
            handle(s, P, [OP_PUBLISH_BATCH, 1, [["q", b"y" * 100, f"pre-{i}", 0, None] for i in range(start, start + 100)]], now)
    handle(s, C, [OP_CONSUME, 1, ["q"], 100], now)
    out, got = bytearray(), []
    drain(s, out, got)  # (deep: the backlog's first 100 deliveries, acked like the rest)
    body = b"x" * 100
    # The frames as the broker's reader hands them over: decoded, with the bytes they came in as
    # (FrameReader keep_raw, which a PUBLISH_BATCH of plain items is logged from), built first.
    frames = []
    rid = 2
    for start in range(0, n, 100):
        items = [["q", body, f"abcdef123456-{i}", 0, {"dedupe": f"abcdef123456-{i}"}] for i in range(start, start + 100)]
        frames.append(with_raw([OP_PUBLISH_BATCH, rid, items]))
        rid += 1
    rid = 2
    t0 = time.process_time()
    for frame in frames:
        handle(s, P, frame, now)
        rid += 1
        drain(s, out, got)
        acks = 0
        while len(got) >= 50 and not (deep and acks == 2):  # deep: 100 acked per 100 published
            acks += 1
            handle(s, C, [OP_ACK, rid, [tag for tag, _ in got[:50]]], now)
            rid += 1
            del got[:50]
            drain(s, out, got)
        now += 0.001
    return time.process_time() - t0


def run_w2(n: int) -> float:
    tids = [str(uuid.uuid4()) for _ in range(n)]
    bodies = [cbor2.dumps(make_envelope("bench.noop", t, (), {})) for t in tids]
    s = BrokerState()
    s.connect(P)
    s.connect(C)
    s.enable_log()
    now = 1000.0
    handle(s, C, [OP_CONSUME, 1, ["celery"], 32, {"slots": 2}], now)
    out, got = bytearray(), []
    drain(s, out, [])
    t0 = time.process_time()
    rid = 2
    for start in range(0, n, 100):
        items = [["celery", bodies[i], tids[i], 0, {"dedupe": f"abcdef123456-{i}"}] for i in range(start, min(n, start + 100))]
        handle(s, P, with_raw([OP_PUBLISH_BATCH, rid, items]), now)
        rid += 1
        drain(s, out, got)
        while got:
            batch, got[:] = got[:16], got[16:]
            for tag, tid in batch:
                handle(s, C, [OP_RESULT_SET, rid, tid, "SUCCESS", None, None, {"tag": tag}], now)
                rid += 1
            drain(s, out, got)
        now += 0.001
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["keeping-up", "deep", "w2"], default="keeping-up")
    ap.add_argument("-n", type=int, default=None, help="messages (W1, default 50000) or tasks (W2, default 10000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the median is printed (default 5)")
    a = ap.parse_args()
    n = a.n or (10_000 if a.shape == "w2" else 50_000)
    runs = [run_w2(n) if a.shape == "w2" else run_w1(n, a.shape == "deep") for _ in range(a.repeat)]
    print(f"{a.shape}: {statistics.median(runs):.3f} CPU-s per {n:,} (median of {a.repeat}: "
          f"{', '.join(f'{r:.3f}' for r in runs)})")
    print(f"command: python bench/w1_inprocess.py --shape {a.shape} -n {n} --repeat {a.repeat}")


if __name__ == "__main__":
    main()
