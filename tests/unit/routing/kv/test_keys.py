"""Request keys meet event keys: engine mode matches the engine's hashes, tokens mode the index's."""
from __future__ import annotations

from routing.kv.keys import RequestKeyer
from routing.kv.state import KVEventState
from routing.kv.tokenize import SimTokenizer
from routing.kv.wire import decode_batch
from routing.types import RoutingRequest
from simulator import tokenizer as sim_tok
from simulator.engine import Engine, EngineConfig, SimRequest
from simulator.kv_events import KVEventRecorder, structs
from simulator.virtual import replay
from simulator.vllm_hash import VllmBlockHasher, to_int_hash

BODY = {"model": "m", "messages": [{"role": "system", "content": "You answer from the manual. " * 120},
                                    {"role": "user", "content": "How do I reset it?"}]}


def _engine_events(algo: str, salt: str | None, lora: str | None) -> tuple[list[bytes], list[int]]:
    import msgspec

    hasher = VllmBlockHasher.create(algo, env={"PYTHONHASHSEED": "3"})
    enc, s, out = msgspec.msgpack.Encoder(), structs("map"), []
    rec = KVEventRecorder(lambda evs: out.append(enc.encode(s.EventBatch(ts=0.0, events=evs))),
                          external=to_int_hash, event_extra_keys=hasher.event_extra_keys)
    engine = Engine(EngineConfig(kv_blocks=512, max_model_len=4096), block_hasher=hasher, kv_events=rec)
    from simulator.openai_api import chat_prompt_text

    ids = sim_tok.encode(chat_prompt_text(BODY))
    replay(engine, [SimRequest("r", ids, 4, cache_salt=salt, lora=lora)])
    return out, ids


def test_both_modes_find_every_full_block_the_engine_stored() -> None:
    for mode in ("engine", "tokens"):
        for salt, lora in ((None, None), ("t1", None), (None, "sql")):
            batches, ids = _engine_events("sha256", salt, lora)
            state = KVEventState(mode, clock=lambda: 0.0)
            for b in batches:
                state.apply("e", decode_batch(b))
            hasher = VllmBlockHasher.create("sha256", env={"PYTHONHASHSEED": "3"}) if mode == "engine" else None
            keyer = RequestKeyer(SimTokenizer(), mode, engine_hasher=hasher)  # type: ignore[arg-type]
            req = RoutingRequest(model="m", prompt=b"", route="chat/completions", body=BODY, cache_salt=salt, lora=lora)
            keys = keyer.keys(req, 16)
            assert len(keys) == len(ids) // 16
            assert state.index.matched_blocks(keys, ["e"]) == {"e": len(keys)}, (mode, salt, lora)
            other = RoutingRequest(model="m", prompt=b"", route="chat/completions", body=BODY, cache_salt="x")
            assert state.index.matched_blocks(keyer.keys(other, 16), ["e"]) == {"e": 0}


def test_engine_mode_with_the_wrong_seed_finds_nothing_tokens_mode_does_not_care() -> None:
    batches, _ = _engine_events("sha256", None, None)
    for mode, found in (("engine", False), ("tokens", True)):
        state = KVEventState(mode, clock=lambda: 0.0)
        for b in batches:
            state.apply("e", decode_batch(b))
        wrong = VllmBlockHasher.create("sha256", env={"PYTHONHASHSEED": "4"})
        keyer = RequestKeyer(SimTokenizer(), mode, engine_hasher=wrong)  # type: ignore[arg-type]
        req = RoutingRequest(model="m", prompt=b"", route="chat/completions", body=BODY)
        assert (state.index.matched_blocks(keyer.keys(req, 16), ["e"])["e"] > 0) is found
