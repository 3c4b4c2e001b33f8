"""One Responses call in flight, and its two endings: committed to Redis, or its lock released."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError, ServiceUnavailable
from gateway.state.request import Item, ResponsesRequest
from gateway.state.store import StateStore

log = logging.getLogger("gravity.state")

__all__ = ["Turn", "commit", "release"]


@dataclass
class Turn:
    """One Responses call in flight: what to store when the backend has answered."""

    req: ResponsesRequest
    tenant: str
    id: str
    thread: str
    created_at: int
    lock_token: str
    settled: bool = False
    """The conversation lock is gone (committed or released): no need to release it again."""

    def response(self, status: str, output: list[Item], usage: dict[str, Any] | None,
                 incomplete: str | None = None) -> dict[str, Any]:
        req = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "temperature": req.temperature,
            "top_p": req.top_p, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "usage": usage, "metadata": req.metadata, "store": req.store,
            "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled", "background": False,
            "conversation": {"id": req.conversation_id} if req.conversation_id else None, "user": req.user,
        }


async def release(store: StateStore, turn: Turn) -> None:
    if turn.req.conversation_id and not turn.settled:
        turn.settled = True
        try:
            await store.release_conversation(turn.tenant, turn.req.conversation_id, turn.lock_token)
        except Exception:
            log.warning("could not release conversation lock", exc_info=True)


async def commit(store: StateStore, turn: Turn, response: dict[str, Any]) -> None:
    """Store the response and append to its conversation in one atomic script."""
    obj = {k: v for k, v in response.items() if k != "output"}
    try:
        await store.save_response(turn.tenant, turn.id, turn.thread, store=turn.req.store, obj=obj,
                                  input_items=turn.req.items, output_items=response["output"],
                                  previous_id=turn.req.previous_response_id,
                                  conversation_id=turn.req.conversation_id, lock_token=turn.lock_token)
        turn.settled = True
    except GatewayError:
        raise
    except Exception as exc:
        log.warning("saving response %s failed", turn.id, exc_info=True)
        raise ServiceUnavailable("The response could not be saved: the state store is unavailable.",
                                 code="state_unavailable", retry_after=1) from exc


