"""The limiter's arithmetic in Python: token buckets with reserve/settle and leased concurrency slots.

`ratelimit.lua` is a line-by-line port of `decide`/`settle` run inside Redis; this copy serves the
per-replica fallback while Redis is unreachable and is what the property tests reason about.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from policies.config import Limits

__all__ = ["KINDS", "MemoryState", "Scope", "Verdict", "decide", "level_at", "settle", "settle_many"]

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
        a, retry, scope, kind, lr, rr, sr, lt, rt, st = reply
        return cls(a == 1, int(retry), int(scope), kind.decode() if isinstance(kind, bytes) else str(kind),
                   int(lr), int(rr), int(sr), int(lt), int(rt), int(st))


@dataclass
class MemoryState:
    """What Redis holds for the limiter, in dicts: bucket hashes, slot sorted sets, and each key's
    expiry, honoured as Redis honours it (a key is gone once `now` is past its instant).

    The local fallback's store, and the model the script is checked against, TTLs included.
    """

    buckets: dict[str, dict[str, float]] = field(default_factory=dict)
    slots: dict[str, dict[str, float]] = field(default_factory=dict)
    expires: dict[str, float] = field(default_factory=dict)
    """Key -> the instant (ms, on the decisions' clock) after which Redis deletes it."""
    expiry: bool = True
    """False keeps every key for ever: the reference that shows expiry never changes a decision."""

    def _purge(self, key: str, now: float) -> None:
        # Redis: a key expires when now > its instant; an empty hash or set does not exist.
        when = self.expires.get(key)
        if self.expiry and when is not None and now > when:
            self.buckets.pop(key, None)
            self.slots.pop(key, None)
            del self.expires[key]

    def exists(self, key: str, now: float) -> bool:
        self._purge(key, now)
        return bool(self.buckets.get(key) or self.slots.get(key))

    def pttl(self, key: str, now: float) -> float:
        """As Redis's PTTL: -2 for no such key, -1 for a key without expiry, else ms left."""
        if not self.exists(key, now):
            return -2
        when = self.expires.get(key)
        return -1 if when is None else when - now

    def pexpire(self, key: str, now: float, ms: int) -> None:
        if self.exists(key, now):
            self.expires[key] = now + ms

    def hash(self, key: str, now: float) -> dict[str, float]:
        """The bucket hash (empty when absent); written in place by the caller."""
        self._purge(key, now)
        return self.buckets.setdefault(key, {})

    def sorted_set(self, key: str, now: float) -> dict[str, float]:
        self._purge(key, now)
        return self.slots.setdefault(key, {})

    def tidy(self, key: str) -> None:
        """Forget a hash or set left empty, as Redis deletes it (and its TTL) with its last member."""
        if not self.buckets.get(key, True):
            del self.buckets[key]
        if not self.slots.get(key, True):
            del self.slots[key]
        if key not in self.buckets and key not in self.slots:
            self.expires.pop(key, None)

    def sweep(self, now: float) -> None:
        """Delete every expired key (Redis's active expiry), so idle budgets cost no memory."""
        for key in [k for k, when in self.expires.items() if now > when]:
            self._purge(key, now)


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


FULL_MARGIN_MS = 1000
"""A bucket hash lives this long past the instant its last level is full again."""


def _until_full(caps: list[int], levels: dict[str, float]) -> float:
    t = 0.0
    for j, (f, _, window) in enumerate(KINDS):
        if f in levels:
            t = max(t, (caps[j] - levels[f]) * window / caps[j])
    return t


def _keep(state: MemoryState, key: str, now: float, ttl: float) -> None:
    """Give an existing key at least `ttl` ms more, never less than it has (ratelimit.lua's keep)."""
    ms = math.ceil(ttl)
    left = state.pttl(key, now)
    if left != -2 and left < ms:
        state.pexpire(key, now, ms)


def _write(state: MemoryState, key: str, caps: list[int], levels: dict[str, float],
           every: dict[str, float], now: float) -> None:
    """Store `levels` stamped `now`; keep the hash until `every` level of the scope is full again.

    A missing hash reads as full buckets, so its expiry must change no decision: levels read but
    not written count too (settlement writes no request level).
    """
    if not levels:
        return
    h = state.hash(key, now)
    for f, _, _ in KINDS:
        if f in levels:
            h[f], h[f + "s"] = levels[f], now
    _keep(state, key, now, FULL_MARGIN_MS + _until_full(caps, every))


def decide(state: MemoryState, scopes: list[Scope], now: float, member: str, cost: int,
           lease_ms: float) -> Verdict:
    """Admit when every bucket of every scope holds what the request needs, then take it all at once.

    `member` names the request's concurrency slot: it must be unique per reservation.
    """
    levels: list[dict[str, float]] = []
    allowed, retry, failed_scope, failed_kind = True, 0.0, -1, ""
    for i, scope in enumerate(scopes):
        caps = scope.caps()
        h = state.hash(scope.bucket_key, now)
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
        state.tidy(scope.bucket_key)
        conc = caps[3]
        if conc > 0:
            slots = state.sorted_set(scope.slots_key, now)
            for rid in [r for r, exp in slots.items() if exp <= now]:
                del slots[rid]
            state.tidy(scope.slots_key)
            if len(slots) >= conc:
                retry = max(retry, 1000.0)
                if allowed:
                    failed_scope, failed_kind = i, "c"
                allowed = False
        levels.append(got)
    if allowed:
        for i, scope in enumerate(scopes):
            caps = scope.caps()
            got = levels[i]
            for j, (f, _, _) in enumerate(KINDS):
                if f in got:
                    got[f] -= _need(f, cost, caps[j])
            _write(state, scope.bucket_key, caps, got, got, now)
            if caps[3] > 0:
                state.sorted_set(scope.slots_key, now)[member] = now + lease_ms
                _keep(state, scope.slots_key, now, lease_ms)
    else:
        # A TTL cut short elsewhere (an older gateway's settlement) is restored by every refusal.
        for i, scope in enumerate(scopes):
            _keep(state, scope.bucket_key, now, FULL_MARGIN_MS + _until_full(scope.caps(), levels[i]))
    return _verdict(allowed, retry, failed_scope, failed_kind, scopes, levels)


def settle_many(state: MemoryState, scopes: list[Scope], now: float,
                entries: Sequence[tuple[str, int, int]]) -> None:
    """Settle (member, reserved, actual) entries in order at one instant, as one script call does:
    give back each reservation, take what was used (a refund or a debt), free the slots."""
    for scope in scopes:
        caps = scope.caps()
        h = state.hash(scope.bucket_key, now)
        every = {f: level_at(h.get(f), h.get(f + "s"), now, caps[j], window)
                 for j, (f, _, window) in enumerate(KINDS) if caps[j] > 0}
        levels = {f: v for f, v in every.items() if f != "r"}
        state.tidy(scope.bucket_key)
        for _, reserved, actual in entries:
            for j, (f, _, _) in enumerate(KINDS):
                if f in levels:
                    levels[f] = every[f] = min(float(caps[j]), levels[f] + _need(f, reserved, caps[j]) - actual)
        _write(state, scope.bucket_key, caps, levels, every, now)
        if caps[3] > 0:
            slots = state.sorted_set(scope.slots_key, now)
            for member, _, _ in entries:
                slots.pop(member, None)
            state.tidy(scope.slots_key)


def settle(state: MemoryState, scopes: list[Scope], now: float, member: str, reserved: int,
           actual: int) -> None:
    """Give back what was reserved and take what was used (a refund or debt), then free the slot."""
    settle_many(state, scopes, now, [(member, reserved, actual)])


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
