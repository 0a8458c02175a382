"""What ships: the wheel (protos inside), the container recipe, the manifests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from google.protobuf import json_format

from extproc.cli import main
from extproc.service.app import HOLD_MARGIN

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", duration)
    assert match, duration
    return float(match.group(1))


def shipped_config() -> dict[str, Any]:
    (configmap,) = documents(DEPLOY / "kubernetes" / "configmap.yaml")
    return yaml.safe_load(configmap["data"]["config.yaml"])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)]
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("workload_extproc-*.whl")
    return built


def test_wheel_carries_the_generated_protos(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "extproc/api/v1/registry_pb2.py" in names
    assert "extproc/api/v1/registry_pb2_grpc.py" in names
    assert "extproc/py.typed" in names


def test_wheel_installs_into_a_fresh_venv_and_serves(wheel: Path, tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    subprocess.run(
        [str(bin_dir / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    version = subprocess.run(
        [str(bin_dir / "extproc"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == "extproc 0.1.0"
    loopback = "127.0.0.1:0"
    serve = subprocess.Popen(
        [str(bin_dir / "extproc"), "serve", "--listen", loopback, "--admin-listen", loopback],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert serve.stderr is not None
        event = json.loads(serve.stderr.readline())
        assert event["event"] == "serving"
        deadline = time.monotonic() + 30
        while True:
            health = subprocess.run(
                [str(bin_dir / "extproc"), "health", "--address", event["grpc"]],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if health.returncode == 0 or time.monotonic() > deadline:
                break
        assert health.returncode == 0, health.stderr
        assert "SERVING" in health.stdout
    finally:
        serve.terminate()
        serve.wait(timeout=30)


def test_dockerfile_builds_from_real_paths_and_installs_only_the_wheel() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, re.MULTILINE)
    assert [image for image, _ in stages] == ["python:3.11-slim", "python:3.11-slim"]
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert "python -m build --wheel" in text
    runtime = text.split("\nFROM ")[-1]
    assert "COPY --from=build /dist/" in runtime
    assert re.search(r"pip install --no-cache-dir /tmp/dist/workload_extproc-\*\.whl", runtime)
    assert "COPY extproc" not in runtime  # the source tree never reaches the image
    assert re.search(r"^USER 10001$", runtime, re.MULTILINE)
    assert re.search(r"^EXPOSE 9002 9003$", runtime, re.MULTILINE)
    assert '"extproc", "health"' in runtime


def test_the_wheel_name_matches_what_the_dockerfile_installs(wheel: Path) -> None:
    assert re.fullmatch(r"workload_extproc-[\d.]+-py3-none-any\.whl", wheel.name)


@pytest.mark.parametrize(
    "path", sorted((DEPLOY / "kubernetes").glob("*.yaml")), ids=lambda p: p.name
)
def test_core_manifests_validate_offline(path: Path) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_deployment_probes_security_and_grace() -> None:
    (deployment,) = documents(DEPLOY / "kubernetes" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = shipped_config()
    # Probed on the plaintext health port: kubelet's grpc probes cannot dial TLS.
    health_port = int(config["health-listen"].rsplit(":", 1)[1])
    assert container["readinessProbe"]["grpc"] == {"port": health_port, "service": "readiness"}
    assert container["livenessProbe"]["grpc"] == {"port": health_port, "service": "liveness"}
    assert health_port in {p["containerPort"] for p in container["ports"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"]
    assert pod["terminationGracePeriodSeconds"] > config["drain-timeout"] + config["shutdown-grace"]
    token = container["env"][0]
    assert token["name"] == "EXTPROC_ADMIN_TOKEN"  # required off loopback


def test_shipped_config_is_valid(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({**shipped_config(), "admin-token": "x" * 24}))
    assert main(["config", "check", str(config_file)]) == 0


def test_envoy_gateway_policy_has_what_the_service_needs() -> None:
    backend, policy, route = documents(DEPLOY / "envoy-gateway" / "envoy-extension-policy.yaml")
    assert policy["kind"] == "EnvoyExtensionPolicy"
    (ext_proc,) = policy["spec"]["extProc"]
    (ref,) = ext_proc["backendRefs"]
    (service,) = documents(DEPLOY / "kubernetes" / "service.yaml")
    name = service["metadata"]["name"]
    assert ref == {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": name, "port": 9002}
    # The Backend is the Service, dialled with TLS (the service's self-signed certificate).
    assert (backend["kind"], backend["metadata"]["name"]) == ("Backend", name)
    (endpoint,) = backend["spec"]["endpoints"]
    assert endpoint["fqdn"] == {"hostname": f"{name}.{name}.svc.cluster.local", "port": 9002}
    assert backend["spec"]["tls"] == {"insecureSkipVerify": True}
    assert ext_proc["failOpen"] is False
    assert "request" in ext_proc["processingMode"]  # request headers: tracking point "new"
    assert ext_proc["processingMode"]["response"]["body"] == "Streamed"  # sees the last chunk
    longest_hold = shipped_config()["queue-timeout"] + HOLD_MARGIN
    assert seconds(ext_proc["messageTimeout"]) >= longest_hold
    target = policy["spec"]["targetRefs"][0]
    assert (target["kind"], target["name"]) == ("HTTPRoute", route["metadata"]["name"])
    assert seconds(route["spec"]["rules"][0]["timeouts"]["request"]) > longest_hold


def test_istio_filter_is_a_valid_envoy_config_with_the_needed_modes() -> None:
    envoy_filter, destination_rule = documents(DEPLOY / "istio" / "envoy-filter.yaml")
    (patch,) = envoy_filter["spec"]["configPatches"]
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    typed = dict(patch["patch"]["value"]["typed_config"])
    typed.pop("@type")
    config = json_format.ParseDict(typed, ext_proc_pb2.ExternalProcessor())  # strict field names
    mode = config.processing_mode
    assert mode.request_header_mode == mode.SEND
    assert mode.response_trailer_mode == mode.SEND
    assert mode.response_body_mode == mode.NONE
    assert not config.failure_mode_allow
    longest_hold = shipped_config()["queue-timeout"] + HOLD_MARGIN
    assert config.max_message_timeout.ToTimedelta().total_seconds() >= longest_hold
    host = destination_rule["spec"]["host"]
    assert config.grpc_service.envoy_grpc.cluster_name == f"outbound|9002||{host}"
    pool = destination_rule["spec"]["trafficPolicy"]["connectionPool"]
    assert pool["http"]["http2MaxRequests"] >= shipped_config()["max-queue"]


def test_every_manifest_serves_tls_to_its_gateway() -> None:
    config = shipped_config()
    assert config["secure-serving"] is True
    assert "tls-cert" not in config  # self-signed unless the operator mounts one
    destination_rules = [
        d
        for path in (
            DEPLOY / "istio" / "envoy-filter.yaml",
            DEPLOY / "inference-pool" / "istio.yaml",
        )
        for d in documents(path)
        if d["kind"] == "DestinationRule"
    ]
    assert len(destination_rules) == 2
    for rule in destination_rules:
        assert rule["spec"]["trafficPolicy"]["tls"] == {
            "mode": "SIMPLE",
            "insecureSkipVerify": True,
        }
    (service,) = documents(DEPLOY / "kubernetes" / "service.yaml")
    grpc_port = next(p for p in service["spec"]["ports"] if p["port"] == 9002)
    assert grpc_port["appProtocol"] != "kubernetes.io/h2c"  # not cleartext any more
