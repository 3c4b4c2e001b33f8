"""The evaluator's trace format: JSON Lines, one request per line, and its token encoding.

``{"t": s, "model": str, "session": str|null, "messages": [...]}`` or ``{"t": s, "model": str, "prompt": str}``,
plus ``max_tokens`` and optionally ``cache_salt`` and ``lora``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.tokenizer import encode, render_chat

__all__ = ["PromptEncoder", "TraceRecord", "read_trace", "write_trace"]


@dataclass(frozen=True)
class TraceRecord:
    t: float
    model: str
    max_tokens: int
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    session: str | None = None
    cache_salt: str | None = None
    lora: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 6), "model": self.model, "session": self.session}
        if self.messages is not None:
            out["messages"] = list(self.messages)
        else:
            out["prompt"] = self.prompt
        out["max_tokens"] = self.max_tokens
        if self.cache_salt is not None:
            out["cache_salt"] = self.cache_salt
        if self.lora is not None:
            out["lora"] = self.lora
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], line: int = 0) -> TraceRecord:
        where = f"trace line {line}"
        if "messages" not in data and "prompt" not in data:
            raise ValueError(f"{where}: needs 'messages' or 'prompt'")
        messages = data.get("messages")
        return cls(
            t=float(data["t"]),
            model=str(data["model"]),
            max_tokens=int(data.get("max_tokens", 128)),
            messages=None if messages is None else tuple(dict(m) for m in messages),
            prompt=data.get("prompt"),
            session=data.get("session"),
            cache_salt=data.get("cache_salt"),
            lora=data.get("lora"),
        )


def read_trace(path: str | Path) -> list[TraceRecord]:
    out = []
    with Path(path).open() as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(TraceRecord.from_json(json.loads(line), i))
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{path}:{i}: {exc}") from exc
    out.sort(key=lambda r: r.t)
    return out


def write_trace(path: str | Path, records: Iterable[TraceRecord]) -> None:
    with Path(path).open("w") as fh:
        fh.writelines(json.dumps(r.to_json(), separators=(",", ":")) + "\n" for r in records)


class PromptEncoder:
    """Renders a record to (prompt bytes for routing, token ids for the engine).

    Messages are encoded piece by piece with a memo, so a 6,000-token shared system prompt is
    tokenized once per run instead of once per request; shared text still yields shared tokens.
    """

    def __init__(self) -> None:
        self._memo: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = encode(text)
            self._memo[text] = ids
        return ids

    def encode(self, record: TraceRecord) -> tuple[bytes, list[int]]:
        if record.messages is None:
            text = record.prompt or ""
            return text.encode(), self._enc(text)
        text = render_chat(record.messages)
        return text.encode(), self._pieces(record.messages)

    def _pieces(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids = list(self._enc("<|begin_of_text|>"))
        for m in messages:
            ids += self._enc(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
            ids += self._enc(str(m.get("content", "")).strip())
            ids += self._enc("<|eot_id|>")
        ids += self._enc("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return ids
