"""`gravity` command line: serve, sim, demo, eval, check-config, keys."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

REPO = Path(__file__).resolve().parents[1]


def _tiktoken_cache() -> None:
    # tiktoken would download its BPE files; the package ships them in tiktoken's cache format.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO / "config" / "tiktoken"))


def _load(path: str) -> GatewayConfig | None:
    """The config, or None after telling the user what is wrong with it."""
    from gateway.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid\n{exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve

    cfg = _load(args.config)
    if cfg is None:
        return 2
    server = cfg.server.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port))
                                           if v is not None})
    serve(cfg.model_copy(update={"server": server}), args.log_level or cfg.logging.level)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    if cfg is None:
        return 2
    print(f"{args.file}: ok ({len(cfg.backends)} backends, {len(cfg.routing.profiles)} routing profiles)")
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    main = importlib.import_module(module).main
    return int(main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    _tiktoken_cache()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own parsers take the rest of the line untouched.
    delegated = {"sim": "simulator.cli", "eval": "routing.eval.cli", "demo": "gateway.demo",
                 "keys": "gateway.keys_cli", "extproc": "gateway.extproc.cli"}
    if argv and argv[0] in delegated:
        return _delegate(delegated[argv[0]], argv[1:])

    parser = argparse.ArgumentParser(prog="gravity", description="Gravity LLM inference gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default=None, help="overrides the config's logging.level")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    for name, help_ in (("sim", "run a simulated vLLM backend"), ("demo", "run a local stack"),
                        ("eval", "replay a workload through the scheduler in virtual time"),
                        ("keys", "manage API keys kept in Redis"),
                        ("extproc", "run as an Envoy ext_proc endpoint picker (docs/extproc.md)")):
        sub.add_parser(name, help=help_, add_help=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(getattr(args, "log_level", None) or "info").upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "serve":
        return _serve(args)
    return _check_config(args)
