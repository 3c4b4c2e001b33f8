"""The limiter's arithmetic in Python: token buckets with reserve/settle and leased concurrency slots.

`ratelimit.lua` is a line-by-line port of `decide`/`settle` run inside Redis; this copy serves the
per-replica fallback while Redis is unreachable and is what the property tests reason about.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from policies.config import Limits

__all__ = ["KINDS", "MemoryState", "Scope", "Verdict", "decide", "level_at", "settle"]

MINUTE_MS = 60_000
DAY_MS = 86_400_000

# (hash field, Limits attribute, window) of each bucket a scope may have; "r" counts requests.
KINDS: tuple[tuple[str, str, int], ...] = (("t", "tpm", MINUTE_MS), ("r", "rpm", MINUTE_MS),
                                           ("d", "tpd", DAY_MS))
KIND_NAMES = {"t": "tokens per minute", "r": "requests per minute", "d": "tokens per day",
              "c": "concurrent requests"}


@dataclass(frozen=True)
class Scope:
    """One budget holder of a decision: a key, a tenant, or a tenant's use of one model."""

    label: str
    """What the client is told ran out: "key", "tenant" or "tenant model"."""
    bucket_key: str
    """A Redis hash holding the scope's bucket levels and their timestamps."""
    slots_key: str
    """A Redis sorted set of in-flight request ids scored by lease expiry (the concurrency limit)."""
    limits: Limits

    def caps(self) -> list[int]:
        """tpm, rpm, tpd, concurrency with 0 for none."""
        lim = self.limits
        return [lim.tpm or 0, lim.rpm or 0, lim.tpd or 0, lim.concurrency or 0]

    @cached_property
    def packed_caps(self) -> str:
        """`caps()` as the script's one argument per scope, "tpm:rpm:tpd:concurrency" (built once)."""
        return ":".join(map(str, self.caps()))


@dataclass(frozen=True)
class Verdict:
    """A decision and what the `x-ratelimit-*` headers report (-1: no such budget applies)."""

    allowed: bool
    retry_after_ms: int = 0
    failed_scope: int = -1
    """Index into the decision's scopes of the first budget that refused, -1 when allowed."""
    failed_kind: str = ""
    """"t", "r", "d" or "c" (see KIND_NAMES)."""
    limit_requests: int = -1
    remaining_requests: int = -1
    reset_requests_ms: int = -1
    limit_tokens: int = -1
    remaining_tokens: int = -1
    reset_tokens_ms: int = -1

    @classmethod
    def from_reply(cls, reply: list[int | bytes]) -> Verdict:
        """Decode the Lua script's reply (an array of integers, the kind as a string)."""
        kind = reply[3]
        n = [int(x) for x in (reply[:3] + reply[4:])]
        return cls(bool(n[0]), n[1], n[2], kind.decode() if isinstance(kind, bytes) else str(kind), *n[3:])


@dataclass
class MemoryState:
    """What the Redis hashes and sorted sets hold, kept in a dict (the local fallback's store)."""

    buckets: dict[str, dict[str, float]] = field(default_factory=dict)
    slots: dict[str, dict[str, float]] = field(default_factory=dict)


def level_at(level: float | None, ts: float | None, now: float, cap: int, window_ms: int) -> float:
    """A bucket's level at `now`: refilled at cap/window per ms since `ts`, never above cap.

    A bucket never seen is full. A clock that went backwards refills nothing.
    """
    if level is None:
        return float(cap)
    elapsed = max(0.0, now - (ts if ts is not None else now))
    return min(float(cap), level + elapsed * cap / window_ms)


def _need(kind: str, cost: int, cap: int) -> int:
    # A request larger than a whole bucket is clamped to it: it waits for a full bucket, then
    # settles the rest as debt, so it is never refused for ever and the long-run rate still holds.
    return 1 if kind == "r" else min(cost, cap)


def decide(state: MemoryState, scopes: list[Scope], now: float, request_id: str, cost: int,
           lease_ms: float) -> Verdict:
    """Admit when every bucket of every scope holds what the request needs, then take it all at once."""
    levels: list[dict[str, float]] = []
    allowed, retry, failed_scope, failed_kind = True, 0.0, -1, ""
    for i, scope in enumerate(scopes):
        caps = scope.caps()
        h = state.buckets.get(scope.bucket_key, {})
        got: dict[str, float] = {}
        for j, (f, _, window) in enumerate(KINDS):
            cap = caps[j]
            if cap <= 0:
                continue
            lvl = level_at(h.get(f), h.get(f + "s"), now, cap, window)
            got[f] = lvl
            need = _need(f, cost, cap)
            if lvl < need:
                wait = (need - lvl) * window / cap
                retry = max(retry, wait)
                if allowed:
                    failed_scope, failed_kind = i, f
                allowed = False
        conc = caps[3]
        if conc > 0:
            slots = state.slots.setdefault(scope.slots_key, {})
            for rid in [r for r, exp in slots.items() if exp <= now]:
                del slots[rid]
            if len(slots) >= conc:
                retry = max(retry, 1000.0)
                if allowed:
                    failed_scope, failed_kind = i, "c"
                allowed = False
        levels.append(got)
    if allowed:
        for i, scope in enumerate(scopes):
            caps = scope.caps()
            h = state.buckets.setdefault(scope.bucket_key, {})
            for j, (f, _, _) in enumerate(KINDS):
                if f in levels[i]:
                    levels[i][f] -= _need(f, cost, caps[j])
                    h[f], h[f + "s"] = levels[i][f], now
            if caps[3] > 0:
                state.slots.setdefault(scope.slots_key, {})[request_id] = now + lease_ms
    return _verdict(allowed, retry, failed_scope, failed_kind, scopes, levels)


def settle(state: MemoryState, scopes: list[Scope], now: float, request_id: str, reserved: int,
           actual: int) -> None:
    """Give back what was reserved and take what was used (a refund or debt), then free the slot."""
    for scope in scopes:
        caps = scope.caps()
        h = state.buckets.setdefault(scope.bucket_key, {})
        for j, (f, _, window) in enumerate(KINDS):
            cap = caps[j]
            if cap <= 0 or f == "r":
                continue
            lvl = level_at(h.get(f), h.get(f + "s"), now, cap, window)
            h[f], h[f + "s"] = min(float(cap), lvl + _need(f, reserved, cap) - actual), now
        state.slots.get(scope.slots_key, {}).pop(request_id, None)


def _verdict(allowed: bool, retry: float, failed_scope: int, failed_kind: str, scopes: list[Scope],
             levels: list[dict[str, float]]) -> Verdict:
    # The headers describe the tightest bucket: the one with the least left.
    req: tuple[float, int, float] | None = None
    tok: tuple[float, int, float] | None = None
    for i, scope in enumerate(scopes):
        caps = scope.caps()
        for j, (f, _, window) in enumerate(KINDS):
            if f not in levels[i]:
                continue
            lvl, cap = levels[i][f], caps[j]
            reset = (cap - lvl) * window / cap
            if f == "r":
                if req is None or lvl < req[0]:
                    req = (lvl, cap, reset)
            elif tok is None or lvl < tok[0]:
                tok = (lvl, cap, reset)
    lr, rr, sr = (req[1], max(0, math.floor(req[0])), math.ceil(req[2])) if req else (-1, -1, -1)
    lt, rt, st = (tok[1], max(0, math.floor(tok[0])), math.ceil(tok[2])) if tok else (-1, -1, -1)
    return Verdict(allowed, math.ceil(retry) if not allowed else 0, failed_scope, failed_kind,
                   lr, rr, sr, lt, rt, st)
