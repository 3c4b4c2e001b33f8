"""Session affinity: remember which endpoint last served a session, for the affinity scorer.

A session is `x-session-id`, the body's `user` (with `routing.session_from_user`), or for the
Responses API the conversation or response chain. The remembered endpoint is dropped when it was
removed or restarted (its KV cache is gone), so the next request routes by score alone.
"""
from __future__ import annotations

import logging
from typing import Any

import orjson

from gateway.exchange import Exchange
from gateway.state.keys import new_hex
from gateway.state.store import StateStore
from routing.datastore import Datastore
from routing.types import evolve

log = logging.getLogger("gravity.state")

__all__ = ["SessionAffinity"]


class SessionAffinity:
    """`lookup` reads the session's endpoint before routing; `picked` writes it once a backend took it."""

    def __init__(self, datastore: Datastore, store: StateStore) -> None:
        self.datastore = datastore
        self.store = store
        # Restart generations are counted per gateway process; only this process may compare them.
        self.instance = new_hex()

    def record(self, endpoint: str) -> bytes:
        view = self.datastore.snapshot().endpoints.get(endpoint)
        started = view.metrics.process_start_time if view is not None and view.metrics is not None else None
        return orjson.dumps({"e": endpoint, "s": started, "i": self.instance,
                             "g": view.generation if view is not None else None})

    def still_valid(self, raw: bytes) -> str | None:
        """The remembered endpoint, or None when it was removed or restarted since."""
        try:
            rec: dict[str, Any] = orjson.loads(raw)
            name = str(rec["e"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        view = self.datastore.snapshot().endpoints.get(name)
        if view is None:
            return None
        started = view.metrics.process_start_time if view.metrics is not None else None
        # process_start_time is the backend's own word, true for every gateway replica.
        if rec.get("s") is not None and started is not None and rec["s"] != started:
            return None
        if rec.get("i") == self.instance and rec.get("g") != view.generation:
            return None
        return name

    async def lookup(self, ex: Exchange) -> None:
        session = ex.routing.session_id
        if not session:
            return
        try:
            raw = await self.store.get_session(ex.tenant, session)
            if raw is None:
                return
            endpoint = self.still_valid(raw)
            if endpoint is None:
                await self.store.drop_session(ex.tenant, session)
                return
        except Exception:
            log.warning("session lookup failed for request %s", ex.request_id, exc_info=True)
            return
        ex.extras["state.session"] = raw
        ex.routing = evolve(ex.routing, session_endpoint=endpoint)

    async def picked(self, ex: Exchange) -> None:
        session = ex.routing.session_id
        if session and ex.backend:
            await self.store.set_session(ex.tenant, session, self.record(ex.backend))
