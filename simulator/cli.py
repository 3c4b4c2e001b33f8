"""Command line for the simulator: `python -m simulator` or `gravity sim`, serving with uvicorn.

Flags mirror `vllm serve` where vLLM has one (--served-model-name, --lora-modules, ...).
"""
from __future__ import annotations

import argparse
import json
import sys

from simulator.faults import Faults
from simulator.kv_events import KVEventsConfig, KVEventsSetup
from simulator.profiles import get_profile, profile_names
from simulator.server import SimServerConfig, create_app
from simulator.vllm_hash import ALGOS


def parse_lora_modules(values: list[str]) -> dict[str, str]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}`."""
    out: dict[str, str] = {}
    for value in values:
        if value.lstrip().startswith("{"):
            obj = json.loads(value)
            out[str(obj["name"])] = str(obj["path"])
        elif "=" in value:
            name, path = value.split("=", 1)
            out[name] = path
        else:
            raise argparse.ArgumentTypeError(f"--lora-modules expects name=path, got {value!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gravity sim", description="Simulated vLLM OpenAI-compatible server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="sim-llama", help="model name (and root) the replica serves")
    p.add_argument("--served-model-name", nargs="+", default=None, help="names clients use (default: --model)")
    p.add_argument("--profile", default="tiny", choices=profile_names())
    p.add_argument("--kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-loras", type=int, default=None)
    p.add_argument("--time-scale", type=float, default=1.0, help="run X times faster than real time")
    p.add_argument("--lora-modules", nargs="+", default=[], help="name=path ...")
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=None)
    p.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false")
    p.add_argument("--fail-next", type=int, default=0, help="fail the next N generation requests")
    p.add_argument("--fail-status", type=int, default=500)
    p.add_argument("--latency-ms", type=float, default=0.0, help="extra latency before the first token")
    p.add_argument("--stall-after", type=int, default=None, help="hold streams open after K tokens")
    p.add_argument("--exit-after", type=int, default=None, help="os._exit after K tokens of the next request")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--request-log-size", type=int, default=256)
    p.add_argument("--kv-events-config", default=None,
                   help="vLLM's JSON, e.g. '{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", "
                        "\"endpoint\": \"tcp://*:5557\", \"replay_endpoint\": \"tcp://*:5558\"}'")
    p.add_argument("--prefix-caching-hash-algo", choices=ALGOS, default="sha256",
                   help="block hash algorithm, as vLLM's (NONE_HASH from PYTHONHASHSEED when set)")
    p.add_argument("--kv-events-layout", choices=["map", "array"], default="map",
                   help="events as maps tagged by type (vLLM's current layout) or positional arrays, tag first")
    p.add_argument("--kserve", action="store_true",
                   help="serve the OpenAI routes under /openai/v1 as KServe's vLLM runtime does (not /v1)")
    return p


def config_from_args(args: argparse.Namespace) -> SimServerConfig:
    engine = get_profile(args.profile, kv_blocks=args.kv_blocks, block_size=args.block_size,
                         max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_model_len=args.max_model_len, max_loras=args.max_loras,
                         scheduling_policy=args.scheduling_policy, seed=args.seed,
                         enable_prefix_caching=None if args.prefix_caching else False)
    faults = Faults()
    faults.update({"fail_next": args.fail_next, "fail_status": args.fail_status, "latency_ms": args.latency_ms,
                   "stall_after": args.stall_after, "exit_after": args.exit_after})
    kv_events = None
    if args.kv_events_config:
        kv_events = KVEventsSetup(KVEventsConfig.from_json(args.kv_events_config), args.prefix_caching_hash_algo,
                                  args.kv_events_layout)
    return SimServerConfig(model=args.model, served_model_names=args.served_model_name or [], engine=engine,
                           time_scale=args.time_scale, lora_modules=parse_lora_modules(args.lora_modules),
                           faults=faults, request_log_size=args.request_log_size,
                           api_prefixes=("/openai/v1",) if args.kserve else ("/v1",), kv_events=kv_events)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    loop = "uvloop" if sys.platform != "win32" else "asyncio"
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, loop=loop, http="httptools",
                log_level="warning", access_log=False, lifespan="on")
    return 0
