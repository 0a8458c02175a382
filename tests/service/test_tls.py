"""TLS the way gateways dial the picker: a self-signed certificate made at start, a given
certificate reloaded when its files change (no restart), plaintext when neither is asked."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.cli import main
from extproc.service.tls import CertificateError, CertificateFiles, load_pair
from tests.conftest import StartService
from tests.support.backend import Backend
from tests.support.certs import Authority, Pem
from tests.support.envoy import Envoy, bundled_config
from tests.support.extproc_client import workload_headers

SERVING = health_pb2.HealthCheckResponse.SERVING


def served_certificate(port: int) -> bytes:
    """The certificate the listener presents, read without verifying it."""
    return ssl.get_server_certificate(("127.0.0.1", port)).encode()


async def check_over_tls(port: int, trusted: bytes) -> Any:
    """A health check and an ext_proc exchange over TLS, trusting only `trusted`."""
    credentials = grpc.ssl_channel_credentials(root_certificates=trusted)
    # A channel of its own: every check is a new connection, so a new handshake.
    options = (
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == SERVING
        stream = pb_grpc.ExternalProcessorStub(channel).Process()
        await stream.write(workload_headers("over-tls"))
        answer = await stream.read()
        stream.cancel()
        return answer


async def refused_over_tls(port: int, trusted: bytes) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await check_over_tls(port, trusted)
    return refused.value.code()


async def test_secure_serving_makes_a_certificate_a_client_trusting_it_can_use(
    start_service: StartService,
) -> None:
    service = await start_service(secure_serving=True)
    certificate = served_certificate(service.grpc_port)
    answer = await check_over_tls(service.grpc_port, certificate)
    assert answer.WhichOneof("response") == "request_headers"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(plaintext).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # A second service makes its own key: the first one's certificate does not open it.
    other = await start_service(secure_serving=True)
    assert served_certificate(other.grpc_port) != certificate
    assert await refused_over_tls(other.grpc_port, certificate) == grpc.StatusCode.UNAVAILABLE


async def test_without_the_flag_the_listener_is_plaintext(
    start_service: StartService, channel_to: Any
) -> None:
    service = await start_service()
    with pytest.raises(ssl.SSLError):
        served_certificate(service.grpc_port)
    reply = await health_pb2_grpc.HealthStub(channel_to(service)).Check(
        health_pb2.HealthCheckRequest(service="")
    )
    assert reply.status == SERVING


def replace_file(path: Path, content: bytes) -> None:
    """Write beside, then rename over: readers see the old file or the new one."""
    staging = path.with_suffix(".new")
    staging.write_bytes(content)
    os.replace(staging, path)


async def test_a_given_certificate_is_reloaded_when_its_files_change(
    start_service: StartService, tmp_path: Path
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_ca, second_ca = Authority(tmp_path, "first-ca"), Authority(tmp_path, "second-ca")
    first = first_ca.issue("first", server=True)
    replace_file(cert, first.cert.read_bytes())
    replace_file(key, first.key.read_bytes())
    service = await start_service(tls_cert=cert, tls_key=key)
    old_trust, new_trust = first_ca.pem.cert.read_bytes(), second_ca.pem.cert.read_bytes()
    await check_over_tls(service.grpc_port, old_trust)
    assert await refused_over_tls(service.grpc_port, new_trust) == grpc.StatusCode.UNAVAILABLE

    second = second_ca.issue("second", server=True)
    # Mid-rotation: the new certificate with the old key. Never served; the old pair stays.
    replace_file(cert, second.cert.read_bytes())
    await check_over_tls(service.grpc_port, old_trust)
    replace_file(key, second.key.read_bytes())
    # A client trusting only the new authority now connects, the old one no longer does.
    await check_over_tls(service.grpc_port, new_trust)
    assert await refused_over_tls(service.grpc_port, old_trust) == grpc.StatusCode.UNAVAILABLE


def test_a_mismatched_or_broken_pair_is_not_handed_to_grpc(tmp_path: Path) -> None:
    authority = Authority(tmp_path, "ca")
    one, two = authority.issue("one", server=True), authority.issue("two", server=True)
    with pytest.raises(CertificateError, match="is not the key of"):
        load_pair(one.cert, two.key)
    files = CertificateFiles(one.cert, one.key)
    assert files.fetch() is None  # unchanged
    replace_file(one.key, two.key.read_bytes())
    assert files.fetch() is None  # mismatched: keep the pair in force
    replace_file(one.cert, b"not a certificate")
    assert files.fetch() is None
    replace_file(one.cert, two.cert.read_bytes())
    assert files.fetch() is not None
    assert files.reloads == 1
    assert files.fetch() is None  # once per change


def test_a_broken_certificate_stops_the_start(tmp_path: Path) -> None:
    pem = Pem(tmp_path / "x.crt", tmp_path / "x.key")
    pem.cert.write_bytes(b"garbage")
    pem.key.write_bytes(b"garbage")
    with pytest.raises(OSError, match=r"x\.crt"):
        CertificateFiles(pem.cert, pem.key)


async def test_envoy_dials_the_self_signed_listener_as_gateways_do(
    start_service: StartService,
) -> None:
    """TLS without verification, HTTP/2 (Envoy AI Gateway's and kgateway's cluster)."""
    service = await start_service(secure_serving=True)
    backend = Backend()
    await backend.start()
    config = bundled_config(service.grpc_port, backend.port)
    (cluster,) = [
        c for c in config["static_resources"]["clusters"] if c["name"] == "workload_extproc"
    ]
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"alpn_protocols": ["h2"]},
        },
    }
    envoy = Envoy(config)
    try:
        await envoy.start()
        async with aiohttp.ClientSession() as http:
            headers = {"x-workload-context": '{"workload_id": "via-gateway-tls"}'}
            async with http.get(f"http://127.0.0.1:{envoy.port}/", headers=headers) as reply:
                assert reply.status == 200
        assert backend.arrivals == ["via-gateway-tls"]
    finally:
        await envoy.stop()
        await backend.stop()


async def probe(*argv: str) -> int:
    """`extproc health` as a container's health check runs it (its own thread: it blocks)."""
    return await asyncio.to_thread(main, ["health", "--service", "liveness", *argv])


