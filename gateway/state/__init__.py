"""Durable session and conversation state in Redis: session affinity, Responses and Conversations.

`install_state(gw)` adds this layer's hooks and routes to a Gateway; see docs/state.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.state.sessions import SessionAffinity
from gateway.state.store import Client, StateStore

if TYPE_CHECKING:
    from gateway.services import Gateway

__all__ = ["SessionAffinity", "StateStore", "install_state"]


def install_state(gw: Gateway) -> StateStore:
    """Register session affinity hooks and the Responses/Conversations routes on `gw`."""
    from gateway.state.routes import state_routes  # imports the dispatch path, which imports the Gateway

    def client() -> Client:
        if gw.redis is None:
            raise RuntimeError("the state store is used before the gateway started")
        return gw.redis.client

    store = StateStore(client, gw.cfg.state)
    affinity = SessionAffinity(gw, store)
    gw.pre_dispatch_hooks.append(affinity.before_dispatch)
    gw.picked_hooks.append(affinity.picked)
    gw.extra_routes.extend(state_routes(gw, store))
    return store
