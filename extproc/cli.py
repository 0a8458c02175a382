"""The `extproc` command: `serve`, watch it with `top`, probe its `health`, check its
`config`, `simulate` a scenario, run the `demo-backend`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import grpc
import yaml
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from extproc import __version__
from extproc.addresses import format_address, parse_address
from extproc.config import (
    ENV_PREFIX,
    ConfigFile,
    ConfigFileError,
    Settings,
    describe_error,
    load_settings,
    public_view,
)
from extproc.flowcontrol.policies import POLICIES
from extproc.log import configure_logging
from extproc.service.app import run
from extproc.service.tls import probe_credentials
from extproc.tools import top
from extproc.tools.demo_backend import Timing, make_demo_app
from extproc.tools.simulate import Scenario, SimResult
from extproc.tools.simulate import run as run_scenario


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        return _serve(args)
    if command == "simulate":
        return _simulate(args)
    if command == "config":
        return _config(args)
    if command == "health":
        return _health(args)
    if command == "top":
        return top.run(
            str(args["address"]),
            sort=args["sort"],
            limit=args["limit"],
            interval=args["interval"],
            once=args["once"],
            token=os.environ.get("EXTPROC_ADMIN_TOKEN"),
        )
    return _demo_backend(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the ext_proc service",
        description="Every flag can also be set as EXTPROC_<FLAG> in the environment "
        "or as a key of the --config file; flags win over the environment, which wins "
        "over the file.",
    )
    _add_setting_flags(serve)

    config = commands.add_parser("config", help="show or check settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the effective settings as YAML")
    _add_setting_flags(show)
    check = config_commands.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)

    health = commands.add_parser(
        "health", help="exit 0 if a running service reports SERVING (for container health checks)"
    )
    health.add_argument(
        "--address",
        help="default: the service's --health-listen if set, else its --listen "
        "(read from the environment and --config); TLS or plaintext as it answers",
    )
    health.add_argument("--config", type=Path, metavar="FILE", help="the service's settings")
    health.add_argument(
        "--service", default="readiness", help="liveness, readiness, or a gRPC service name"
    )
    health.add_argument("--timeout", type=float, default=2.0)

    live = commands.add_parser("top", help="live view of every workload")
    live.add_argument("--address", default="127.0.0.1:9002", help="the service's gRPC address")
    live.add_argument("--sort", choices=sorted(top.COLUMNS), default="rate")
    live.add_argument("--limit", type=int, default=30, help="rows shown")
    live.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    live.add_argument("--once", action="store_true", help="print one frame and exit")

    simulate = commands.add_parser(
        "simulate",
        help="run a scenario through the real queue and policies on a virtual clock",
    )
    simulate.add_argument("scenario", type=Path, help="scenario YAML (see docs/scenarios/)")
    simulate.add_argument(
        "--policy",
        action="append",
        choices=sorted(POLICIES),
        help="policy to run; repeat to compare (default: all)",
    )
    simulate.add_argument("--json", action="store_true", help="print JSON instead of tables")

    demo = commands.add_parser("demo-backend", help="run an LLM-like streaming demo backend")
    demo.add_argument("--listen", default="127.0.0.1:8000")
    demo.add_argument("--concurrency", type=int, default=4, help="requests served at once")
    demo.add_argument(
        "--max-tokens", type=int, default=20, help="answer length when a request names none"
    )
    demo.add_argument("--first-token", type=float, default=0.05, help="seconds before prefill")
    demo.add_argument(
        "--prefill-rate", type=float, default=5000.0, help="prompt tokens prefilled per second"
    )
    demo.add_argument("--inter-token", type=float, default=0.1, help="seconds between tokens")
    demo.add_argument("--speed", type=float, default=1.0, help="divides every time above")
    demo.add_argument(
        "--prefix-cache-blocks", type=int, default=2048, help="blocks of 16 tokens kept (0: off)"
    )
    demo.add_argument("--model", default="demo", help="the model name served")
    return parser


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    for name, field in Settings.model_fields.items():
        repeatable = typing.get_origin(field.annotation) is list
        default = field.get_default(call_default_factory=True)
        # SUPPRESS: only flags the user typed reach Settings, so env and file fill the rest.
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            action="append" if repeatable else "store",
            metavar=name.upper(),
            help=f"{field.description or ''} (default: {default})",
        )


def _settings(flags: dict[str, object]) -> Settings | None:
    """Settings from flags, env and --config; None after printing why they are invalid."""
    path = flags.pop("config", None)
    config = None
    try:
        config = ConfigFile.read(path) if isinstance(path, Path) else None
        return load_settings(flags, config)
    except ConfigFileError as error:
        print(f"extproc: {error}", file=sys.stderr)
    except ValidationError as error:
        print(f"extproc: {describe_error(error, config)}", file=sys.stderr)
    return None


def _config(args: dict[str, object]) -> int:
    if args.pop("config_command") == "check":
        path = args["file"]
        assert isinstance(path, Path)
        try:
            config = ConfigFile.read(path)
            load_settings({}, config, use_env=False)
        except ConfigFileError as error:
            print(f"extproc: {error}", file=sys.stderr)
            return 2
        except ValidationError as error:
            print(f"extproc: {_file_error(error, config)}", file=sys.stderr)
            return 2
        print(f"{path}: OK")
        return 0
    settings = _settings(args)
    if settings is None:
        return 2
    print(yaml.safe_dump(public_view(settings), sort_keys=False), end="")
    return 0


def _health(args: dict[str, object]) -> int:
    address = args["address"] if args["address"] else _health_address(args)
    if address is None:
        return 2
    service, timeout = str(args["service"]), float(str(args["timeout"]))
    try:
        channel = _probe_channel(str(address), timeout)
    except (OSError, ValueError) as error:
        print(f"extproc: {address}: {error}", file=sys.stderr)
        return 1
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"extproc: {address}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _probe_channel(address: str, timeout: float) -> grpc.Channel:
    """A channel to `address`: TLS trusting the certificate it presents, or plaintext."""
    host, port = parse_address(address)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    dial = probe_credentials(host, port, timeout)
    if dial is None:
        return grpc.insecure_channel(target)
    credentials, name = dial
    return grpc.secure_channel(target, credentials, (("grpc.ssl_target_name_override", name),))


def _health_address(args: dict[str, object]) -> str | None:
    """The service's --health-listen if set, else its --listen, as the environment (first)
    and --config set them; a wildcard host dialled on loopback. Only these two are read:
    a container's health check does not see the flags the service was started with."""
    path = args["config"]
    try:
        values = ConfigFile.read(path).values if isinstance(path, Path) else {}
    except ConfigFileError as error:
        print(f"extproc: {error}", file=sys.stderr)
        return None

    def setting(name: str) -> object:
        from_env = os.environ.get(ENV_PREFIX + name.upper())
        return from_env or values.get(name) or Settings.model_fields[name].default

    address = str(setting("health_listen") or setting("listen"))
    try:
        host, port = parse_address(address)
    except ValueError as error:
        print(f"extproc: {error}", file=sys.stderr)
        return None
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    return format_address(wildcard.get(host, host), port)