async def test_the_health_command_probes_a_tls_listener(
    start_service: StartService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    self_signed = await start_service(secure_serving=True)
    assert await probe("--address", f"127.0.0.1:{self_signed.grpc_port}") == 0
    authority = Authority(tmp_path, "ca")
    pem = authority.issue("server", server=True)
    given = await start_service(tls_cert=pem.cert, tls_key=pem.key)
    assert await probe("--address", f"127.0.0.1:{given.grpc_port}") == 0
    plaintext = await start_service()
    assert await probe("--address", f"127.0.0.1:{plaintext.grpc_port}") == 0
    # No --address: where the service listens, read from its settings (as in the image).
    monkeypatch.setenv("EXTPROC_LISTEN", f"0.0.0.0:{self_signed.grpc_port}")
    monkeypatch.setenv("EXTPROC_SECURE_SERVING", "true")
    # Only the addresses are read: the image's HEALTHCHECK does not see the flags the
    # service was started with (an --admin-token among them), and needs none of them.
    monkeypatch.delenv("EXTPROC_ADMIN_TOKEN", raising=False)
    assert await probe() == 0
    config = tmp_path / "config.yaml"
    config.write_text(f"listen: 0.0.0.0:{given.grpc_port}\nmax-queue: 5\n")
    monkeypatch.delenv("EXTPROC_LISTEN")
    assert await probe("--config", str(config)) == 0
    monkeypatch.setenv("EXTPROC_LISTEN", f"0.0.0.0:{self_signed.grpc_port}")  # env over file
    await self_signed.stop(drain_timeout=0, grace=0)
    assert await probe("--config", str(config)) == 1


async def test_the_health_command_prefers_the_plaintext_health_port(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await start_service(secure_serving=True, health_listen="127.0.0.1:0")
    monkeypatch.setenv("EXTPROC_LISTEN", "127.0.0.1:1")  # nothing there: not dialled
    monkeypatch.setenv("EXTPROC_HEALTH_LISTEN", f"127.0.0.1:{service.health_port}")
    assert await probe() == 0


def test_a_missing_or_broken_client_ca_is_not_handed_to_grpc(tmp_path: Path) -> None:
    authority = Authority(tmp_path, "ca")
    server, other = authority.issue("server", server=True), Authority(tmp_path, "other-ca")
    client_ca = tmp_path / "client-ca.crt"
    replace_file(client_ca, authority.pem.cert.read_bytes())
    files = CertificateFiles(server.cert, server.key, client_ca)
    client_ca.unlink()  # mid-rotation of a Secret: the CA not there yet
    assert files.fetch() is None
    replace_file(client_ca, b"not a certificate")
    assert files.fetch() is None
    replace_file(client_ca, other.pem.cert.read_bytes())
    assert files.fetch() is not None
    assert files.reloads == 1
