"""A throwaway CA, server and client certificates for the TLS and mTLS tests."""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
    (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_certs(folder: Path) -> Path:
    """ca.pem, server.{pem,key} (localhost, 127.0.0.1), client.{pem,key}, all signed by the CA."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("disco test CA")).issuer_name(_name("disco test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for stem, usage, sans in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("disco-client")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(folder, stem, key, cert)
    return folder


def make_rsa1024(folder: Path) -> Path:
    """weak.{pem,key}: a self-signed localhost certificate on an RSA-1024 key, which gRPC serves (OpenSSL 3's
    default security level would refuse it)."""
    now = dt.datetime.now(dt.timezone.utc)
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(_name("localhost"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    _write(folder, "weak", key, cert)
    return folder


def make_expired(folder: Path) -> Path:
    """expired.{pem,key}: a self-signed localhost certificate whose validity ended a day ago."""
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(_name("localhost"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    _write(folder, "expired", key, cert)
    return folder



def make_chain(folder: Path, intermediate_expired: bool = False, ca_expired: bool = False,
               stale_cross_sign: bool = False) -> Path:
    """chain.{pem,key}: a localhost leaf and the intermediate that signed it (chain.pem holds both), under root.pem;
    the intermediate or the root out of its validity when asked. stale_cross_sign appends an expired copy of the
    root signed by an older root, as chains kept for old clients carry (Sectigo's, in 2020)."""
    now = dt.datetime.now(dt.timezone.utc)
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=30))
    gone = (now - dt.timedelta(days=2), now - dt.timedelta(days=1))

    def sign(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
             when: tuple[dt.datetime, dt.datetime], ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(when[0]).not_valid_after(when[1]))
        if ca:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = sign("disco root", root_key, _name("disco root"), root_key, gone if ca_expired else valid, True)
    mid = sign("disco intermediate", mid_key, root.subject, root_key, gone if intermediate_expired else valid, True)
    leaf = sign("localhost", leaf_key, mid.subject, mid_key, valid, False)
    _write(folder, "chain", leaf_key, leaf)
    with (folder / "chain.pem").open("ab") as f:
        f.write(mid.public_bytes(serialization.Encoding.PEM))
        if stale_cross_sign:
            old_key = ec.generate_private_key(ec.SECP256R1())
            cross = (x509.CertificateBuilder().subject_name(root.subject).issuer_name(_name("disco old root"))
                     .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(gone[0]).not_valid_after(gone[1])
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(old_key, hashes.SHA256()))
            f.write(cross.public_bytes(serialization.Encoding.PEM))
    (folder / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return folder
