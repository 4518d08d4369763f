"""peer: a decentralized deep-learning daemon (train locally, discover over mDNS, gossip over gRPC)."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "peer.v1"
