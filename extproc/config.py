"""Settings for `extproc serve`: one declaration per setting, read from flags, env and a file.

Each field is a command-line flag (`max_queue` -> `--max-queue`), an
environment variable (`EXTPROC_MAX_QUEUE`) and a key of the YAML file given
with `--config` (`max-queue:` or `max_queue:`). Precedence: flags >
environment > file > defaults. Validation happens once, at start, and a bad
value stops the process with one line naming the setting (and, for a value
from the file, its line).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from extproc.addresses import is_loopback, parse_address, redact_url
from extproc.capacity.adaptive import AdaptiveOptions
from extproc.capacity.saturation import (
    KV_CACHE_METRICS,
    RUNNING_METRICS,
    WAITING_METRICS,
    SaturationOptions,
)
from extproc.flowcontrol.fair_share import DEFAULT_WEIGHTS, check_weights
from extproc.flowcontrol.policies import POLICIES, PolicyOptions
from extproc.flowcontrol.policy import ScoreWeights
from extproc.pool.body import DEFAULT_MAX_BODY_BYTES
from extproc.pool.endpoints import EndpointOptions
from extproc.pool.scorers import ScorerWeights
from extproc.workloads import WorkloadsFileError, WorkloadTable

ENV_PREFIX = "EXTPROC_"


class ConfigFileError(ValueError):
    """The config file cannot be read as settings; the message names where."""


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    values: dict[str, object]
    lines: dict[str, int]
    """Line (1-based) of each setting in the file."""

    @classmethod
    def read(cls, path: Path) -> ConfigFile:
        try:
            node = yaml.compose(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigFileError(f"{path}: {error}") from None
        if node is None:
            return cls(path, {}, {})
        if not isinstance(node, yaml.MappingNode):
            raise ConfigFileError(f"{path}: expected a mapping of settings")
        values: dict[str, object] = {}
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value).replace("-", "_")
            line = key_node.start_mark.line + 1
            if name not in Settings.model_fields:
                raise ConfigFileError(f"{path} line {line}: unknown setting {key_node.value!r}")
            values[name] = yaml.safe_load(yaml.serialize(value_node))
            lines[name] = line
        return cls(path, values, lines)


class _FileSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, object]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[object, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, object]:
        return dict(self._values)


def public_view(settings: Settings) -> dict[str, object]:
    """The settings as `config show` prints them: flag spelling, secrets masked."""
    view: dict[str, object] = {}
    for name, value in settings.model_dump(mode="json").items():
        shown = value
        if name == "admin_token" and value:
            shown = "***"
        elif name == "registry":
            shown = redact_url(str(value))
        view[name.replace("_", "-")] = shown
    if settings.workloads is not None:
        view["workloads-table"] = WorkloadTable.read(settings.workloads).as_json()
    return view


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    listen: str = Field("127.0.0.1:9002", description="gRPC address (ext_proc, read API, health)")
    admin_listen: str = Field("127.0.0.1:9003", description="HTTP admin address")
    max_concurrency: int = Field(
        0,
        ge=0,
        description="requests in flight at once; 0 = unlimited. With --capacity metrics the "
        "ceiling and the fallback when metrics go stale; with adaptive the ceiling",
    )
    capacity: Literal["static", "metrics", "adaptive"] = Field(
        "static",
        description="static: --max-concurrency; metrics: the model servers' saturation; "
        "adaptive: a limit found from latency",
    )
    backend_metrics_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="metrics: a model server's Prometheus URL; repeat (or comma-separate) for each",
    )
    backend_metrics_interval: float = Field(
        0.1, gt=0, le=60, description="metrics: seconds between scrapes"
    )
    backend_metrics_stale: float = Field(
        1.0, gt=0, description="metrics: ignore readings older than this; all stale -> static, s"
    )
    waiting_threshold: float = Field(
        5.0, gt=0, description="metrics: saturated at this many requests waiting in a server"
    )
    kv_cache_threshold: float = Field(
        0.8, gt=0, le=1, description="metrics: saturated at this KV-cache utilisation"
    )
    waiting_metrics: str = Field(
        ",".join(WAITING_METRICS),
        pattern=r"[^,\s]",
        description="metrics: waiting-requests gauge names, first found",
    )
    running_metrics: str = Field(
        ",".join(RUNNING_METRICS),
        pattern=r"[^,\s]",
        description="metrics: running-requests gauge names, first found (optional series)",
    )
    kv_cache_metrics: str = Field(
        ",".join(KV_CACHE_METRICS),
        pattern=r"[^,\s]",
        description="metrics: KV-cache gauge names, first found",
    )
    endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="pool: model servers as IP:PORT, comma-separated or repeated; picking is "
        "on whenever endpoints are configured",
    )
    endpoints_dns: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="pool: NAME:PORT whose every A/AAAA record is an endpoint (a headless "
        "Service), re-resolved periodically; repeatable",
    )
    endpoints_dns_interval: float = Field(
        5.0, gt=0, description="pool: seconds between DNS resolutions"
    )
    inference_pool: str | None = Field(
        None,
        pattern=r"^([a-z0-9-]+/)?[a-z0-9.-]+$",
        description="pool: [NAMESPACE/]NAME of a Kubernetes InferencePool whose ready Pods "
        "are the endpoints (in-cluster credentials or KUBECONFIG)",
    )
    picker: Literal["round-robin", "least-loaded", "scored"] = Field(
        "scored", description="pool: how the endpoint is chosen"
    )
    scorers: str = Field(
        "queue=2,kv-cache=2,prefix=3", description="pool: weights of the scored picker"
    )
    endpoint_max_in_flight: int = Field(
        0, ge=0, description="pool: requests in flight per endpoint at most; 0 = no ceiling"
    )
    fallbacks: int = Field(
        0,
        ge=0,
        le=8,
        description="pool: endpoints named after the primary, for the data plane's retries; "
        "a list needs override-host routing (envoy-pool.yaml): ORIGINAL_DST takes one",
    )
    conformance_test_hooks: bool = Field(
        False,
        description="pool: honour the Gateway API Inference Extension conformance suite's "
        "test-epp-endpoint-selection request header and report "
        "x-conformance-test-served-endpoint; never in production (any client could steer)",
    )
    endpoint_metrics_path: str = Field(
        "/metrics", pattern=r"^/", description="pool: each endpoint's Prometheus page"
    )
    endpoint_scrape_interval: float = Field(
        0.1, gt=0, le=60, description="pool: seconds between scrapes of each endpoint"
    )
    endpoint_stale: float = Field(
        1.0,
        gt=0,
        description="pool: readings older than this are unknown (in flight counts instead); "
        "scrapes that cannot connect this long take the endpoint out, s",
    )
    adaptive_min_limit: int = Field(3, ge=1, description="adaptive: floor, and the probe's limit")
    adaptive_window: float = Field(0.5, gt=0, description="adaptive: seconds per latency window")
    adaptive_probe_interval: float = Field(
        60.0, gt=0, description="adaptive: re-measure the no-load latency this often, s"
    )
    registry: str = Field(
        "memory",
        description="memory (this replica alone), or redis://HOST:PORT/DB to share workloads "
        "and --max-concurrency across replicas",
    )
    registry_sync_interval: float = Field(
        0.1, gt=0, le=10, description="redis: seconds between syncs with the fleet"
    )
    registry_lease: float = Field(
        5.0, gt=0, description="redis: a replica silent this long loses its slots, s"
    )
    registry_replicas_hint: int = Field(
        1,
        ge=1,
        description="redis: replicas expected; until its first sync with Redis a replica "
        "takes --max-concurrency / this many slots",
    )
    registry_prefix: str = Field("extproc", min_length=1, description="redis: key prefix")
    max_queue: int = Field(10_000, ge=0, description="requests waiting at once, all workloads")
    queue_timeout: float = Field(30.0, gt=0, le=3600, description="longest wait in the queue, s")
    policy: str = Field("workload-aware", description=f"one of {', '.join(sorted(POLICIES))}")
    on_missing_context: Literal["default", "reject"] = Field(
        "default", description="requests with no workload header: use --default-workload, or 400"
    )
    default_workload: str = Field("default", min_length=1, max_length=128)
    workload_header: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
        description="take the workload id from this header, set by the gateway after "
        "authentication; x-workload-context then only contributes a criticality",
    )
    workloads: Path | None = Field(
        None, description="YAML table of workloads: weights, criticality bounds, caps, access"
    )
    workloads_reload_interval: float = Field(
        1.0, gt=0, le=60, description="check the --workloads file for edits this often, s"
    )
    shed_below: int = Field(
        0,
        ge=0,
        le=6,
        description="while the backend is saturated, answer criticality below this 429 at "
        "once instead of queueing; 0 = never",
    )
    max_workloads: int = Field(100_000, ge=1, description="workloads tracked at once")
    workload_idle_ttl: float = Field(300.0, gt=0, description="forget a workload idle this long, s")
    on_registry_full: Literal["reject", "overflow"] = Field(
        "overflow", description="new workload past --max-workloads: 429, or the `overflow` workload"
    )
    wait_ema_alpha: float = Field(0.2, gt=0, le=1, description="EMA factor of the average wait")
    rate_window: float = Field(60.0, ge=1, description="sliding window of the request rate, s")
    weight_wait: float = Field(0.4, ge=0, description="workload-aware: weight of the wait term")
    weight_criticality: float = Field(0.4, ge=0, description="workload-aware: criticality weight")
    weight_rate: float = Field(0.2, ge=0, description="workload-aware: weight of the rate penalty")
    wait_saturation: float = Field(60.0, gt=0, description="workload-aware: wait term cap, s")
    rate_saturation: float = Field(100.0, gt=0, description="workload-aware: rate cap, req/s")
    fair_share_cost: Literal["requests", "occupancy", "tokens"] = Field(
        "occupancy",
        description="fair-share: charge per request, per slot-second, or per token (input + "
        "2 x output; needs full-duplex bodies, else falls back to occupancy)",
    )
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES,
        ge=0,
        le=1 << 30,
        description="full-duplex and buffered bodies: read the OpenAI JSON request body up "
        "to this size; "
        "a larger one is forwarded unchanged and picked without its prompt",
    )
    criticality_weights: str = Field(
        ",".join(f"{w:g}" for w in DEFAULT_WEIGHTS),
        description="fair-share: weights of criticality 1..5, comma-separated",
    )
    drain_timeout: float = Field(
        10.0, ge=0, description="on SIGTERM, keep dispatching queued requests this long, s"
    )
    shutdown_grace: float = Field(
        30.0, ge=0, description="then let responses in flight finish for this long, s"
    )
    metrics_top_workloads: int = Field(
        50, ge=0, description="workloads with their own metric series; the rest are `other`"
    )
    admin_token: str | None = Field(
        None,
        min_length=16,
        description="bearer token for the read APIs; required off loopback (prefer the env var)",
    )
    tls_cert: Path | None = Field(None, description="gRPC listener: certificate chain (PEM)")
    tls_key: Path | None = Field(None, description="gRPC listener: private key (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="gRPC listener: require client certificates signed by this CA (mTLS)"
    )
    secure_serving: bool = Field(
        False,
        description="gRPC listener: serve TLS with a self-signed certificate made at start "
        "when no --tls-cert is given (gateways that route InferencePools dial TLS)",
    )
    health_listen: str | None = Field(
        None,
        description="also serve the gRPC health services (liveness, readiness) in plaintext "
        "here, for Kubernetes grpc probes, which cannot dial TLS",
    )
    log_format: Literal["json", "console"] = Field("json", description="json or console")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("listen", "admin_listen", "health_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value

    @field_validator("backend_metrics_url", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("endpoints", "endpoints_dns", mode="before")
    @classmethod
    def _split_endpoints(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [p.strip() for item in value for p in str(item).split(",") if p.strip()]
        return value

    @field_validator("endpoints")
    @classmethod
    def _endpoint_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _ = parse_address(address)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"expected IP:PORT, got {address!r}") from None
        return value

    @field_validator("endpoints_dns")
    @classmethod
    def _dns_names(cls, value: list[str]) -> list[str]:
        for name in value:
            host, _ = parse_address(name)
            if not _DNS_NAME.fullmatch(host) or len(host) > 253:
                raise ValueError(
                    f"expected NAME:PORT, {host!r} is not a DNS name (dot-separated labels of "
                    "1-63 letters, digits, '-' or '_', none starting or ending with '-')"
                )
        return value

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, value: str) -> str:
        ScorerWeights.parse(value)
        return value

    @field_validator("backend_metrics_url")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return value

    @field_validator("registry")
    @classmethod
    def _registry(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected memory, redis://HOST:PORT/DB, rediss://... or unix://...")
        return value

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose from {', '.join(sorted(POLICIES))}")
        return value

    @field_validator("criticality_weights")
    @classmethod
    def _criticality_weights(cls, value: str) -> str:
        try:
            weights = [float(part) for part in value.split(",")]
        except ValueError:
            raise ValueError("expected five comma-separated numbers") from None
        check_weights(weights)
        return value

    @field_validator("tls_cert", "tls_key", "tls_client_ca")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("workloads")
    @classmethod
    def _workloads_table(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                WorkloadTable.read(value)
            except WorkloadsFileError as error:
                raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _settings_that_go_together(self) -> Settings:
        if self.capacity == "metrics" and not self.backend_metrics_url:
            raise ValueError("--capacity metrics needs at least one --backend-metrics-url")
        if self.capacity == "metrics" and self.max_concurrency == 0:
            # Stale metrics (an overloaded server answering /metrics slowly) hand
            # control to this limit: unlimited would flood the backend then.
            raise ValueError(
                "--capacity metrics needs --max-concurrency: its ceiling, and the limit "
                "when every endpoint's metrics go stale"
            )
        if self.registry_lease < 3 * self.registry_sync_interval:
            raise ValueError("--registry-lease must be at least 3 x --registry-sync-interval")
        stale, interval = self.backend_metrics_stale, self.backend_metrics_interval
        if self.capacity == "metrics" and stale < interval:
            raise ValueError("--backend-metrics-stale must be >= --backend-metrics-interval")
        if self.capacity == "adaptive" and self.max_concurrency < self.adaptive_min_limit:
            raise ValueError(
                "--capacity adaptive needs --max-concurrency (its ceiling) "
                f">= --adaptive-min-limit ({self.adaptive_min_limit})"
            )
        return self

    @model_validator(mode="after")
    def _secure_off_loopback(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for flag, address in (("--listen", self.listen), ("--admin-listen", self.admin_listen)):
            if not is_loopback(parse_address(address)[0]) and self.admin_token is None:
                raise ValueError(f"{flag} {address} is not loopback: set --admin-token")
        return self

    def policy_options(self) -> PolicyOptions:
        return PolicyOptions(
            score=ScoreWeights(
                wait=self.weight_wait,
                criticality=self.weight_criticality,
                rate=self.weight_rate,
                wait_saturation=self.wait_saturation,
                rate_saturation=self.rate_saturation,
            ),
            cost=self.fair_share_cost,
            criticality_weights=tuple(float(w) for w in self.criticality_weights.split(",")),
        )

    @property
    def endpoints_configured(self) -> bool:
        """Endpoint picking is on: the service says where each request goes."""
        return bool(self.endpoints or self.endpoints_dns or self.inference_pool)

    def endpoint_options(self) -> EndpointOptions:
        return EndpointOptions(
            saturation=replace(self.saturation_options(), stale_after=self.endpoint_stale),
            max_in_flight=self.endpoint_max_in_flight,
        )

    def saturation_options(self) -> SaturationOptions:
        return SaturationOptions(
            waiting_threshold=self.waiting_threshold,
            kv_cache_threshold=self.kv_cache_threshold,
            stale_after=self.backend_metrics_stale,
            waiting_metrics=_names(self.waiting_metrics),
            running_metrics=_names(self.running_metrics),
            kv_cache_metrics=_names(self.kv_cache_metrics),
        )

    def adaptive_options(self) -> AdaptiveOptions:
        return AdaptiveOptions(
            max_limit=self.max_concurrency,
            min_limit=self.adaptive_min_limit,
            window=self.adaptive_window,
            probe_interval=self.adaptive_probe_interval,
        )


_DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def load_settings(
    flags: dict[str, object], config: ConfigFile | None = None, *, use_env: bool = True
) -> Settings:
    """Settings from flags, the environment and a config file, in that precedence."""
    file_values = config.values if config else {}

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            file = _FileSource(settings_cls, file_values)
            return (init_settings, env_settings, file) if use_env else (init_settings, file)

    return FileSettings(**flags)  # type: ignore[arg-type]


def describe_error(error: ValidationError, config: ConfigFile | None = None) -> str:
    """One line naming the first bad setting as the user spelled it, and where it came from."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:
        return f"invalid settings: {message}"
    name = str(first["loc"][0])
    flag = "--" + name.replace("_", "-")
    value = first.get("input")
    shown = "" if isinstance(value, dict) or name == "admin_token" else f"={value}"
    if not shown.isprintable():
        shown = f"={value!r}"  # one line, whatever the value holds
    where = f"env {ENV_PREFIX}{name.upper()}"
    if config is not None and name in config.lines:
        where += f", or {config.path} line {config.lines[name]}"
    return f"invalid setting {flag}{shown} ({where}): {message}"
