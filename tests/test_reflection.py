"""gRPC tooling against a real `peer run` process on loopback: server reflection lists the services and
describes GetStatus well enough to call it with no generated code (what grpcurl does), and health answers per
service name."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from peer import config
from peer.net.rpc_errors import NO_PROXY, SERVICE_NAME
from tests.helpers import PeerProcess, fast_config, unique


@pytest.mark.timeout(120)
def test_reflection_and_health_on_a_real_daemon(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, unique("refl"), **{"train.epochs": 200})
    cfg_path = tmp_path / "peer.yaml"
    cfg_path.write_text(config.dump(cfg))
    proc = PeerProcess(cfg_path, tmp_path / "peer.log")
    try:
        ready = proc.ready(timeout_s=90)
        with grpc.insecure_channel(ready["address"], options=[NO_PROXY]) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = set(db.get_services())
            assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services

            # Call GetStatus from the reflected descriptors only, as grpcurl would.
            pool = descriptor_pool.DescriptorPool(db)
            service = pool.FindServiceByName(SERVICE_NAME)
            assert {"Hello", "Push", "GetStatus", "FetchState"} <= {m.name for m in service.methods}
            method = service.methods_by_name["GetStatus"]
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            call = channel.unary_unary(
                f"/{SERVICE_NAME}/GetStatus",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_cls.FromString,
            )
            status = call(request_cls(), timeout=5)
            assert status.node_id == cfg.node_id and status.address == ready["address"]

            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE_NAME):
                resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
            with pytest.raises(grpc.RpcError) as info:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        code = proc.stop()
    assert code == 0
