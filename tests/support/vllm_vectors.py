"""Test vectors for block hashes and KV-event wire bytes, computed by vLLM's own code from its wheel.

vLLM's ``kv_cache_utils`` imports torch through ``vllm.config``, so the functions that define a block
hash are taken from the wheel's source with ``ast`` and run as they are (no torch): ``hash_block_tokens``,
``generate_block_hash_extra_keys``, ``to_event_extra_keys``, ``maybe_convert_block_hash``,
``resolve_none_hash_seed``; ``vllm/utils/hashing.py`` is imported whole (it needs only cbor2/xxhash);
the event classes of ``vllm/distributed/kv_events.py`` are msgspec Structs run the same way.

    python -m tests.support.vllm_vectors vllm-0.33.0-*.whl [vllm-0.10.1.1-*.whl] > tests/unit/simulator/vllm_vectors.json

(``pip download vllm==0.33.0 --no-deps``.) The JSON is committed; tests compare against it, and
``test_vllm_vectors.py`` regenerates it when ``GRAVITY_VLLM_WHEEL`` names a wheel.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

TOKENS = list(range(1000, 1000 + 16 * 3 + 5))  # three full blocks of 16 and a partial one
BLOCK = 16
CASES = {  # name -> (lora (name, path, adapter id) or None, cache_salt)
    "plain": (None, None),
    "lora": (("sql", "/adapters/sql", 1), None),
    "salt": (None, "tenant-a"),
    "lora+salt": (("sql", "/adapters/sql", 1), "tenant-a"),
}


def _source(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member).decode()


def _functions(src: str, names: set[str]) -> str:
    tree = ast.parse(src)
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    return "\n\n".join(ast.unparse(n) for n in keep)


def _hashing_module(wheel: Path) -> ModuleType:
    path = Path(tempfile.mkdtemp()) / "vllm_hashing.py"
    path.write_text(_source(wheel, "vllm/utils/hashing.py"))
    spec = importlib.util.spec_from_file_location("vllm_hashing", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kv_utils(wheel: Path, hashing: ModuleType, env: dict[str, str]) -> dict[str, Any]:
    from collections.abc import Callable, Iterable, Sequence

    src = _source(wheel, "vllm/v1/core/kv_cache_utils.py")
    names = {"hash_block_tokens", "generate_block_hash_extra_keys", "_gen_lora_extra_hash_keys",
             "_gen_mm_extra_hash_keys", "_gen_prompt_embeds_extra_hash_keys", "to_event_extra_keys",
             "maybe_convert_block_hash", "resolve_none_hash_seed", "init_none_hash"}
    fake_os = SimpleNamespace(getenv=lambda k, d=None: env.get(k, d), urandom=os.urandom)
    ns: dict[str, Any] = {
        "Any": Any, "Callable": Callable, "Sequence": Sequence, "Iterable": Iterable, "os": fake_os,
        "BlockHash": lambda b: b, "ExternalBlockHash": Any, "Request": Any,
        "envs": SimpleNamespace(VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=bool(
            int(env.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")))),
        "logger": SimpleNamespace(warning=lambda *a, **k: None, info=lambda *a, **k: None),
        "sha256": hashing.sha256, "sha256_cbor": hashing.sha256_cbor,
        "xxhash": hashing.xxhash, "xxhash_cbor": hashing.xxhash_cbor,
        "DEFAULT_NONE_HASH_SEED": "vllm-none-hash",
        "_NON_CRYPTO_HASH_FUNCTIONS": frozenset({hashing.xxhash, hashing.xxhash_cbor}),
        "_NONE_HASH_SEED": None,
    }
    exec(compile(_functions(src, names), "vllm/v1/core/kv_cache_utils.py", "exec"), ns)  # noqa: S102
    return ns


def _request(lora: tuple[str, str, int] | None, salt: str | None) -> Any:
    lr = None if lora is None else SimpleNamespace(lora_name=lora[0], name=lora[0], lora_path=lora[1],
                                                    adapter_id=lora[2])
    return SimpleNamespace(lora_request=lr, cache_salt=salt, mm_features=[], prompt_embeds=None,
                           all_token_ids=TOKENS, num_tokens=len(TOKENS))


def hash_vectors(wheel: Path) -> dict[str, Any]:
    hashing = _hashing_module(wheel)
    out: dict[str, Any] = {"tokens": TOKENS, "block_size": BLOCK, "algos": {}}
    for algo in ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"):
        fn = hashing.get_hash_fn_by_name(algo)
        per_algo: dict[str, Any] = {}
        for seed_case, env in (("PYTHONHASHSEED=0", {"PYTHONHASHSEED": "0"}), ("unset", {})):
            if seed_case == "unset" and algo.startswith("xxhash"):
                continue  # random per process: nothing to pin
            ns = _kv_utils(wheel, hashing, env)
            ns["init_none_hash"](fn)
            none_hash = ns["NONE_HASH"]
            cases: dict[str, Any] = {}
            for case, (lora, salt) in CASES.items():
                req = _request(lora, salt)
                parent = None
                hashes, extras = [], []
                for start in range(0, len(TOKENS) // BLOCK * BLOCK, BLOCK):
                    extra, _ = ns["generate_block_hash_extra_keys"](req, start, start + BLOCK, 0)
                    parent = ns["hash_block_tokens"](fn, parent, TOKENS[start:start + BLOCK], extra)
                    hashes.append(parent)
                    extras.append(extra)
                cases[case] = {
                    "hashes_hex": [h.hex() for h in hashes],
                    "int_hashes": [ns["maybe_convert_block_hash"](h) for h in hashes],
                    "event_extra_keys": _jsonable(ns["to_event_extra_keys"](extras)),
                }
            per_algo[seed_case] = {"none_hash_hex": none_hash.hex(), "cases": cases}
        out["algos"][algo] = per_algo
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def wire_vectors(wheel: Path) -> dict[str, Any]:
    """One batch with each event kind, encoded by the wheel's own Structs (hex of the msgpack)."""
    import msgspec

    src = _source(wheel, "vllm/distributed/kv_events.py")
    ns: dict[str, Any] = {"msgspec": msgspec, "Any": Any, "ExternalBlockHash": int | bytes}
    from typing import Optional, Union
    ns.update(Optional=Optional, Union=Union)
    names = {"EventBatch", "KVCacheEvent", "BlockStored", "BlockRemoved", "AllBlocksCleared", "KVEventBatch"}
    exec(compile("from __future__ import annotations\n" + _functions(src, names), "kv_events.py", "exec"), ns)  # noqa: S102
    fields = set(ns["BlockStored"].__struct_fields__)
    stored: dict[str, Any] = {"block_hashes": [11, 22], "parent_block_hash": None,
                              "token_ids": list(range(32)), "block_size": 16, "lora_id": None}
    if "medium" in fields:
        stored.update(medium="GPU", lora_name=None, extra_keys=[None, None], group_idx=0)
    removed: dict[str, Any] = {"block_hashes": [22]}
    if "medium" in set(ns["BlockRemoved"].__struct_fields__):
        removed.update(medium="GPU", group_idx=0)
    batch = ns["KVEventBatch"](ts=1700000000.5, events=[ns["BlockStored"](**stored), ns["BlockRemoved"](**removed),
                                                         ns["AllBlocksCleared"]()], data_parallel_rank=0)
    return {"stored": stored, "removed": removed, "ts": 1700000000.5,
            "payload_hex": msgspec.msgpack.encode(batch).hex()}


def main(argv: list[str]) -> int:
    current = Path(argv[0])
    out: dict[str, Any] = {"wheel": current.name, "hashes": hash_vectors(current),
                           "wire": {"current": wire_vectors(current)}}
    if len(argv) > 1:
        old = Path(argv[1])
        out["wire"]["legacy"] = {**wire_vectors(old), "wheel": old.name}
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
