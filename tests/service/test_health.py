"""Health like upstream's picker: `liveness` and `readiness` (and "") on the gRPC port, and
on a plaintext port of their own for Kubernetes grpc probes when the gRPC port serves TLS."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from extproc.cli import _health_address
from extproc.config import Settings
from tests.conftest import StartService
from tests.support.extproc_client import workload_headers

SERVING = health_pb2.HealthCheckResponse.SERVING


async def statuses(channel: grpc.aio.Channel) -> dict[str, int]:
    health = health_pb2_grpc.HealthStub(channel)
    return {
        name: (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)).status
        for name in ("", "liveness", "readiness")
    }


async def test_the_health_port_answers_plaintext_while_the_grpc_port_serves_tls(
    start_service: StartService,
) -> None:
    service = await start_service(secure_serving=True, health_listen="127.0.0.1:0")
    assert service.health_port not in (0, service.grpc_port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.health_port}") as channel:
        assert await statuses(channel) == {"": SERVING, "liveness": SERVING, "readiness": SERVING}
        # Only health there: the ext_proc stream and the read API stay behind TLS.
        stream = pb_grpc.ExternalProcessorStub(channel).Process()
        await stream.write(workload_headers("a"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.read()
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_health_address_is_checked() -> None:
    with pytest.raises(ValidationError, match="health_listen"):
        Settings(health_listen="no-port")


@pytest.mark.parametrize(
    ("listen", "dialled"),
    [
        ("[::]:9003", "[::1]:9003"),
        ("[fd00::5]:9003", "[fd00::5]:9003"),
        ("0.0.0.0:9003", "127.0.0.1:9003"),
    ],
)
def test_the_health_command_dials_an_ipv6_listener_in_brackets(
    listen: str, dialled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It dialled '::1:9003', which the address parser (rightly) refuses as ambiguous."""
    monkeypatch.setenv("EXTPROC_HEALTH_LISTEN", listen)
    assert _health_address({"config": None}) == dialled
