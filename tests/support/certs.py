"""Certificates made at test time: a CA, a server certificate for 127.0.0.1/localhost, client certificates.

Written as PEM files into a directory; ``make_pki(dir)`` returns their paths.  EC P-256 keys (fast to
make), valid from one hour ago for a day, so a clock a little off does not fail a test.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pki:
    ca: str  # the CA certificate (PEM): what clients trust, and --tls-client-ca
    server_cert: str
    server_key: str
    client_cert: str  # signed by ``ca``, subject CN=worker-1,O=brokerd-tests
    client_key: str
    other_ca: str  # a second, unrelated CA
    other_client_cert: str  # signed by ``other_ca``: refused under mutual TLS
    other_client_key: str
    expired_client_cert: str = ""  # signed by ``ca``, CN=worker-1, but its validity ended yesterday
    expired_client_key: str = ""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "brokerd-tests")])


def _write(path: Path, cert: x509.Certificate | None = None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
    return str(path)


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca_cert, ca_key, cn: str, *, server: bool, expired: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:  # valid for a day that ended a day ago
        now -= datetime.timedelta(days=2)
    b = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def make_pki(directory) -> Pki:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("brokerd-tests CA")
    other, other_key = _ca("some other CA")
    srv, srv_key = _leaf(ca, ca_key, "localhost", server=True)
    cli, cli_key = _leaf(ca, ca_key, "worker-1", server=False)
    ocli, ocli_key = _leaf(other, other_key, "worker-1", server=False)
    old, old_key = _leaf(ca, ca_key, "worker-1", server=False, expired=True)
    return Pki(
        ca=_write(d / "ca.pem", ca),
        server_cert=_write(d / "server.pem", srv), server_key=_write(d / "server.key", key=srv_key),
        client_cert=_write(d / "client.pem", cli), client_key=_write(d / "client.key", key=cli_key),
        other_ca=_write(d / "other-ca.pem", other),
        other_client_cert=_write(d / "other-client.pem", ocli), other_client_key=_write(d / "other-client.key", key=ocli_key),
        expired_client_cert=_write(d / "expired-client.pem", old), expired_client_key=_write(d / "expired-client.key", key=old_key),
    )
