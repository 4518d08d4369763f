"""`peer certs init DIR` (a cluster CA) and `peer certs issue DIR NODE_ID` (a node's certificate and key).

Keys are EC P-256, written 0600. A node certificate names its node id as a DNS subject alternative name (the
identity the server authenticates) and also `peer.net.tls.CLUSTER_NAME`, the name a client checks when it dials
an address whose node id it does not know yet (a static peer).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peer.errors import ConfigError
from peer.net.tls import CLUSTER_NAME

NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # as config.PeerConfig.node_id


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with `mode` from the start (a key is never readable by others, not even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    fmt = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def init_ca(directory: str | Path, *, days: int = 3650, name: str = "peer cluster CA", force: bool = False) -> Path:
    """Create DIR/ca.pem and DIR/ca.key (0600). Refuses to overwrite an existing CA unless `force`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ca.pem").exists() and not force:
        raise ConfigError(f"{d / 'ca.pem'} exists; refusing to replace the cluster CA (use --force)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(d / "ca.key", _key_pem(key), 0o600)
    _write(d / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return d / "ca.pem"


def issue(
    directory: str | Path, node_id: str, *, days: int = 365, ips: list[str] | None = None, hours: float | None = None
) -> tuple[Path, Path]:
    """Sign DIR/NODE_ID.pem and DIR/NODE_ID.key (0600) with DIR's CA. `hours` overrides `days` (tests)."""
    d = Path(directory)
    if not NODE_ID_RE.match(node_id):
        raise ConfigError(f"node id {node_id!r}: 1..63 letters, digits, '_', '.', '-', starting with a letter or digit")
    if node_id == CLUSTER_NAME:
        raise ConfigError(f"node id {node_id!r} is reserved (every certificate carries it as the cluster name)")
    try:
        ca_cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"no cluster CA in {d} ({exc.filename} missing); run `peer certs init {d}` first") from None
    except ValueError as exc:
        raise ConfigError(f"cannot read the cluster CA in {d}: {exc}") from None
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    life = datetime.timedelta(hours=hours) if hours is not None else datetime.timedelta(days=days)
    names: list[x509.GeneralName] = [x509.DNSName(node_id), x509.DNSName(CLUSTER_NAME)]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + life)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path = d / f"{node_id}.key", d / f"{node_id}.pem"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def make_cluster(directory: str | Path, node_ids: list[str]) -> dict[str, dict[str, str]]:
    """A throwaway CA plus one certificate per node (demo, testbed, compose): node id -> its `security` keys."""
    d = Path(directory)
    init_ca(d, force=True)
    out = {}
    for node_id in node_ids:
        cert, key = issue(d, node_id)
        out[node_id] = {"ca_file": str(d / "ca.pem"), "cert_file": str(cert), "key_file": str(key)}
    return out
