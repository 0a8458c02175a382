"""Read APIs behind a bearer token off loopback, mTLS with a real Envoy, safe log lines."""

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from pydantic import ValidationError

from extproc.api.v1 import registry_pb2, registry_pb2_grpc
from extproc.config import Settings
from extproc.context import ContextError, ContextParser
from extproc.log import configure_logging
from tests.conftest import StartService
from tests.support.backend import Backend
from tests.support.certs import Authority
from tests.support.envoy import Envoy, bundled_config
from tests.support.extproc_client import response_trailers, workload_headers

TOKEN = "s3cret-token-of-enough-length"


@pytest.mark.parametrize(
    "settings",
    [{"listen": "0.0.0.0:9002"}, {"admin_listen": "10.1.2.3:9003"}, {"listen": "example.org:1"}],
)
def test_listeners_off_loopback_need_a_token(settings: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="set --admin-token"):
        Settings(**settings)  # type: ignore[arg-type]
    Settings(**settings, admin_token=TOKEN)  # type: ignore[arg-type]


async def test_read_apis_require_the_token_when_set(start_service: StartService) -> None:
    service = await start_service(admin_token=TOKEN)
    base = f"http://127.0.0.1:{service.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as reply:
            assert reply.status == 200  # probes need no token
        for authorization in (None, "Bearer wrong", f"Basic {TOKEN}", TOKEN):
            headers = {"authorization": authorization} if authorization else {}
            async with http.get(f"{base}/v1/workloads", headers=headers) as reply:
                assert reply.status == 401
                assert reply.headers["www-authenticate"] == "Bearer"
        async with http.get(
            f"{base}/v1/workloads", headers={"authorization": f"Bearer {TOKEN}"}
        ) as reply:
            assert reply.status == 200

    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        registry = registry_pb2_grpc.WorkloadRegistryStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await registry.ListWorkloads(registry_pb2.ListWorkloadsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await registry.ListWorkloads(
            registry_pb2.ListWorkloadsRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        assert list(reply.workloads) == []
        # The ext_proc stream itself is Envoy's and needs no token.
        stream = pb_grpc.ExternalProcessorStub(channel).Process()
        await stream.write(workload_headers("a"))
        assert (await stream.read()).WhichOneof("response") == "request_headers"
        stream.cancel()


@pytest.mark.parametrize("workload_id", ["a\u2028b", "a\u202eb", "a\u200bb", "a\x85b"])
def test_ids_that_could_forge_or_hide_log_lines_are_refused(workload_id: str) -> None:
    with pytest.raises(ContextError, match="control characters"):
        ContextParser().parse(
            {"x-workload-context": [json.dumps({"workload_id": workload_id}).encode()]}
        )


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_a_request_logs_one_line_whatever_its_id(
    start_service: StartService, log_format: str
) -> None:
    sink = io.StringIO()
    configure_logging(log_format, "info")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))
    try:
        service = await start_service(log_format=log_format)
        tricky = 'x" outcome="dispatched" = \\n ünï {}'
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stream = pb_grpc.ExternalProcessorStub(channel).Process()
            await stream.write(workload_headers(tricky.replace('"', '\\"').replace("\\n", "\\\\n")))
            await stream.read()
            await stream.write(response_trailers())
            await stream.read()
            await stream.done_writing()
        await asyncio.sleep(0)
    finally:
        structlog.reset_defaults()
    lines = [line for line in sink.getvalue().splitlines() if "request" in line]
    assert len(lines) == 1
    if log_format == "json":
        assert json.loads(lines[0])["workload"] == tricky


async def test_mtls_with_a_real_envoy(start_service: StartService, tmp_path: Path) -> None:
    authority = Authority(tmp_path, "test-ca")
    server = authority.issue("extproc", server=True)
    envoy_client = authority.issue("envoy", server=False)
    rogue = Authority(tmp_path, "rogue-ca").issue("intruder", server=False)
    service = await start_service(
        tls_cert=server.cert, tls_key=server.key, tls_client_ca=authority.pem.cert
    )
    backend = Backend()
    await backend.start()
    config = bundled_config(service.grpc_port, backend.port)
    (cluster,) = [
        c for c in config["static_resources"]["clusters"] if c["name"] == "workload_extproc"
    ]
    cluster["transport_socket"] = envoy_tls(authority.pem.cert, envoy_client.cert, envoy_client.key)
    envoy = Envoy(config)
    try:
        await envoy.start()
        async with aiohttp.ClientSession() as http:
            headers = {"x-workload-context": '{"workload_id": "over-mtls"}'}
            async with http.get(f"http://127.0.0.1:{envoy.port}/", headers=headers) as reply:
                assert reply.status == 200
        assert backend.arrivals == ["over-mtls"]
    finally:
        await envoy.stop()
        await backend.stop()

    for client in (None, rogue):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=authority.pem.cert.read_bytes(),
            private_key=client.key.read_bytes() if client else None,
            certificate_chain=client.cert.read_bytes() if client else None,
        )
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{service.grpc_port}", credentials
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await exchange_headers(channel, "intruder")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert service.registry.get_metrics("intruder") is None


async def exchange_headers(channel: grpc.aio.Channel, workload: str) -> Any:
    stream = pb_grpc.ExternalProcessorStub(channel).Process()
    await stream.write(workload_headers(workload))
    return await stream.read()


def envoy_tls(ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert)},
                        "private_key": {"filename": str(key)},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(ca)}},
            },
        },
    }
