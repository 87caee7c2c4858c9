"""Cost of signed tasks per task: signing at the producer, verifying at the worker (µs, one core).

    .venv/bin/python bench/signing.py

Measures ``Signer.sign`` (canonical CBOR of the envelope + Ed25519 sign) and ``Verifier.refusal``
(canonical re-encode + Ed25519 verify) on an ``add(2, 3)``-sized envelope and on one with 1 KiB of
arguments, against the unsigned ``encode_envelope`` for scale.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cbor2  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from client.envelope import encode_envelope, make_envelope  # noqa: E402
from client.signing import Signer, Verifier  # noqa: E402

N = 5000  # tasks per measurement: enough for a steady median on a shared 2-core box


def per_call_us(fn, n=N) -> float:
    best = float("inf")
    for _ in range(3):  # best of 3 runs: the machine is shared
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    key = Ed25519PrivateKey.generate()
    signer = Signer(key, "bench")
    verifier = Verifier({"bench": key.public_key()})
    tid = "c0ffee00-7e57-4a5c-9d1e-000000000042"
    for label, args in (("add(2, 3)", [2, 3]), ("1 KiB args", ["x" * 1024])):
        env = make_envelope("proj.tasks.add", tid, args, {})
        enc = per_call_us(lambda: encode_envelope(env))
        sign = per_call_us(lambda: signer.sign(dict(env)))
        delivered = cbor2.loads(cbor2.dumps(signer.sign(dict(env))))
        assert verifier.refusal(delivered, tid) is None
        verify = per_call_us(lambda: verifier.refusal(delivered, tid))
        print(f"{label:>11}: encode {enc:6.1f} µs | sign {sign:6.1f} µs | verify {verify:6.1f} µs per task")
    print("reproduce: .venv/bin/python bench/signing.py")


if __name__ == "__main__":
    main()
