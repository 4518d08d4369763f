"""The daemon's TLS credentials from `security:` (or a loud warning when it runs in plaintext off loopback)."""

from __future__ import annotations

import logging

from peer.config import PeerConfig, check_security
from peer.net.tls import Credentials, TlsFiles


def load_credentials(cfg: PeerConfig, log: logging.LoggerAdapter[logging.Logger]) -> Credentials | None:
    sec = cfg.security
    check_security(cfg)
    if sec.tls:
        assert sec.ca_file and sec.cert_file and sec.key_file
        creds = Credentials(TlsFiles(sec.ca_file, sec.cert_file, sec.key_file), cfg.node_id)
        log.info("mutual TLS: certificate %s, valid until %s", sec.cert_file, creds.material.not_after)
        return creds
    if sec.insecure:
        log.warning(
            "SECURITY: security.insecure is set: plaintext gRPC on %s; anyone who can reach this port can read "
            "the model and push states into it",
            cfg.listen,
        )
    return None
