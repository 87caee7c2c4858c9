"""TLS for the clients: the context a ``brokerds://`` URL asks for, and TLS over a blocking socket.

``context(url)`` trusts ``?ca=`` (else the system's CAs), checks the host name, and presents
``?cert=``/``?key=`` for mutual TLS.  ``TlsSocket`` runs TLS in memory (``ssl.SSLObject``)
over a plain socket so that the blocking client's reader thread and its writers can use one
connection at once: every use of the TLS state is under one lock, and raw bytes go out in
the order TLS produced them (OpenSSL objects must not be used from two threads at once).
"""

from __future__ import annotations

import socket
import ssl
import threading

RAW_RECV = 256 * 1024  # bytes of ciphertext read at a time


def context(url) -> ssl.SSLContext:
    """The client TLS context for a ``BrokerUrl`` with ``tls``; ``OSError``/``ssl.SSLError``
    if a file it names cannot be loaded."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=url.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if url.cert:
        ctx.load_cert_chain(url.cert, url.key or None)
    return ctx


class TlsSocket:
    """``sendall``/``recv``/``shutdown``/``close``/``fileno`` as a socket's, with TLS in between."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str):
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._lock = threading.Lock()  # the TLS state
        self._send_lock = threading.Lock()  # ciphertext leaves in the order it was made

    def handshake(self) -> None:
        """Complete the handshake (blocking; bounded by the socket's timeout)."""
        while True:
            try:
                self._tls.do_handshake()
                self._send_pending()
                return
            except ssl.SSLWantReadError:
                self._send_pending()
                data = self.sock.recv(RAW_RECV)
                if not data:
                    raise ConnectionResetError("brokerd closed the connection during the TLS handshake")
                self._in.write(data)

    def _send_pending(self) -> None:
        with self._send_lock:
            with self._lock:
                data = self._out.read()
            if data:
                self.sock.sendall(data)

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._lock:
                self._tls.write(data)
                out = self._out.read()
            self.sock.sendall(out)

    def recv(self, n: int) -> bytes:
        while True:
            with self._lock:
                try:
                    data = self._tls.read(n)
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLZeroReturnError:  # close_notify: a clean end
                    data = b""
                pending = self._out.pending
            if pending:  # reading can produce TLS output (key updates, alerts)
                self._send_pending()
            if data is not None:
                return data
            raw = self.sock.recv(RAW_RECV)
            if not raw:
                return b""
            with self._lock:
                self._in.write(raw)

    def getpeercert(self):
        return self._tls.getpeercert()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def settimeout(self, t) -> None:
        self.sock.settimeout(t)

    def shutdown(self, how) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()
