"""The KV-event subscriber: one asyncio task per backend endpoint feeding the routing layer's block index.

SUB socket (pyzmq asyncio) -> sequence check -> decode -> :class:`routing.kv.state.KVEventState`.
A gap is replayed from the backend's ROUTER socket when it has one, else the endpoint is resynced
(entries dropped, marked cold, counted); a sequence that goes back means the engine restarted.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from gateway.kv_config import BackendKVEvents, KVEventsSettings, resolve_kv_endpoint
from gateway.tasks import cancel_tasks
from routing.kv.state import KVEventState, SequenceTracker
from routing.kv.wire import WireError, decode_batch

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

log = logging.getLogger("gravity.kv_events")

__all__ = ["KVSubscriber", "KVTarget", "build_kv_events"]

_END = -1


@dataclass(frozen=True)
class KVTarget:
    name: str
    events: BackendKVEvents


class KVSubscriber:
    """Lifecycle part (``start``/``stop``) owning the ZMQ context and one task per target."""

    def __init__(self, state: KVEventState, targets: list[KVTarget], settings: KVEventsSettings) -> None:
        self.state = state
        self.targets = targets
        self.settings = settings
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        for t in self.targets:
            self.state.register(t.name)
            self._tasks.append(asyncio.create_task(self._run(t), name=f"gravity-kv-{t.name}"))

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def _run(self, target: KVTarget) -> None:
        assert self._ctx is not None
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)  # never drop on our side: the engine's HWM is the only one
        sub.setsockopt(zmq.SUBSCRIBE, target.events.topic.encode())
        sub.connect(target.events.endpoint)
        seqs = SequenceTracker()
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    continue
                _, seq_bytes, payload = frames
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                verdict = seqs.see(seq)
                if verdict == "restart":
                    log.info("kv events: %s restarted (sequence %d after %s)", target.name, seq, seqs.last)
                    self.state.restarted(target.name)
                    seqs.accept(-1)
                    if seq > 0:
                        await self._recover(target, seqs, seq)
                elif verdict == "gap" or (verdict == "first" and seq > 0):
                    # A first batch past 0: the gateway joined a running engine; its earlier blocks are
                    # only known if the replay buffer still reaches back to 0.
                    if verdict == "first":
                        seqs.last = None
                    await self._recover(target, seqs, seq)
                seqs.accept(seq)
                self._apply(target.name, payload)
        finally:
            sub.close(0)

    def _apply(self, name: str, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except WireError as exc:
            ep = self.state.register(name)
            ep.decode_errors += 1
            log.warning("kv events: undecodable batch from %s: %s", name, exc)
            return
        self.state.apply(name, batch)

    async def _recover(self, target: KVTarget, seqs: SequenceTracker, upto: int) -> None:
        """Batches ``seqs.last + 1 .. upto - 1`` were lost: replay them, or resync."""
        first = (seqs.last or 0) + 1 if seqs.last is not None and seqs.last >= 0 else 0
        replayed = await self._replay(target, first) if target.events.replay_endpoint else None
        wanted = list(range(first, upto))
        if replayed is not None and [s for s, _ in replayed if s < upto][:len(wanted)] == wanted:
            for s, payload in replayed:
                if s < upto:
                    self._apply(target.name, payload)
            self.state.register(target.name).replays += 1
            log.info("kv events: replayed %d batches from %s", len(wanted), target.name)
            return
        log.warning("kv events: lost batches %d..%d from %s; resync", first, upto - 1, target.name)
        self.state.resync(target.name)

    async def _replay(self, target: KVTarget, start: int) -> list[tuple[int, bytes]] | None:
        assert self._ctx is not None and target.events.replay_endpoint is not None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(target.events.replay_endpoint)
        out: list[tuple[int, bytes]] = []
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
            async with asyncio.timeout(self.settings.replay_timeout_s):
                while True:
                    frames = await dealer.recv_multipart()
                    body = frames[1:] if frames and frames[0] == b"" else frames
                    # vLLM 0.33 replies (topic, seq, payload); earlier releases (seq, payload).
                    if len(body) == 3:
                        body = body[1:]
                    if len(body) != 2:
                        return None
                    seq = int.from_bytes(body[0], "big", signed=True)
                    if seq == _END:
                        return out
                    out.append((seq, body[1]))
        except TimeoutError:
            log.warning("kv events: replay from %s timed out", target.name)
            return None
        finally:
            dealer.close(0)


def build_kv_events(cfg: GatewayConfig) -> tuple[KVEventState | None, KVSubscriber | None]:
    """The state and its subscriber when any backend publishes KV events (own or derived endpoint)."""
    settings = cfg.kv_events
    targets = [KVTarget(b.name, ev) for b in cfg.backends
               if (ev := resolve_kv_endpoint(b.url, b.kv_events, settings)) is not None]
    if not targets:
        return None, None
    state = KVEventState(settings.mode, max_keys=settings.max_keys, cold_s=settings.cold_s)
    return state, KVSubscriber(state, targets, settings)
