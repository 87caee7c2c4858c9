"""A deliberately tiny raw-protocol client for server tests.

It speaks the wire with ``client.wire`` and nothing else, so tests of the
server do not depend on the SDK, and can send broken bytes on purpose.
"""

from __future__ import annotations

import socket
import time

from client import wire


class Raw:
    def __init__(self, port: int, *, hello: bool = True, name: str = "test", heartbeat: float | None = None,
                 extra: dict | None = None, version=1):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = wire.FrameReader(1 << 30)
        self.pending: list = []
        self.rid = 0
        if hello:
            self.sock.sendall(wire.PREAMBLE)
            opts = {"version": version, "client": name}  # 1 unless asked: raw version-1 frames
            if heartbeat is not None:
                opts["heartbeat"] = heartbeat
            opts.update(extra or {})  # more HELLO options, e.g. "user" and "token"
            self.hello = self.call(wire.OP_HELLO, opts)

    def send(self, frame) -> None:
        self.sock.sendall(wire.encode(frame))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def request(self, op, *args) -> int:
        rid = self.next_rid()
        self.send([op, rid, *args])
        return rid

    def call(self, op, *args):
        """Send a request; return its reply frame (deliveries on the way are kept)."""
        rid = self.request(op, *args)
        return self.reply(rid)

    def reply(self, rid):
        while True:
            for i, f in enumerate(self.pending):
                if f[0] in (wire.OP_OK, wire.OP_ERROR) and f[1] == rid:
                    return self.pending.pop(i)
                if f[0] == wire.OP_CONFIRM_RANGE and f[1] <= rid <= f[2]:  # version 2 (§5.47)
                    return f  # left in place: it may cover later requests too
                if f[0] == wire.OP_CLOSING:
                    return self.pending.pop(i)
            self._read()

    def ok(self, op, *args):
        f = self.call(op, *args)
        assert f[0] == wire.OP_OK, f
        return f[2]

    def deliveries(self, n: int, timeout: float = 5.0) -> list:
        """Wait for n DELIVER frames."""
        deadline = time.monotonic() + timeout
        while True:
            self._unbatch()
            got = [f for f in self.pending if f[0] == wire.OP_DELIVER]
            if len(got) >= n:
                for f in got[:n]:
                    self.pending.remove(f)
                return got[:n]
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(got)} of {n} deliveries")
            self._read(deadline - time.monotonic())

    def _unbatch(self) -> None:
        """Version 2: each DELIVER_BATCH waiting in ``pending`` becomes its DELIVERs, in place."""
        if any(f[0] == wire.OP_DELIVER_BATCH for f in self.pending):
            out = []
            for f in self.pending:
                if f[0] == wire.OP_DELIVER_BATCH:
                    out += [[wire.OP_DELIVER, f[1], *item] for item in f[2]]
                else:
                    out.append(f)
            self.pending = out

    def _read(self, timeout: float = 5.0) -> None:
        self.sock.settimeout(max(timeout, 0.01))
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by server")
        self.reader.feed(data)
        for f in self.reader.frames():
            if f[0] != wire.OP_HEARTBEAT:
                self.pending.append(f)

    def read_until_closed(self, timeout: float = 5.0) -> list:
        """Every frame until the server closes the connection."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._read(deadline - time.monotonic())
        except (ConnectionError, OSError):
            pass
        out, self.pending = self.pending, []
        return out

    def close(self) -> None:
        self.sock.close()


def drain(port: int, queue: str = "q") -> list:
    """Take and ack every ready message of ``queue``; return their ids in delivery order."""
    r = Raw(port)
    total = r.ok(wire.OP_STATS, queue)["ready"]
    r.ok(wire.OP_CONSUME, [queue], 500)
    ids = []
    while len(ids) < total:
        batch = r.deliveries(min(500, total - len(ids)))
        ids += [f[4] for f in batch]
        r.ok(wire.OP_ACK, [f[2] for f in batch])
    r.close()
    return ids
