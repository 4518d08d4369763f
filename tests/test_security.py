"""Mutual TLS and identity: `peer certs`, the off-loopback refusal, daemons that talk only to members of their
cluster CA, and a member that claims another node's id (PERMISSION_DENIED, nothing changes). Real certificates,
real gRPC on loopback, real processes for the CLI."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509

from peer import PROTOCOL_VERSION, config
from peer.daemon.node import Node
from peer.errors import ConfigError
from peer.net.encoder import encode, iter_requests
from peer.net.tls import CLUSTER_NAME, Credentials, TlsFiles, load_material, server_name_options
from peer.net.wire import Envelope, Payload
from peer.tools import certs
from peer.v1 import gossip_pb2, gossip_pb2_grpc
from tests.helpers import fast_config, start_nodes, stop_nodes, until

pytestmark = pytest.mark.timeout(90)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peer", *args], capture_output=True, text=True, timeout=60)


def security(d: Path, node_id: str) -> dict[str, str]:
    return {"ca_file": str(d / "ca.pem"), "cert_file": str(d / f"{node_id}.pem"), "key_file": str(d / f"{node_id}.key")}


def channel_for(address: str, d: Path, node_id: str, server: str | None = None) -> grpc.aio.Channel:
    m = load_material(TlsFiles(**security(d, node_id)))
    creds = grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)
    return grpc.aio.secure_channel(address, creds, options=server_name_options(server))


# ------------------------------------------------------------------------------------------------ certs CLI
def test_certs_cli_writes_a_ca_and_node_certificates(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = run_cli("certs", "init", str(d))
    assert r.returncode == 0, r.stderr
    r = run_cli("certs", "issue", str(d), "node-a")
    assert r.returncode == 0, r.stderr
    for name in ("ca.key", "node-a.key"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    cert = x509.load_pem_x509_certificate((d / "node-a.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-a", CLUSTER_NAME]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()))
    assert load_material(TlsFiles(**security(d, "node-a")), node_id="node-a").node_ids == ("node-a",)
    # No silent replacement of a CA; no certificate without one.
    r = run_cli("certs", "init", str(d))
    assert r.returncode == 2 and "refusing to replace" in r.stderr
    r = run_cli("certs", "issue", str(tmp_path / "nothing"), "x")
    assert r.returncode == 2 and "peer certs init" in r.stderr


def test_bad_certificates_are_refused_naming_the_field(tmp_path: Path) -> None:
    certs.init_ca(tmp_path / "a")
    certs.init_ca(tmp_path / "b")
    certs.issue(tmp_path / "b", "n1")
    foreign = TlsFiles(str(tmp_path / "a" / "ca.pem"), str(tmp_path / "b" / "n1.pem"), str(tmp_path / "b" / "n1.key"))
    with pytest.raises(ConfigError, match="not signed by the cluster CA") as err:
        load_material(foreign)
    assert err.value.field == "security.cert_file"
    certs.issue(tmp_path / "a", "old", hours=-0.01)
    with pytest.raises(ConfigError, match="expired") as err:
        load_material(TlsFiles(**security(tmp_path / "a", "old")))
    assert err.value.field == "security.cert_file"
    certs.issue(tmp_path / "a", "n2")
    with pytest.raises(ConfigError, match="not to node_id 'n3'"):
        load_material(TlsFiles(**security(tmp_path / "a", "n2")), node_id="n3")


# ---------------------------------------------------------------------------------------------- config
def test_off_loopback_without_certificates_exits_2_naming_the_keys(tmp_path: Path) -> None:
    base = {"node_id": "n", "state_dir": str(tmp_path / "s"), "listen": "198.18.0.1:0"}
    with pytest.raises(ConfigError) as err:
        config.validate(dict(base), source="t")
    assert err.value.field == "security.ca_file"
    assert "security.cert_file" in str(err.value) and "security.insecure" in str(err.value)
    assert config.validate({**base, "security": {"insecure": True}}, source="t").security.insecure
    with pytest.raises(ConfigError, match=r"missing security\.key_file"):
        config.validate({**base, "security": {"ca_file": "c", "cert_file": "x"}}, source="t")
    # Loopback without TLS stays allowed.
    assert not config.validate({**base, "listen": "127.0.0.1:0"}, source="t").security.tls
    r = run_cli("run", "--set", "node_id=n", "--set", f"state_dir={tmp_path / 's'}", "--set", "listen=0.0.0.0:0")
    assert r.returncode == 2, r.stderr
    assert "security.ca_file" in r.stderr and "peer certs init" in r.stderr


# ------------------------------------------------------------------------------------- daemons with mTLS
@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[list[Node], Path]]:
    """Two daemons with certificates of one CA, found through static peers; plus a certified outsider 'evil'."""
    d = tmp_path / "pki"
    certs.make_cluster(d, ["a", "b", "evil"])
    a = fast_config(tmp_path, "a", security=security(d, "a"), train={"epochs": 50, "torch_threads": 1})
    nodes = [Node(a, stdout=io.StringIO())]
    tasks = await start_nodes(nodes)
    b = fast_config(
        tmp_path,
        "b",
        security=security(d, "b"),
        train={"epochs": 50, "torch_threads": 1},
        discovery={"mdns": False, "static_peers": [nodes[0].address]},
    )
    nodes.append(Node(b, stdout=io.StringIO()))
    tasks += await start_nodes(nodes[1:])
    try:
        yield nodes, d
    finally:
        await stop_nodes(nodes, tasks)


async def test_members_gossip_over_mutual_tls(cluster: tuple[list[Node], Path]) -> None:
    nodes, d = cluster
    await until(nodes, lambda: all(n.counters.messages_received > 0 for n in nodes), 30, "pushes both ways")
    assert set(nodes[0].core.peers) == {"b"} and set(nodes[1].core.peers) == {"a"}
    async with channel_for(nodes[0].address, d, "b", "a") as ch:
        status = await gossip_pb2_grpc.GossipServiceStub(ch).GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
    assert status.node_id == "a"


async def test_anonymous_and_foreign_clients_are_refused(cluster: tuple[list[Node], Path], tmp_path: Path) -> None:
    nodes, _ = cluster
    address = nodes[0].address
    async with grpc.aio.insecure_channel(address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gossip_pb2_grpc.GossipServiceStub(ch).GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    other = tmp_path / "other"
    certs.make_cluster(other, ["a"])  # same node id, another CA
    async with channel_for(address, other, "a") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await (
                gossip_pb2_grpc.GossipServiceStub(ch)
                .FetchState(
                    gossip_pb2.FetchStateRequest(node_id="a", schema_fingerprint=nodes[0].fingerprint), timeout=5
                )
                .read()
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The CLI with the cluster's files answers; without them it cannot.
    d = tmp_path / "pki"
    # In a thread: the daemons answer from this test's event loop.
    ok = await asyncio.to_thread(run_cli, "status", address, "--json", *_tls_args(d, "evil"))
    assert ok.returncode == 0 and '"node_id": "a"' in ok.stdout, ok.stderr
    assert (await asyncio.to_thread(run_cli, "status", address, "--timeout", "3")).returncode != 0


def _tls_args(d: Path, node_id: str) -> list[str]:
    s = security(d, node_id)
    return ["--ca", s["ca_file"], "--cert", s["cert_file"], "--key", s["key_file"]]


async def _push(stub: gossip_pb2_grpc.GossipServiceStub, requests: Iterable[gossip_pb2.PushRequest]) -> Any:
    async def gen() -> AsyncIterator[gossip_pb2.PushRequest]:
        for r in requests:
            yield r

    try:
        return await stub.Push(gen(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def test_a_member_cannot_claim_another_node_id(cluster: tuple[list[Node], Path]) -> None:
    nodes, d = cluster
    a = nodes[0]
    await until(nodes, lambda: a.counters.messages_received > 0, 30, "a first push from b")
    before = a.counters.rejected_messages
    denied = grpc.StatusCode.PERMISSION_DENIED
    async with channel_for(a.address, d, "evil", "a") as ch:
        stub = gossip_pb2_grpc.GossipServiceStub(ch)
        hello = gossip_pb2.HelloRequest(
            node_id="b",
            protocol_version=PROTOCOL_VERSION,
            schema_fingerprint=a.fingerprint,
            algorithm=a.algorithm.name,
            degree=1,
            address="127.0.0.1:1",
            incarnation=1,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Hello(hello, timeout=5)
        assert err.value.code() == denied and "certificate says 'evil'" in str(err.value.details())
        env = Envelope("b", a.fingerprint, a.algorithm.name, 1, 1, "127.0.0.1:1", 1)
        poison = torch.full((a.built.num_params,), 1e4)
        header, chunks = encode(env, Payload("state", {"params": poison}, seq=10**6, step=1), chunk_bytes=4096)
        assert await _push(stub, iter_requests(header, chunks)) == denied
        with pytest.raises(grpc.aio.AioRpcError) as err:
            fetch = gossip_pb2.FetchStateRequest(node_id="b", schema_fingerprint=a.fingerprint)
            await stub.FetchState(fetch, timeout=5).read()
        assert err.value.code() == denied
        # Nothing changed: b keeps its address, evil is no member, the poison never reached the algorithm.
        assert a.core.peers["b"].address != "127.0.0.1:1" and "evil" not in a.core.peers
        assert not any(m.params.abs().max() >= 1e4 for m in _cached(a))
        assert a.counters.rejected_messages == before + 3
        # Under its own name the outsider's certificate is good: its Hello is answered.
        hello.node_id = "evil"
        resp = await stub.Hello(hello, timeout=5)
        assert resp.node_id == "a"


def _cached(node: Node) -> list[Any]:
    return list(getattr(node.algorithm, "cache", {}).values())


async def test_certificates_reload_on_change(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    certs.make_cluster(d, ["a", "probe"])
    creds = Credentials(TlsFiles(**security(d, "a")), "a")
    first = creds.material.cert
    assert not creds.refresh()
    (d / "a.pem").write_text("garbage")
    assert not creds.refresh() and creds.material.cert == first  # a broken file never replaces a good one
    certs.issue(d, "a")
    assert creds.refresh() and creds.material.cert != first and creds.generation == 1
    # A running daemon serves the new certificate to the next handshake.
    node = Node(fast_config(tmp_path, "a", security=security(d, "a")), stdout=io.StringIO())
    tasks = await start_nodes([node])
    try:
        certs.issue(d, "a")
        async with channel_for(node.address, d, "probe", "a") as ch:
            await gossip_pb2_grpc.GossipServiceStub(ch).GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
        assert node.credentials is not None and node.credentials.generation == 1
    finally:
        await stop_nodes([node], tasks)
