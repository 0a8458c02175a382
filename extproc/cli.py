"""The `extproc` command: `serve` the service, or run the `demo-backend`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from aiohttp import web
from pydantic import ValidationError

from extproc import __version__
from extproc.app import run
from extproc.config import Settings, describe_error, parse_address
from extproc.demo_backend import make_demo_app
from extproc.log import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        return _serve(args)
    return _demo_backend(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the ext_proc service",
        description="Every flag can also be set as EXTPROC_<FLAG> in the environment.",
    )
    for name, field in Settings.model_fields.items():
        # SUPPRESS: only flags the user typed reach Settings, so env and defaults fill the rest.
        serve.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f"{field.description or ''} (default: {field.default})",
        )

    demo = commands.add_parser("demo-backend", help="run an LLM-like streaming demo backend")
    demo.add_argument("--listen", default="127.0.0.1:8000")
    demo.add_argument("--concurrency", type=int, default=4, help="requests served at once")
    demo.add_argument("--tokens", type=int, default=20, help="events streamed per answer")
    demo.add_argument("--duration", type=float, default=2.0, help="seconds to stream an answer")
    return parser


def _serve(flags: dict[str, str]) -> int:
    try:
        settings = Settings(**flags)  # type: ignore[arg-type]
    except ValidationError as error:
        print(f"extproc: {describe_error(error)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run(settings))
    except OSError as error:
        print(f"extproc: {error}", file=sys.stderr)
        return 1
    return 0


def _demo_backend(args: dict[str, object]) -> int:
    host, port = parse_address(str(args["listen"]))
    app = make_demo_app(
        concurrency=int(str(args["concurrency"])),
        tokens=int(str(args["tokens"])),
        duration=float(str(args["duration"])),
    )
    web.run_app(app, host=host, port=port, print=lambda _: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
