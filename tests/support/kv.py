"""Simulators that publish KV events, and the gateway config that subscribes to them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import REPO, Proc, free_port, start_sim


def start_kv_sim(tmp: Path, model: str = "sim-llama", extra: list[str] | None = None,
                 replay: bool = True, timeout: float = 20.0) -> tuple[Proc, dict[str, Any]]:
    """A simulator publishing KV events on free ports, and its backend `kv_events` config entry."""
    pub, rep = free_port(), free_port()
    cfg: dict[str, Any] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub}",
                           "topic": "kv-events"}
    entry: dict[str, Any] = {"endpoint": f"tcp://127.0.0.1:{pub}", "topic": "kv-events"}
    if replay:
        cfg["replay_endpoint"] = f"tcp://*:{rep}"
        entry["replay_endpoint"] = f"tcp://127.0.0.1:{rep}"
    sim = start_sim(tmp, model, [*(extra or ["--profile", "tiny"]), "--kv-events-config", json.dumps(cfg)],
                    timeout=timeout)
    return sim, entry


def precise_routing() -> dict[str, Any]:
    """config/routing-precise.yaml's routing section (the precise profile as the only one)."""
    data: dict[str, Any] = yaml.safe_load((REPO / "config" / "routing-precise.yaml").read_text())["routing"]
    return data
