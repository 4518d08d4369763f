"""deploy/k8s/: every manifest validates offline against the Kubernetes schemas (kubernetes-validate bundles them),
a broken one fails, the pieces agree with each other and with the daemon's config, and the plaintext health port the
probes use answers while the gossip port demands mutual TLS."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import fast_config, start_nodes, stop_nodes, unique

from peer import config
from peer.daemon.node import Node
from peer.tools import certs
from peer.v1 import gossip_pb2, gossip_pb2_grpc

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
VERSION = "1.37.0"


def manifests() -> list[dict[str, Any]]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert docs, f"no manifests under {K8S}"
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_broken_manifest_fails_validation() -> None:
    sts = by_kind("StatefulSet")
    for break_it in (
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="fifty"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"].update(path="/healthz"),
        lambda d: d["spec"].pop("selector"),
    ):
        broken = copy.deepcopy(sts)
        break_it(broken)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSION, strict=True)


def pod_config(pod: str, tmp_path: Path) -> config.PeerConfig:
    """The config a pod of the StatefulSet runs with: the ConfigMap's file plus the `--set`s of its command line."""
    sts, cm = by_kind("StatefulSet"), by_kind("ConfigMap")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    line = " ".join(container["args"]).replace("${POD_NAME##*-}", pod.rpartition("-")[2]).replace("$POD_NAME", pod)
    overrides = [f"{k}={v}" for k, v in re.findall(r'--set (\S+?)="([^"]*)"', line)]
    assert len(overrides) == 4, line
    path = tmp_path / "peer.yaml"
    path.write_text(cm["data"]["peer.yaml"])
    cfg = config.load(path, overrides)
    config.check_security(cfg)  # listening off loopback: mutual TLS is configured
    return cfg


def test_the_pieces_agree_with_each_other_and_with_the_daemon_config(tmp_path: Path) -> None:
    sts, svc = by_kind("StatefulSet"), by_kind("Service")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    cfg = pod_config(f"{sts['metadata']['name']}-3", tmp_path)
    assert cfg.node_id == "peer-3" and cfg.data.partition_index == 3
    assert cfg.data.num_partitions == spec["replicas"]  # one data partition per pod
    assert cfg.security.tls and cfg.security.cert_file == "/etc/peer/tls/peer-3.pem"
    # Discovery through the headless Service: _<port name>._tcp.<service>.<namespace>.svc...
    assert svc["spec"]["clusterIP"] == "None" and spec["serviceName"] == svc["metadata"]["name"]
    port = svc["spec"]["ports"][0]
    (srv,) = cfg.discovery.dns_srv
    assert srv.startswith(f"_{port['name']}._tcp.{svc['metadata']['name']}.")
    assert svc["spec"]["selector"].items() <= pod_labels(sts).items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(cfg.listen.rpartition(":")[2]) == ports["gossip"] == port["port"]
    # The probes ask the plaintext health port.
    assert cfg.health_listen is not None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == int(cfg.health_listen.rpartition(":")[2]) == ports["health"]
    # state_dir on the claim, the config file and the certificates where the command line expects them.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == cfg.state_dir
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    assert "/etc/peer/config/peer.yaml" in container["args"][0] and mounts["config"] == "/etc/peer/config"
    assert cfg.security.ca_file is not None and Path(cfg.security.ca_file).parent == Path(mounts["tls"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == by_kind("ConfigMap")["metadata"]["name"]
    assert volumes["tls"]["secret"]["secretName"] == "peer-tls"


def pod_labels(sts: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


async def test_the_probe_port_answers_health_in_plaintext_and_nothing_else(tmp_path: Path) -> None:
    node_id = unique("k8s")
    pki = certs.make_cluster(tmp_path / "pki", [node_id])
    cfg = fast_config(tmp_path, node_id, security=pki[node_id], health_listen="127.0.0.1:0", **{"train.epochs": 50})
    node = Node(cfg, stdout=io.StringIO())
    tasks = await start_nodes([node])
    try:
        assert node._server is not None and node._server.probe_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{node._server.probe_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "peer.v1.GossipService"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gossip_pb2_grpc.GossipServiceStub(ch).GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(node.address) as ch:  # the gossip port: mutual TLS only
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_nodes([node], tasks)
