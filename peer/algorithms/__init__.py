"""Consensus algorithms, one module each, in a registry by name (`algorithm.name` in the config)."""

from __future__ import annotations

from peer.algorithms.base import AlgoParams, Algorithm, InMessage, MixReport, NeighbourView, Oracle, Payload, Send
from peer.algorithms.cdl import Cdl, CdlParams
from peer.algorithms.choco import Choco, ChocoParams
from peer.algorithms.digest import Digest, DigestParams
from peer.algorithms.dmsgd import Dmsgd, DmsgdAsync, DmsgdAsyncParams, DmsgdParams
from peer.algorithms.dpsgd import Dpsgd, DpsgdParams
from peer.algorithms.dssfn import Dssfn
from peer.algorithms.dssfn_admm import DssfnParams
from peer.algorithms.isolated import Isolated, NoneParams
from peer.algorithms.local_sgd import LocalSgd, LocalSgdParams
from peer.algorithms.next import Next, NextParams
from peer.algorithms.next_pushsum import NextPushsum, NextPushsumParams
from peer.algorithms.sgp import Sgp, SgpParams
from peer.errors import UnknownNameError

REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (Cdl, Choco, Digest, Dmsgd, DmsgdAsync, Dpsgd, Dssfn, LocalSgd, Next, NextPushsum, Sgp, Isolated)
}
PARAMS_TYPES = tuple(cls.params_type for cls in REGISTRY.values())


def create(params: AlgoParams, node_id: str) -> Algorithm:
    """Build the algorithm named by `params.name`."""
    try:
        cls = REGISTRY[params.name]
    except KeyError:
        raise UnknownNameError("algorithm", params.name, list(REGISTRY), field="algorithm.name") from None
    return cls(params, node_id)


__all__ = [
    "PARAMS_TYPES",
    "REGISTRY",
    "AlgoParams",
    "Algorithm",
    "Cdl",
    "CdlParams",
    "Choco",
    "ChocoParams",
    "Digest",
    "DigestParams",
    "Dmsgd",
    "DmsgdAsync",
    "DmsgdAsyncParams",
    "DmsgdParams",
    "Dpsgd",
    "DpsgdParams",
    "Dssfn",
    "DssfnParams",
    "InMessage",
    "Isolated",
    "LocalSgd",
    "LocalSgdParams",
    "MixReport",
    "NeighbourView",
    "Next",
    "NextParams",
    "NextPushsum",
    "NextPushsumParams",
    "NoneParams",
    "Oracle",
    "Payload",
    "Send",
    "Sgp",
    "SgpParams",
    "create",
]
