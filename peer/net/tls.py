"""Mutual TLS: the cluster CA, this node's certificate and key, reloaded when the files change.

The server requires a client certificate signed by the cluster CA and reads the caller's node id from its DNS
subject alternative name (`identity_of`); the client checks the server's certificate against the same CA and
expects the node id it dials (or `CLUSTER_NAME` when it does not know it yet).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from peer.errors import ConfigError

log = logging.getLogger(__name__)

# Every node certificate also carries this DNS name: a client dialling an address whose node id it does not know
# checks it (the CA chain still has to verify), and it is never taken for a node id.
CLUSTER_NAME = "cluster.peer.invalid"
_PEM_KEY = "x509_pem_cert"  # the verified peer certificate, as gRPC's auth context gives it


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class Material:
    ca: bytes
    cert: bytes
    key: bytes
    node_ids: tuple[str, ...]  # the DNS names of the certificate, less CLUSTER_NAME
    not_after: datetime.datetime


def _read(path: str, fld: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", field=fld) from None


def load_material(files: TlsFiles, *, node_id: str | None = None) -> Material:
    """Read and check the three files: parseable, the certificate signed by the CA, valid now, and (when
    `node_id` is given) naming it. Raises ConfigError naming the `security.*` field at fault."""
    ca_pem = _read(files.ca_file, "security.ca_file")
    cert_pem = _read(files.cert_file, "security.cert_file")
    key_pem = _read(files.key_file, "security.key_file")
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise ConfigError(f"{files.ca_file} is not a PEM certificate: {exc}", field="security.ca_file") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{files.cert_file} is not a PEM certificate: {exc}", field="security.cert_file") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{files.key_file} is not an unencrypted PEM key: {exc}", field="security.key_file") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{files.cert_file} is not signed by the cluster CA {files.ca_file} (untrusted certificate)",
            field="security.cert_file",
        ) from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(
            f"{files.cert_file} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC): expired or not yet valid; issue a new one",
            field="security.cert_file",
        )
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ConfigError(f"{files.key_file} is not the key of {files.cert_file}", field="security.key_file")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(n for n in san.get_values_for_type(x509.DNSName) if n != CLUSTER_NAME)
    except x509.ExtensionNotFound:
        names = ()
    if node_id is not None and node_id not in names:
        raise ConfigError(
            f"{files.cert_file} is issued to {', '.join(names) or 'no node id'}, not to node_id {node_id!r} "
            f"(`peer certs issue DIR {node_id}`)",
            field="security.cert_file",
        )
    return Material(ca_pem, cert_pem, key_pem, names, cert.not_valid_after_utc)


class Credentials:
    """This node's TLS material, reloaded when a file's mtime or size changes (certificate rotation without a
    restart). A reload that fails its checks is logged and the previous material stays in use."""

    def __init__(self, files: TlsFiles, node_id: str | None = None) -> None:
        self.files = files
        self.node_id = node_id
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.material = load_material(files, node_id=node_id)
        self.generation = 0  # bumped on every successful reload

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in (self.files.ca_file, self.files.cert_file, self.files.key_file):
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    def refresh(self) -> bool:
        """Reload if the files changed. True when new material was loaded. Thread-safe (gRPC calls it)."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                self.material = load_material(self.files, node_id=self.node_id)
            except ConfigError as exc:
                log.error("TLS files changed but are not usable; keeping the previous certificate: %s", exc)
                return False
            self.generation += 1
            log.info("TLS certificate reloaded from %s (valid until %s)", self.files.cert_file, self.material.not_after)
            return True

    def _server_config(self) -> grpc.ServerCertificateConfiguration:
        m = self.material
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Require a client certificate from the CA; gRPC asks `fetch` before each handshake."""

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            return self._server_config() if self.refresh() else None

        return grpc.dynamic_ssl_server_credentials(
            self._server_config(),
            fetch,  # type: ignore[arg-type]  # gRPC documents None as "no change"; the stubs omit it
            require_client_authentication=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        self.refresh()
        m = self.material
        return grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)


def server_name_options(node_id: str | None) -> list[tuple[str, str]]:
    """The name the server's certificate must carry: the node id we mean to reach, else the cluster name."""
    return [("grpc.ssl_target_name_override", node_id or CLUSTER_NAME)]


def tls_protected(context: grpc.aio.ServicerContext) -> bool:
    """True when the call arrived over TLS (gRPC's auth context names the transport's security type)."""
    return list(context.auth_context().get("transport_security_type", [])) == [b"ssl"]


def identity_of(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's node id: the first DNS name of its verified client certificate other than CLUSTER_NAME.
    None on a connection without TLS; "" (which matches no claim) for a certificate that names no node."""
    auth = context.auth_context()
    pems = list(auth.get(_PEM_KEY, []))
    if not pems:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ""
    ids = [n for n in san.get_values_for_type(x509.DNSName) if n != CLUSTER_NAME]
    return ids[0] if ids else ""
