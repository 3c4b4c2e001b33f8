"""`gravity keys create|list|revoke|hash`: manage the API keys kept in Redis.

A new key is printed once; only its SHA-256 is stored. `hash` prints the hash to put in config.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from policies.config import Limits
from policies.keys import ApiKey, RedisKeyStore, hash_key

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gravity keys", description="Manage API keys kept in Redis.")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--redis-url", help="Redis (or redis+cluster://) URL; default: the config's "
                                           "state.redis_url")
    where.add_argument("--config", help="gateway config whose state section says where Redis is")
    sub = p.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", parents=[where], help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="a label for listings (not secret)")
    create.add_argument("--tenant", default="default")
    create.add_argument("--model", action="append", dest="models", metavar="MODEL",
                        help="a model the key may use (repeat); default: every model")
    create.add_argument("--priority", choices=("critical", "standard", "sheddable"), default="standard",
                        help="priority of requests without an x-gravity-priority header (default: standard)")
    create.add_argument("--max-priority", choices=("critical", "standard", "sheddable"),
                        help="highest priority the header may ask for (default: --priority)")
    create.add_argument("--profile", action="append", dest="profiles", metavar="PROFILE", default=[],
                        help="a routing profile the x-gravity-profile header may choose (repeat); default: none")
    create.add_argument("--admin", action="store_true",
                        help="may read the operator routes (/admin/*, /metrics when kept to admin keys)")
    for flag, what in (("tpm", "tokens per minute"), ("rpm", "requests per minute"),
                       ("tpd", "tokens per day"), ("concurrency", "requests in flight")):
        create.add_argument(f"--{flag}", type=int, help=what)
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    ls = sub.add_parser("list", parents=[where], help="list keys (ids and labels, never the keys)")
    ls.add_argument("--json", action="store_true")
    revoke = sub.add_parser("revoke", parents=[where], help="delete keys by id (hash prefix) or name")
    revoke.add_argument("key", help="an id from `gravity keys list` (8+ hex digits) or a name")
    hsh = sub.add_parser("hash", help="print the SHA-256 of a key (read from stdin when omitted)")
    hsh.add_argument("key", nargs="?")
    return p


def _open(args: argparse.Namespace) -> Any:
    from gateway.config import ConfigError, StateConfig, load_config
    from gateway.redis_conn import open_redis

    if args.redis_url:
        state = StateConfig.model_validate({"redis_url": args.redis_url})
    elif args.config:
        try:
            state = load_config(args.config).state
        except ConfigError as exc:
            raise SystemExit(f"gravity keys: invalid config {args.config}:\n{exc}") from None
    else:
        raise SystemExit("gravity keys: pass --redis-url or --config")
    return open_redis(state)


def _describe(k: ApiKey) -> dict[str, Any]:
    return {"id": k.id, "name": k.name, "tenant": k.tenant,
            "models": sorted(k.models) if k.models is not None else None, "priority": k.priority,
            "max_priority": k.priority_cap, "limits": k.limits.model_dump(exclude_none=True), "created_at": k.created_at,
            "profiles": sorted(k.profiles), "admin": k.admin}


async def _run(args: argparse.Namespace) -> int:
    handle = _open(args)
    try:
        store = RedisKeyStore(handle.client)
        if args.command == "create":
            limits = Limits(tpm=args.tpm, rpm=args.rpm, tpd=args.tpd, concurrency=args.concurrency)
            try:
                text, key = await store.create(name=args.name, tenant=args.tenant, models=args.models,
                                               priority=args.priority, limits=limits,
                                               max_priority=args.max_priority, profiles=args.profiles,
                                               admin=args.admin)
            except ValueError as exc:
                print(f"gravity keys: {exc}", file=sys.stderr)
                return 2
            if args.json:
                print(orjson.dumps({"key": text, **_describe(key)}).decode())
            else:
                print(text)
                print(f"id {key.id}  tenant {key.tenant}  (this key is shown once; store it now)",
                      file=sys.stderr)
            return 0
        if args.command == "list":
            keys = await store.all()
            if args.json:
                print(orjson.dumps([_describe(k) for k in keys]).decode())
            else:
                for k in keys:
                    models = ",".join(sorted(k.models)) if k.models is not None else "*"
                    budget = " ".join(f"{n}={v}" for n, v in k.limits.model_dump(exclude_none=True).items())
                    print(f"{k.id}  {k.name}  tenant={k.tenant}  models={models}  priority={k.priority}"
                          f"  max_priority={k.priority_cap}" + ("  admin" if k.admin else "")
                          + (f"  {budget}" if budget else ""))
            return 0
        gone = await store.revoke(args.key)
        if not gone:
            print(f"gravity keys: no key matches {args.key!r}", file=sys.stderr)
            return 1
        for k in gone:
            print(f"revoked {k.id}  {k.name}")
        return 0
    finally:
        await handle.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash":
        text = args.key if args.key is not None else sys.stdin.readline()
        print(hash_key(text.strip()))
        return 0
    return asyncio.run(_run(args))
