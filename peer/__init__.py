"""peer: a decentralized deep-learning daemon (train locally, discover over mDNS, gossip over gRPC)."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "peer.v1.1"  # v1.1: Push headers carry crc32 instead of sha256

__all__ = ["PROTOCOL_VERSION", "Gossip", "Node"]


def __getattr__(name: str) -> object:
    # The library API, imported on first use so that `import peer.core` never loads torch, grpc or asyncio.
    if name == "Gossip":
        from peer.daemon.library import Gossip

        return Gossip
    if name == "Node":
        from peer.daemon.node import Node

        return Node
    raise AttributeError(f"module 'peer' has no attribute {name!r}")
