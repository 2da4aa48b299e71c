"""The `fastgate` command: run, validate, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fastgate import __version__
from fastgate.settings import SettingsError, load_settings

EXIT_INVALID = 2
DEMO_CONFIG = Path(__file__).parent / "demo" / "gateway.yaml"
DEMO_UPSTREAM = ("127.0.0.1", 8900)
DEMO_PROXY_LISTEN = "127.0.0.1:8000"


def _cmd_validate(args: argparse.Namespace) -> int:
    from fastgate.config import ConfigError, load_config
    from fastgate.config.compile import compile_snapshot

    settings = load_settings()
    path = args.path or settings.config
    if not path:
        print("fastgate validate: give a PATH or set FASTGATE_CONFIG", file=sys.stderr)
        return EXIT_INVALID
    if not _load_custom_plugins(settings):
        return EXIT_INVALID
    try:
        snapshot = compile_snapshot(load_config(path))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    config = snapshot.config
    print(
        f"{path}: valid ({len(config.services)} services, {len(config.routes)} routes, "
        f"{len(config.consumers)} consumers, {len(config.plugins)} plugins; "
        f"configuration_hash {snapshot.configuration_hash})"
    )
    return 0


def _load_custom_plugins(settings) -> bool:
    from fastgate.plugins import PluginLoadError, load_custom

    try:
        load_custom(settings.plugins)
    except PluginLoadError as exc:
        print(exc, file=sys.stderr)
        return False
    return True


def _serve(config_path: str, on_ready=None) -> int:
    import uvloop

    from fastgate.server.supervisor import Supervisor
    from fastgate.server.worker import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level)
    if not _load_custom_plugins(settings):
        return EXIT_INVALID

    async def supervise() -> int:
        return await Supervisor(settings, config_path, on_ready=on_ready).run()

    return uvloop.run(supervise())


def _cmd_run(args: argparse.Namespace) -> int:
    path = args.config or load_settings().config
    if not path:
        print("fastgate run: give --config PATH or set FASTGATE_CONFIG", file=sys.stderr)
        return EXIT_INVALID
    return _serve(path)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastgate.demo import upstream

    os.environ.setdefault("FASTGATE_PROXY_LISTEN", DEMO_PROXY_LISTEN)
    settings = load_settings()
    proxy = settings.proxy_listen[0]
    base = f"http://{'127.0.0.1' if proxy.host in ('0.0.0.0', '::') else proxy.host}:{proxy.port}"
    runners = []

    async def on_ready() -> None:
        runners.append(await upstream.start(*DEMO_UPSTREAM))
        print(
            f"\nfastgate demo: the gateway on {base} in front of a mock AI model on "
            f"http://{DEMO_UPSTREAM[0]}:{DEMO_UPSTREAM[1]} (config: {DEMO_CONFIG})\n"
            f"Try:\n"
            f"  curl -i {base}/ai/models\n"
            f"  curl -i {base}/ai/chat/completions -H 'Content-Type: application/json' \\\n"
            f"       -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}]}}'\n"
            f"  curl -N {base}/ai/chat/completions -H 'Content-Type: application/json' \\\n"
            f"       -d '{{\"stream\": true, \"messages\": [{{\"role\": \"user\", \"content\": \"stream me\"}}]}}'\n"
            f"  curl -i {base}/nowhere          # 404 from the gateway, JSON with a request id\n"
            f"Stop with Ctrl-C.\n",
            flush=True,
        )

    return _serve(str(DEMO_CONFIG), on_ready=on_ready)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgate", description="fastgate API gateway")
    parser.add_argument("--version", action="version", version=f"fastgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve the routes of a config file")
    run.add_argument("--config", help="YAML or JSON file (default: FASTGATE_CONFIG)")
    run.set_defaults(handler=_cmd_run)

    validate = commands.add_parser(
        "validate",
        help="check a Kong declarative config file (exit 0 when valid, 2 with one line per problem)",
    )
    validate.add_argument("path", nargs="?", help="YAML or JSON file (default: FASTGATE_CONFIG)")
    validate.set_defaults(handler=_cmd_validate)

    demo = commands.add_parser("demo", help="the gateway in front of a bundled mock AI upstream")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SettingsError as exc:
        print(f"fastgate: bad environment:\n{exc}", file=sys.stderr)
        return EXIT_INVALID
