"""Benchmark: what precise prefix routing costs per decision, tokenization reported apart from scoring.

Chat requests whose system prompt is a shared document (4k or 32k tokens) plus a fresh question, 8
endpoints fed by KV events (the document held by one of them). Per decision, in microseconds:
tokenize cold (no prefix cache), tokenize warm (document cached, new question), block keys in each
mode (tokens: XXH3-64 per block; engine: vLLM's sha256 over pickle), and the scheduler with the
precise profile given pre-tokenized keys (scoring only), against the default approximate profile in
the same run. Also the index's memory per key. Rounds are interleaved; ratios hold on a busy machine.

Run: .venv/bin/python loadtests/bench_kv_keys.py [--rounds 5] [--decisions 200]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routing.config import RoutingConfig
from routing.datastore import Datastore
from routing.kv.index import KVBlockIndex
from routing.kv.keys import RequestKeyer
from routing.kv.state import ROOT_KEY, KVEventState, token_block_keys
from routing.kv.tokenize import SimTokenizer
from routing.kv.wire import Batch, Stored
from routing.scheduler import build_scheduler
from routing.types import EndpointMetrics, EndpointSpec, RoutingRequest
from simulator import tokenizer as sim_tok
from simulator.openai_api import chat_prompt_text
from simulator.vllm_hash import VllmBlockHasher

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which"]
OUT = Path(__file__).resolve().parent / "results" / "kv_keys.json"


def _doc(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choices(WORDS, k=tokens))


def _body(doc: str, q: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": doc}, {"role": "user", "content": q}]}


def _req(body: dict[str, Any], i: int) -> RoutingRequest:
    prompt = json.dumps(body["messages"]).encode()
    return RoutingRequest(model="m", prompt=prompt, route="chat/completions", body=body,
                          prompt_tokens=len(prompt) // 4, max_tokens=64, request_id=f"r{i}")


class _Fixed:
    """Token ids computed beforehand: isolates scoring from tokenization."""

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] = {}

    def token_ids(self, req: RoutingRequest) -> list[int] | None:
        return self.ids.get(req.request_id)


def _timeit(fn: Any, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e6


def _profile(prefix_type: str) -> RoutingConfig:
    return RoutingConfig.model_validate({
        "plugins": [{"type": prefix_type, "name": "prefix"}, {"type": "prefill-cost-scorer", "name": "prefill-cost"},
                    {"type": "load-guard-scorer", "name": "load-guard"}],
        "profiles": [{"name": "p", "plugins": [{"ref": "prefix", "weight": 2}, {"ref": "prefill-cost", "weight": 4},
                                               {"ref": "load-guard", "weight": 2}]}]})


def one_round(doc_tokens: int, decisions: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    doc = _doc(rng, doc_tokens)
    bodies = [_body(doc, f"Question {i}: " + _doc(rng, 20)) for i in range(decisions)]
    out: dict[str, float] = {}
    sim_tok.encode("warm up tiktoken")
    # Tokenization: cold (a fresh cache per decision: whole prompt) and warm (the document cached).
    out["tokenize_cold_us"] = _timeit(lambda i: sim_tok.encode(chat_prompt_text(bodies[i])), min(decisions, 20))
    tok = SimTokenizer()
    tok.token_ids(_req(bodies[0], 0))
    out["tokenize_warm_us"] = _timeit(lambda i: tok.token_ids(_req(bodies[i], i)), decisions)
    out["render_only_us"] = _timeit(lambda i: chat_prompt_text(bodies[i]), decisions)
    ids = [sim_tok.encode(chat_prompt_text(b)) for b in bodies]
    out["prompt_tokens"] = float(len(ids[0]))
    out["keys_tokens_mode_us"] = _timeit(lambda i: token_block_keys(ROOT_KEY, ids[i], 16), decisions)
    hasher = VllmBlockHasher.create("sha256", env={"PYTHONHASHSEED": "0"})
    out["keys_engine_sha256_us"] = _timeit(lambda i: hasher.extend([], ids[i], 16), min(decisions, 20))
    # Scoring: the scheduler over 8 fed endpoints, keys memoised per request before the timed call.
    ds = Datastore(lambda: 0.0)
    for e in range(8):
        name = f"ep-{e}"
        ds.upsert(EndpointSpec(name, f"http://{name}", frozenset({"m"})))
        ds.update_metrics(name, EndpointMetrics(waiting=1, running=8, kv_usage=0.4, kv_capacity_tokens=491_520))
    state = KVEventState("tokens", clock=lambda: 0.0)
    for e in range(8):
        held = ids[0][:len(ids[0]) // 16 * 16] if e == 3 else ids[0][:16 * 4]
        n = len(held) // 16
        state.apply(f"ep-{e}", Batch(0.0, [Stored(list(range(e * 10**6, e * 10**6 + n)), None, held, 16)]))
    precise = build_scheduler(_profile("precise-prefix-cache-scorer"), ds, rng=random.Random(0), kv_events=state)
    fixed = _Fixed()
    scorer = next(s for s, _ in precise._profiles["p"].scorers if s.name == "prefix")
    scorer.index.keyer = RequestKeyer(fixed, "tokens")  # type: ignore[attr-defined]
    reqs = [_req(b, i) for i, b in enumerate(bodies)]
    for r, i in zip(reqs, ids, strict=True):
        fixed.ids[r.request_id] = i

    keyer = scorer.index.keyer  # type: ignore[attr-defined]
    spent = 0.0
    for i in range(decisions):
        keyer.keys(reqs[i], 16)  # keys memoised for this request: the timed call below only scores
        t = time.perf_counter()
        precise.schedule(reqs[i])
        spent += time.perf_counter() - t
    out["schedule_precise_us"] = spent / decisions * 1e6
    approx = build_scheduler(_profile("prefix-cache-scorer"), ds, rng=random.Random(0))
    out["schedule_approx_us"] = _timeit(lambda i: approx.schedule(reqs[i]), decisions)
    best = precise.schedule(reqs[1]).best.endpoint
    assert best == "ep-3", best
    return out


def memory_per_key(keys: int = 200_000) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idx = KVBlockIndex()
    idx.add("ep-0", range(keys))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / keys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decisions", type=int, default=200)
    args = p.parse_args()
    results: dict[str, Any] = {}
    rows: dict[int, list[dict[str, float]]] = {4096: [], 32768: []}
    for r in range(args.rounds):
        for size, got in rows.items():  # interleaved
            got.append(one_round(size, args.decisions if size == 4096 else args.decisions // 4, r))
    for size, runs in rows.items():
        results[str(size)] = {k: round(statistics.median(run[k] for run in runs), 2) for k in runs[0]}
        results[str(size)]["precise_over_approx_scoring"] = round(
            results[str(size)]["schedule_precise_us"] / results[str(size)]["schedule_approx_us"], 2)
    results["index_bytes_per_key"] = round(memory_per_key(), 1)
    print(json.dumps(results, indent=2))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
