"""A throwaway certificate authority for `slotmesh up --tls` and the tests: a CA, one
certificate for the local servers (router, workers, redis-server; also their client
certificate for mutual TLS) and one client certificate for people and tools that call a
worker directly. Every name is localhost / 127.0.0.1; nothing here is for production.
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

_VALID = datetime.timedelta(days=7)


@dataclass(frozen=True, slots=True)
class LocalPki:
    """Paths of the PEM files `make_local_pki` wrote."""

    ca: Path
    server_cert: Path  # serverAuth + clientAuth: routers and workers present it both ways
    server_key: Path
    client_cert: Path  # clientAuth only
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "slotmesh local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _issue(subject: str, ca_cert: x509.Certificate, ca_key, usages: list,
           names: list[x509.GeneralName]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(subject)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def make_local_pki(directory: Path) -> LocalPki:
    """Write a fresh CA and certificates for localhost/127.0.0.1 into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (x509.CertificateBuilder()
               .subject_name(_name("slotmesh local CA")).issuer_name(_name("slotmesh local CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + _VALID)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _issue("slotmesh local server", ca_cert, ca_key,
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], local)
    client = _issue("slotmesh local client", ca_cert, ca_key,
                    [ExtendedKeyUsageOID.CLIENT_AUTH], [x509.DNSName("slotmesh-client")])
    pki = LocalPki(ca=directory / "ca.pem", server_cert=directory / "server.pem",
                   server_key=directory / "server.key", client_cert=directory / "client.pem",
                   client_key=directory / "client.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for (cert, key), cert_path, key_path in ((server, pki.server_cert, pki.server_key),
                                             (client, pki.client_cert, pki.client_key)):
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
    return pki
