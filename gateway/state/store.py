"""Stored responses, conversations and sessions in Redis: one script or command per operation.

Every multi-key operation is a registered Lua script over keys of one hash tag (see `keys`), so it
is atomic, one round trip, and valid on Redis Cluster.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import StateConfig
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.state.keys import (
    ConversationKeys,
    ResponseKeys,
    parse_conversation_id,
    parse_response_id,
    session_key,
)
from policies.redis_pipe import RedisPipe

__all__ = ["StateStore", "StoredResponse"]

Client = Redis | RedisCluster
Item = dict[str, Any]

_SCRIPTS = ("history", "conversation_begin", "save_response", "conversation_append", "conversation_list",
            "conversation_delete_item", "release_lock", "renew_lock")


def _load(name: str) -> str:
    return resources.files("gateway.state").joinpath(f"lua/{name}.lua").read_text()


def response_not_found(response_id: str, param: str = "response_id") -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param=param)


def conversation_not_found(conversation_id: str, param: str = "conversation_id") -> NotFound:
    return NotFound(f"Conversation with id '{conversation_id}' not found.", param=param)


def conversation_full(conversation_id: str, limit: int, param: str = "items") -> InvalidRequest:
    return InvalidRequest(f"Conversation '{conversation_id}' would exceed the limit of {limit} items.",
                          param=param, code="conversation_item_limit")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class StoredResponse:
    __slots__ = ("obj", "output")

    def __init__(self, obj: dict[str, Any], output: list[Item]) -> None:
        self.obj, self.output = obj, output

    def public(self) -> dict[str, Any]:
        return {**self.obj, "output": self.output}


class StateStore:
    """All Redis access of the state layer. `client` is read per call: Redis opens in the lifespan."""

    def __init__(self, client: Callable[[], Client], cfg: StateConfig,
                 pipe: Callable[[], RedisPipe | None] = lambda: None) -> None:
        self._client = client
        self._pipe = pipe
        """The request path's pipelined connection: session reads and writes share its writes."""
        self.cfg = cfg
        self._sources = {name: _load(name) for name in _SCRIPTS}
        self._bound: tuple[Client, dict[str, Any]] | None = None

    @property
    def ttl_ms(self) -> int:
        return self.cfg.ttl_s * 1000

    def _redis(self) -> Client:
        return self._client()

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        client = self._client()
        if self._bound is None or self._bound[0] is not client:
            self._bound = (client, {n: client.register_script(src) for n, src in self._sources.items()})
        return await self._bound[1][name](keys=keys, args=args)

    # -- responses -----------------------------------------------------------------------------
    async def history(self, tenant: str, previous_id: str) -> list[Item]:
        """The items of a previous_response_id chain, oldest first; renews the chain's TTL."""
        parsed = parse_response_id(previous_id)
        if parsed is None:
            raise response_not_found(previous_id, "previous_response_id")
        keys = ResponseKeys(tenant, parsed[1])
        got = await self._run("history", [keys.response(previous_id)],
                              [keys.prefix, previous_id, self.ttl_ms, self.cfg.max_conversation_items])
        status = _text(got[0])
        if status == "missing":
            missing = _text(got[1])
            if missing == previous_id:
                raise response_not_found(previous_id, "previous_response_id")
            raise NotFound(f"The history of response '{previous_id}' is incomplete: response "
                           f"'{missing}' was deleted or expired.", param="previous_response_id")
        if status == "long":
            raise InvalidRequest(f"The history of response '{previous_id}' is longer than "
                                 f"{self.cfg.max_conversation_items} items.", param="previous_response_id",
                                 code="conversation_item_limit")
        turns = got[1:]
        items: list[Item] = []
        for i in range(len(turns) - 2, -1, -2):
            items.extend(orjson.loads(turns[i]))
            items.extend(orjson.loads(turns[i + 1]))
        if len(items) > self.cfg.max_conversation_items:
            raise InvalidRequest(f"The history of response '{previous_id}' is longer than "
                                 f"{self.cfg.max_conversation_items} items.", param="previous_response_id",
                                 code="conversation_item_limit")
        return items

    async def get_response(self, tenant: str, response_id: str) -> StoredResponse:
        parsed = parse_response_id(response_id)
        if parsed is None:
            raise response_not_found(response_id)
        obj, output = await self._redis().hmget(ResponseKeys(tenant, parsed[1]).response(response_id),
                                                ["obj", "output"])
        if obj is None:
            raise response_not_found(response_id)
        return StoredResponse(orjson.loads(obj), orjson.loads(output or b"[]"))

    async def response_input(self, tenant: str, response_id: str) -> list[Item]:
        parsed = parse_response_id(response_id)
        if parsed is None:
            raise response_not_found(response_id)
        raw = await self._redis().hget(ResponseKeys(tenant, parsed[1]).response(response_id), "input")
        if raw is None:
            raise response_not_found(response_id)
        items: list[Item] = orjson.loads(raw)
        return items

    async def delete_response(self, tenant: str, response_id: str) -> None:
        parsed = parse_response_id(response_id)
        if parsed is None or not await self._redis().delete(ResponseKeys(tenant, parsed[1]).response(response_id)):
            raise response_not_found(response_id)

    async def save_response(self, tenant: str, response_id: str, thread: str, *, store: bool,
                            obj: dict[str, Any], input_items: list[Item], output_items: list[Item],
                            previous_id: str | None, conversation_id: str | None, lock_token: str) -> None:
        keys = [ResponseKeys(tenant, thread).response(response_id)]
        args: list[Any] = [self.ttl_ms, "1" if store else "0", orjson.dumps(obj), orjson.dumps(input_items),
                           orjson.dumps(output_items), previous_id or "", lock_token,
                           self.cfg.max_conversation_items]
        if conversation_id is not None:
            ck = ConversationKeys(tenant, conversation_id)
            keys += [ck.meta, ck.order, ck.items, ck.lock]
            args += _pairs([*input_items, *output_items])
        elif not store:
            return
        status = _text(await self._run("save_response", keys, args))
        if status == "missing" and conversation_id is not None:
            raise conversation_not_found(conversation_id, "conversation")
        if status == "locked":
            raise Conflict(f"Conversation '{conversation_id}' was taken by another response while this one "
                           f"ran (it outlived state.conversation_lock_s); nothing was appended.",
                           param="conversation", code="conversation_locked")
        if status == "full" and conversation_id is not None:
            raise conversation_full(conversation_id, self.cfg.max_conversation_items, param="conversation")

    # -- conversations -------------------------------------------------------------------------
    def _conversation(self, tenant: str, conversation_id: str) -> ConversationKeys:
        if parse_conversation_id(conversation_id) is None:
            raise conversation_not_found(conversation_id)
        return ConversationKeys(tenant, conversation_id)

    async def begin_conversation(self, tenant: str, conversation_id: str, token: str) -> list[Item]:
        """Hold the conversation for one response and return its items (serialises continuations)."""
        try:
            ck = self._conversation(tenant, conversation_id)
        except NotFound:
            raise conversation_not_found(conversation_id, "conversation") from None
        got = await self._run("conversation_begin", [ck.meta, ck.order, ck.items, ck.lock],
                              [token, int(self.cfg.conversation_lock_s * 1000), self.ttl_ms])
        status = _text(got[0])
        if status == "missing":
            raise conversation_not_found(conversation_id, "conversation")
        if status == "locked":
            raise Conflict(f"Another response is in progress on conversation '{conversation_id}'. "
                           "Retry when it has finished.", param="conversation", code="conversation_locked",
                           retry_after=1)
        return [orjson.loads(raw) for raw in got[1:]]

    async def renew_conversation(self, tenant: str, conversation_id: str, token: str) -> bool:
        """Extend the lock this response holds by another `conversation_lock_s`; False if it lost it."""
        got = await self._run("renew_lock", [ConversationKeys(tenant, conversation_id).lock],
                              [token, int(self.cfg.conversation_lock_s * 1000)])
        return bool(got)

    async def release_conversation(self, tenant: str, conversation_id: str, token: str) -> None:
        await self._run("release_lock", [ConversationKeys(tenant, conversation_id).lock], [token])

    async def create_conversation(self, tenant: str, conversation: dict[str, Any], items: list[Item]) -> None:
        ck = ConversationKeys(tenant, conversation["id"])
        status = _text(await self._run("conversation_append", [ck.meta, ck.order, ck.items],
                                       [self.ttl_ms, orjson.dumps(conversation),
                                        self.cfg.max_conversation_items, *_pairs(items)]))
        if status == "full":
            raise conversation_full(conversation["id"], self.cfg.max_conversation_items)

    async def append_items(self, tenant: str, conversation_id: str, items: list[Item]) -> None:
        ck = self._conversation(tenant, conversation_id)
        status = _text(await self._run("conversation_append", [ck.meta, ck.order, ck.items],
                                       [self.ttl_ms, "", self.cfg.max_conversation_items, *_pairs(items)]))
        if status == "missing":
            raise conversation_not_found(conversation_id)
        if status == "full":
            raise conversation_full(conversation_id, self.cfg.max_conversation_items)

    async def get_conversation(self, tenant: str, conversation_id: str) -> dict[str, Any]:
        raw = await self._redis().get(self._conversation(tenant, conversation_id).meta)
        if raw is None:
            raise conversation_not_found(conversation_id)
        conversation: dict[str, Any] = orjson.loads(raw)
        return conversation

    async def update_conversation(self, tenant: str, conversation_id: str,
                                  metadata: dict[str, str]) -> dict[str, Any]:
        conversation = await self.get_conversation(tenant, conversation_id)
        conversation["metadata"] = metadata
        # XX: a conversation deleted since the read stays deleted.
        ok = await self._redis().set(self._conversation(tenant, conversation_id).meta,
                                     orjson.dumps(conversation), xx=True, px=self.ttl_ms)
        if not ok:
            raise conversation_not_found(conversation_id)
        return conversation

    async def delete_conversation(self, tenant: str, conversation_id: str) -> None:
        ck = self._conversation(tenant, conversation_id)
        # One DEL of same-slot keys; the order list and items hash never outlive the meta key.
        if not await self._redis().delete(ck.meta, ck.order, ck.items, ck.lock):
            raise conversation_not_found(conversation_id)

    async def list_items(self, tenant: str, conversation_id: str, *, after: str | None, limit: int,
                         order: str) -> tuple[list[Item], bool]:
        ck = self._conversation(tenant, conversation_id)
        got = await self._run("conversation_list", [ck.meta, ck.order, ck.items], [after or "", limit, order])
        status = _text(got[0])
        if status == "missing":
            raise conversation_not_found(conversation_id)
        if status == "no_after":
            raise InvalidRequest(f"Item '{after}' is not in conversation '{conversation_id}'.", param="after")
        return [orjson.loads(raw) for raw in got[2:]], bool(int(got[1]))

    async def get_item(self, tenant: str, conversation_id: str, item_id: str) -> Item:
        ck = self._conversation(tenant, conversation_id)
        pipe = self._redis().pipeline(transaction=False)
        pipe.exists(ck.meta)
        pipe.hget(ck.items, item_id)
        exists, raw = await pipe.execute()
        if not exists:
            raise conversation_not_found(conversation_id)
        if raw is None:
            raise NotFound(f"Item with id '{item_id}' not found.", param="item_id")
        item: Item = orjson.loads(raw)
        return item

    async def delete_item(self, tenant: str, conversation_id: str, item_id: str) -> dict[str, Any]:
        ck = self._conversation(tenant, conversation_id)
        got = await self._run("conversation_delete_item", [ck.meta, ck.order, ck.items], [item_id])
        text = _text(got)
        if text == "missing":
            raise conversation_not_found(conversation_id)
        if text == "no_item":
            raise NotFound(f"Item with id '{item_id}' not found.", param="item_id")
        conversation: dict[str, Any] = orjson.loads(got)
        return conversation

    # -- sessions ------------------------------------------------------------------------------
    @staticmethod
    def session_key(tenant: str, session_id: str) -> str:
        if len(session_id) > 128:
            session_id = "sha256:" + hashlib.sha256(session_id.encode()).hexdigest()
        return session_key(tenant, session_id)

    async def get_session(self, tenant: str, session_id: str) -> bytes | None:
        key = self.session_key(tenant, session_id)
        pipe = self._pipe()
        raw = await (pipe.execute("GET", key) if pipe is not None else self._redis().get(key))
        return raw if isinstance(raw, bytes) or raw is None else raw.encode()

    async def set_session(self, tenant: str, session_id: str, value: bytes) -> None:
        key, ttl = self.session_key(tenant, session_id), self.cfg.session_ttl_s * 1000
        pipe = self._pipe()
        if pipe is not None:
            await pipe.execute("SET", key, value, "PX", ttl)
        else:
            await self._redis().set(key, value, px=ttl)

    async def drop_session(self, tenant: str, session_id: str) -> None:
        await self._redis().delete(self.session_key(tenant, session_id))


def _pairs(items: list[Item]) -> list[Any]:
    out: list[Any] = [len(items)]
    for item in items:
        out += [item["id"], orjson.dumps(item)]
    return out
