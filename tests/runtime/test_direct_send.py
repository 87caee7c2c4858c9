"""A binary connection's bytes go to its socket from ``Conn.queue_bytes`` when nothing is queued
or being sent (broker/runtime/connection.py), instead of a round later through the connection's
writer task; whatever the socket does not take waits for the writer, in order.  A real socket
pair, the real writer task."""

import socket
from types import SimpleNamespace

import trio

from broker.runtime.connection import BinaryConnection, Conn


def pair():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)  # small: a big write fills it
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    conn = Conn(1, stream, "test")
    conn.raw = a
    b.setblocking(False)
    return conn, b


def read_available(b: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = b.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


async def test_bytes_go_out_at_once_with_no_writer_task_running():
    conn, b = pair()
    conn.queue_bytes(b"first")
    conn.queue_bytes(b"second")
    # no task ran: the socket already holds them
    assert conn.out == [] and conn.out_bytes == 0
    assert read_available(b) == b"firstsecond"


async def test_what_the_socket_does_not_take_goes_after_in_order_by_the_writer():
    conn, b = pair()
    big = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
    conn.queue_bytes(b"head-")
    conn.queue_bytes(big)
    assert conn.out, "the socket took 1 MiB at once: the test needs a partial send"
    got = bytearray(read_available(b))  # room in the socket again, the rest still queued
    conn.queue_bytes(b"-tail")  # not sent around the queued rest
    assert conn.out[-1] == b"-tail"
    server = SimpleNamespace(config=SimpleNamespace(output_buffer=1 << 30), state=None)
    want = b"head-" + big + b"-tail"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(BinaryConnection(server, conn)._writer, conn)
        with trio.fail_after(10):
            while len(got) < len(want):
                await trio.sleep(0.001)
                got += read_available(b)
        nursery.cancel_scope.cancel()
    assert bytes(got) == want


async def test_while_the_writer_sends_new_bytes_queue_behind_it():
    conn, b = pair()
    conn.sending = True
    conn.queue_bytes(b"later")
    assert conn.out == [b"later"] and read_available(b) == b""


async def test_a_connection_without_a_raw_socket_queues_for_the_writer():
    conn, b = pair()
    conn.raw = None  # TLS, or before HELLO: every byte goes through the writer task
    conn.queue_bytes(b"x")
    assert conn.out == [b"x"] and read_available(b) == b""


async def test_a_heartbeat_goes_out_only_after_an_interval_with_nothing_sent():
    from client.wire import HEARTBEAT_FRAME, encode_many

    hb = encode_many([HEARTBEAT_FRAME])
    conn, b = pair()
    conn.heartbeat = 0.2
    server = SimpleNamespace(config=SimpleNamespace(output_buffer=1 << 30), state=None)
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(BinaryConnection(server, conn)._writer, conn)
        for _ in range(12):  # 0.6 s of traffic sent directly, never quiet for 0.2 s
            conn.queue_bytes(b"d")
            await trio.sleep(0.05)
            got += read_available(b)
        assert hb not in got and got == b"d" * 12
        await trio.sleep(0.5)  # quiet: heartbeats again
        got += read_available(b)
        nursery.cancel_scope.cancel()
    assert got.startswith(b"d" * 12) and got[12:].startswith(hb)
