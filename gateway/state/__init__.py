"""Durable session and conversation state in Redis: session affinity, Responses and Conversations.

See docs/state.md; `create_app` builds the parts and hands them what they need.
"""
from __future__ import annotations

from gateway.state.sessions import SessionAffinity
from gateway.state.store import Client, StateStore

__all__ = ["Client", "SessionAffinity", "StateStore"]
