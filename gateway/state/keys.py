"""Ids and Redis key names for stored state: `gravity:{<tenant>/<thread>}:...`.

The hash tag is the tenant plus the *thread* (a conversation, or the first response of a
previous_response_id chain), so every key one operation touches lives in one Redis Cluster slot
and a thread's history is read by one script. The thread is recoverable from any id in it.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["ConversationKeys", "ResponseKeys", "new_hex", "new_item_id", "parse_conversation_id",
           "parse_response_id", "session_key"]

_HEX = r"[0-9a-f]{32}"
_RESPONSE_ID = re.compile(rf"^resp_({_HEX})({_HEX})?$")
_CONVERSATION_ID = re.compile(rf"^conv_({_HEX})$")
ITEM_ID = re.compile(rf"^[a-z]{{2,8}}_{_HEX}$")


def new_hex() -> str:
    """128 random bits: ids are the only secret between tenants' objects, so never guessable."""
    return secrets.token_hex(16)


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{new_hex()}"


def _tenant(tenant: str) -> str:
    # Percent-encoding keeps `{`, `}`, `/` and `:` out of the tag, so no tenant can steer a slot.
    return quote(tenant, safe="")


def _tag(tenant: str, thread: str) -> str:
    return f"gravity:{{{_tenant(tenant)}/{thread}}}"


@dataclass(frozen=True)
class ResponseKeys:
    tenant: str
    thread: str

    def response(self, response_id: str) -> str:
        return f"{_tag(self.tenant, self.thread)}:resp:{response_id}"

    @property
    def prefix(self) -> str:
        """Prepended to a response id inside the history script (same slot by construction)."""
        return f"{_tag(self.tenant, self.thread)}:resp:"


@dataclass(frozen=True)
class ConversationKeys:
    tenant: str
    conversation_id: str

    @property
    def thread(self) -> str:
        return self.conversation_id.removeprefix("conv_")

    @property
    def meta(self) -> str:
        return f"{_tag(self.tenant, self.thread)}:conv:{self.conversation_id}"

    @property
    def order(self) -> str:
        """A list of item ids, oldest first."""
        return self.meta + ":order"

    @property
    def items(self) -> str:
        """A hash of item id -> item JSON."""
        return self.meta + ":items"

    @property
    def lock(self) -> str:
        """Held by the one response currently appending to the conversation."""
        return self.meta + ":lock"

    def responses(self) -> ResponseKeys:
        return ResponseKeys(self.tenant, self.thread)


def parse_response_id(response_id: str) -> tuple[str, str] | None:
    """(own, thread) hex for a well-formed id, else None (treated as not found)."""
    m = _RESPONSE_ID.match(response_id)
    if m is None:
        return None
    own, thread = m.group(1), m.group(2) or m.group(1)
    return own, thread


def response_id(own: str, thread: str) -> str:
    return f"resp_{own}" if own == thread else f"resp_{own}{thread}"


def parse_conversation_id(conversation_id: str) -> str | None:
    m = _CONVERSATION_ID.match(conversation_id)
    return None if m is None else m.group(1)


def session_key(tenant: str, session_id: str) -> str:
    # Session ids are client text of any length: quote them so they cannot contain a hash tag.
    return f"gravity:{{{_tenant(tenant)}/s:{quote(session_id, safe='')}}}:session"
