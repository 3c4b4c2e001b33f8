"""Command line for the simulator: `python -m simulator` or `gravity sim`, serving with uvicorn.

Flags mirror `vllm serve` where vLLM has one (--served-model-name, --lora-modules, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from types import FrameType
from typing import Any

from simulator.faults import Faults
from simulator.kv_events import KVEventsConfig, KVEventsSetup
from simulator.profiles import DEFAULT_PROFILE, get_profile, profile_names
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
    p = argparse.ArgumentParser(prog="gravity sim", description="Simulated vLLM OpenAI-compatible server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--model", default="sim-llama", help="model name (and root) the replica serves")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients use instead of --model")
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=profile_names(),
                   help="engine profile: capacity and step times (h100-8b: Llama-3-8B on an H100, 128k "
                        "context; tiny: a 4,096-token test engine)")
    p.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks overriding the profile's")
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block overriding the profile's")
    p.add_argument("--max-num-seqs", type=int, default=None, help="running sequences overriding the profile's")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step overriding the profile's")
    p.add_argument("--max-model-len", type=int, default=None, help="context length overriding the profile's")
    p.add_argument("--max-loras", type=int, default=None, help="LoRA adapters per batch overriding the profile's")
    p.add_argument("--time-scale", type=float, default=1.0, help="run X times faster than real time")
    p.add_argument("--lora-modules", nargs="+", default=[], help="name=path ...")
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=None,
                   help="overriding the profile's (fcfs)")
    p.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false",
                   help="turn the prefix cache off")
    p.add_argument("--fail-next", type=int, default=0, help="fail the next N generation requests")
    p.add_argument("--fail-status", type=int, default=500, help="HTTP status of injected failures")
    p.add_argument("--latency-ms", type=float, default=0.0, help="extra latency before the first token")
    p.add_argument("--stall-after", type=int, default=None, help="hold streams open after K tokens")
    p.add_argument("--exit-after", type=int, default=None, help="os._exit after K tokens of the next request")
    p.add_argument("--seed", type=int, default=None, help="engine seed, overriding the profile's")
    p.add_argument("--request-log-size", type=int, default=256, help="records kept for /admin/requests")
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


GRACEFUL_SHUTDOWN_S = 2
"""How long a SIGTERMed replica lets open responses finish before uvicorn cancels them."""
HARD_EXIT_S = 5
"""After SIGTERM the process ends within this many seconds whatever its event loop is doing."""


def _bounded_server(config: Any) -> Any:
    """A uvicorn server whose SIGTERM always ends the process: uvicorn's own shutdown waits for open
    responses with no deadline (a stalled stream held a replica for ever) and cannot start while a
    handler keeps the event loop busy. A second signal exits at once."""
    import uvicorn

    class BoundedServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit:
                os._exit(128 + sig)
            super().handle_exit(sig, frame)
            # SIGALRM's default action ends the process; Python handlers cannot be starved of it.
            signal.alarm(HARD_EXIT_S)

    return BoundedServer(config)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    loop = "uvloop" if sys.platform != "win32" else "asyncio"
    config = uvicorn.Config(create_app(cfg), host=args.host, port=args.port, loop=loop, http="httptools",
                            log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    _bounded_server(config).run()
    return 0
