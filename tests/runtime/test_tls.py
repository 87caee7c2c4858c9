"""TLS on the protocol port, mutual TLS, --tls-required, HTTPS, and the protected default,
against a real brokerd process with certificates made at test time."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

import pytest
import trio

from client.async_client import AsyncClient
from client.errors import ConnectionLost
from client.producer import Client
from client.wire import PREAMBLE
from tests.support.broker import ROOT
from tests.support.certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(broker_factory, pki):
    return broker_factory("--tls-cert", pki.server_cert, "--tls-key", pki.server_key)


def url(b, pki, **extra) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"ca": pki.ca, **extra}.items())
    return f"brokerds://127.0.0.1:{b.port}?{q}"


def admin_line(sock, line: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    sock.sendall(line)
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def tls_socket(b, pki, cert=None, key=None):
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", b.port), timeout=5), server_hostname="127.0.0.1")


def test_a_tls_client_publishes_and_consumes(tls_broker, pki):
    with Client(url(tls_broker, pki)) as c:
        c.declare("tls-q")
        c.publish("tls-q", b"secret args")
        with c.consume("tls-q") as cons:
            d = cons.get(5)
            assert d is not None and d.body == b"secret args"
            d.ack()


def test_admin_text_over_tls_and_plaintext_still_work_on_the_same_port(tls_broker, pki):
    with tls_socket(tls_broker, pki) as s:
        stats = admin_line(s, b"STATS\r\n")
        assert stats.startswith(b"OK stats")
        while b"tls" not in stats:
            stats += s.recv(4096)
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=5) as s:
        assert admin_line(s, b"STATS\n").startswith(b"OK stats")
    with Client(tls_broker.address) as c:  # plaintext binary
        assert c.ping() is not None


def test_tls_required_refuses_plaintext_binary_and_text_with_tls_required(broker_factory, pki):
    b = broker_factory("--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-required")
    with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
        assert admin_line(s, b"STATS\n").startswith(b"ERR TLS_REQUIRED ")
    with pytest.raises(ConnectionLost) as e:
        Client(b.address)
    assert e.value.code == "TLS_REQUIRED"
    with Client(url(b, pki)) as c:  # TLS is still served
        assert c.ping() is not None


def test_mutual_tls_refuses_clients_without_a_certificate_with_another_cas_or_an_expired_one(broker_factory, pki):
    b = broker_factory("--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", pki.ca)
    with Client(url(b, pki, cert=pki.client_cert, key=pki.client_key)) as c:
        assert c.ping() is not None
    for extra in ({}, {"cert": pki.other_client_cert, "key": pki.other_client_key},
                  {"cert": pki.expired_client_cert, "key": pki.expired_client_key}):
        with pytest.raises(ConnectionLost):
            Client(url(b, pki, **extra), timeout=5)
    assert any("TLS handshake failed" in line for line in b.log)


def test_a_stalled_tls_handshake_is_closed_after_handshake_timeout(broker_factory, pki):
    b = broker_factory("--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--handshake-timeout", "1")
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and then nothing
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed, not left hanging
        assert time.monotonic() - t0 < 5
    with Client(url(b, pki)) as c:  # the broker goes on
        assert c.ping() is not None


def test_https_healthz_with_the_same_certificate(tls_broker, pki):
    ctx = ssl.create_default_context(cafile=pki.ca)
    with urllib.request.urlopen(f"https://127.0.0.1:{tls_broker.http_port}/healthz", context=ctx, timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


async def test_async_client_over_tls_trio(tls_broker, pki):
    async with AsyncClient(url(tls_broker, pki)) as c:
        await c.declare("atls")
        await c.publish("atls", b"x")
        assert (await c.stats()) is not None


def test_async_client_over_tls_asyncio(tls_broker, pki):
    import asyncio

    async def main():
        async with AsyncClient(url(tls_broker, pki)) as c:
            await c.publish("atls2", b"x")
            return c.library

    assert asyncio.run(main()) == "asyncio"


def test_app_takes_a_brokerds_url(tls_broker, pki):
    from client.app import App

    app = App("tlsapp", broker=url(tls_broker, pki))
    assert app.client.ping() is not None


def test_credentials_never_show_in_reprs_errors_or_the_app(broker, monkeypatch):
    from client.app import App

    secret = "tok-s3cret-123"
    u = f"brokerd://alice:{secret}@127.0.0.1:{broker.port}"
    with Client(u) as c:
        assert secret not in repr(c) and "***" in repr(c)
    assert secret not in repr(App("a", broker=u))
    monkeypatch.setenv("BROKERD_URL", f"brokerd://alice:{secret}@127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(ConnectionLost) as e:
        Client(timeout=2)
    assert secret not in str(e.value) and secret not in repr(e.value)
    out = subprocess.run([sys.executable, "-m", "client.ctl", "-b", f"brokerd://alice:{secret}@127.0.0.1:1", "ping"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and secret not in out.stdout + out.stderr and "***" in out.stderr


def test_user_and_token_go_in_hello_options():
    from client.options import broker_url

    u = broker_url("brokerds://bob:t%40k@h:7800?ca=/ca.pem")
    assert (u.host, u.port, u.tls, u.ca) == ("h", 7800, True, "/ca.pem")
    assert u.hello_options() == {"user": "bob", "token": "t@k"}
    assert broker_url("h:1").hello_options() is None
    with pytest.raises(ValueError, match="brokerds"):
        broker_url("brokerd://h:1?ca=/x")
    with pytest.raises(ValueError, match="scheme"):
        broker_url("amqp://h:1")


def test_a_non_loopback_host_is_refused_without_insecure_no_auth(tmp_path):
    cmd = [sys.executable, "-m", "broker", "--host", "0.0.0.0", "--port", "0", "--http-port", "0", "--data-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "no users configured" in out.stderr and "--insecure-no-auth" in out.stderr


def test_insecure_no_auth_starts_warns_and_shows_in_stats(broker_factory):
    b = broker_factory("--host", "0.0.0.0", "--insecure-no-auth")
    assert any("WARNING" in line and "insecure-no-auth" in line for line in b.log)
    with Client(f"127.0.0.1:{b.port}") as c:
        text = c.admin("STATS")
    assert "insecure-no-auth" in text


def test_a_non_loopback_host_with_users_starts_without_the_insecure_flag(tmp_path):
    # Users lift the protected default: every connection must then log in.
    from broker.config import Config

    cfg = Config(host="0.0.0.0", users_file=str(tmp_path / "users.toml"))
    assert cfg.exposure_refusal() is None and cfg.security() == "users"
    assert "no users configured" in Config(host="0.0.0.0").exposure_refusal()


def test_mutual_tls_logs_a_certificate_in_as_the_user_its_cn_names(broker_factory, pki, tmp_path):
    """With users and --tls-client-ca, a verified client certificate whose CN is a user's name
    logs in as that user without a token (and meets that user's grants); a token still works."""
    from client import AccessRefused, AuthFailed
    from client.userfile import hash_token, user_entry

    users = tmp_path / "users.toml"
    users.write_text(user_entry("worker-1", hash_token("tok-1"), {"publish": ["jobs"]})
                     + user_entry("other", hash_token("tok-2"), {"publish": ["*"]}))
    b = broker_factory("--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", pki.ca,
                       "--users-file", str(users))
    with Client(url(b, pki, cert=pki.client_cert, key=pki.client_key)) as c:  # CN=worker-1, no token
        c.publish("jobs", b"x")
        with pytest.raises(AccessRefused, match=r"user 'worker-1' may not PUBLISH on queue 'elsewhere'"):
            c.publish("elsewhere", b"x")
    assert any("logged in as 'worker-1' by its client certificate" in line for line in b.log)
    base = f"127.0.0.1:{b.port}?ca={pki.ca}&cert={pki.client_cert}&key={pki.client_key}"
    with Client(f"brokerds://other:tok-2@{base}") as c:  # a token names the user instead
        c.publish("elsewhere", b"x")
    with pytest.raises(AuthFailed):
        Client(f"brokerds://other:wrong@{base}", timeout=5)
