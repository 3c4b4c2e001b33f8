"""`gravity extproc --config FILE [--host H] [--port P] [--tls-cert C --tls-key K]`."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gravity extproc",
                                     description="Gravity as an Envoy ext_proc endpoint picker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", help="listen address (default: extproc.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: extproc.port, 9002)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve gRPC over TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--log-level", default=None, help="overrides the config's logging.level")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    logging.basicConfig(level=getattr(logging, (args.log_level or "warning").upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")

    from gateway.config import ConfigError, load_config
    from gateway.extproc.server import TlsFiles, serve
    from gateway.logs import configure_logging

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid\n{exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level or cfg.logging.level, cfg.logging.format, cfg.logging.access_log)
    ext = cfg.extproc.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port))
                                         if v is not None})
    cfg = cfg.model_copy(update={"extproc": ext})
    tls = TlsFiles.load(args.tls_cert, args.tls_key) if args.tls_cert else None
    # As `gravity serve` does: long-lived start-up objects leave the collector's sight.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(serve(cfg, tls=tls))
    else:
        uvloop.run(serve(cfg, tls=tls))
    return 0