def _file_error(error: ValidationError, config: ConfigFile) -> str:
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    name = str(first["loc"][0]) if first["loc"] else ""
    if name in config.lines:
        return f"{config.path} line {config.lines[name]}: {name.replace('_', '-')}: {message}"
    return f"{config.path}: {message}"


def _serve(flags: dict[str, object]) -> int:
    settings = _settings(flags)
    if settings is None:
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run(settings))
    except OSError as error:
        print(f"extproc: {error}", file=sys.stderr)
        return 1
    return 0


def _simulate(args: dict[str, object]) -> int:
    path = args["scenario"]
    assert isinstance(path, Path)
    try:
        scenario = Scenario.from_yaml(path)
    except (OSError, ValueError) as error:
        print(f"extproc: {path}: {error}", file=sys.stderr)
        return 2
    policies = args["policy"] or sorted(POLICIES)
    assert isinstance(policies, list)
    results = [run_scenario(scenario, policy) for policy in policies]
    if args["json"]:
        print(json.dumps([_result_json(r) for r in results], indent=2))
    else:
        console = Console()
        for result in results:
            console.print(_result_table(result))
    return 0


def _result_json(result: SimResult) -> dict[str, object]:
    return {
        "scenario": result.scenario.name,
        "policy": result.policy,
        "jain": result.jain,
        "dispatched": result.dispatched,
        "occupancy": result.occupancy,
        "tenants": [dataclasses.asdict(t) for t in result.tenants],
    }


def _result_table(result: SimResult) -> Table:
    table = Table(
        title=f"{result.scenario.name} · {result.policy} · Jain {result.jain:.3f}",
        caption=f"{result.dispatched} dispatched, {result.occupancy:.0f} slot-seconds served",
    )
    for column in ("tenant", "crit", "sent", "rejected", "timed out", "slot-s",
                   "p50 wait", "p99 wait", "max wait"):  # fmt: skip
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for t in result.tenants:
        table.add_row(
            t.name, str(t.criticality), str(t.dispatched), str(t.rejected), str(t.timed_out),
            f"{t.occupancy:.0f}", f"{t.wait_p50:.2f}", f"{t.wait_p99:.2f}", f"{t.wait_max:.2f}",
        )  # fmt: skip
    return table


def _demo_backend(args: dict[str, object]) -> int:
    host, port = parse_address(str(args["listen"]))
    timing = Timing(
        first_token=float(str(args["first_token"])),
        prefill_rate=float(str(args["prefill_rate"])),
        inter_token=float(str(args["inter_token"])),
        speed=float(str(args["speed"])),
    )
    app = make_demo_app(
        int(str(args["concurrency"])),
        max_tokens=int(str(args["max_tokens"])),
        timing=timing,
        prefix_cache_blocks=int(str(args["prefix_cache_blocks"])),
        model=str(args["model"]),
    )
    web.run_app(app, host=host, port=port, print=lambda _: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
