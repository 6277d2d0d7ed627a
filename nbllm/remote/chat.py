"""``Chat`` on a remote model: the history goes to the server as messages every turn.

The server applies its chat template and keeps its own prefix cache (the
turn's ``cached_tokens`` says how much it reused). Everything else (how a
reply ends, what the history keeps, undo, edit, JSON) is ``nbllm.Chat``'s.
"""

from __future__ import annotations

import threading
from typing import Any

from ..chat import Chat, ChatReply
from ..chat_prompt import Message, parse_history
from ..generate import TokenStream
from ..prompt import Prompt
from ..request import check_options, make_request
from ..tokens import Token
from .images import image_part

__all__ = ["RemoteChat"]


class RemoteChat(Chat):
    """A conversation with a model on a server (made by ``Chat(remote_lm, ...)``)."""

    def __init__(
        self,
        lm: Any,
        system: str | None = None,
        *,
        history: list[dict[str, Any]] | None = None,
        prompt_cache: Any = None,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        progress: bool = False,
        **settings: Any,
    ):
        if prompt_cache is not None or max_kv_size is not None or kv_bits is not None:
            raise ValueError(
                "Chat: a remote model keeps its cache on the server; expected no prompt_cache/max_kv_size/kv_bits"
            )
        settings.setdefault("max_tokens", 512)
        check_options(lm, settings)
        self.lm, self.progress, self.system, self.settings = lm, False, system, settings
        self.cache = None  # type: ignore[assignment]  # the server keeps the cache
        self._messages = [Message(m.role, m.content) for m in parse_history(history if history is not None else [], lm)]
        self._start_at = 0
        self._pending: ChatReply | None = None
        self._last = None
        self._context = 0
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Chat({self.lm.name!r} on a server, {len(self._messages)} messages)"

    def _start(self, base: list[Message], user: Message, overrides: dict[str, Any]) -> ChatReply:
        check_options(self.lm, overrides)
        options = {**self.settings, **overrides}
        request = make_request(self.lm, self._encode(base + [user], generation=True), **options)
        context = self._last.prompt_tokens + self._last.generated_tokens if self._last is not None else 0
        return self._begin(ChatReply(self, TokenStream(self.lm, request), base, user, context, 0))

    def _begin(self, reply: ChatReply) -> ChatReply:
        self._pending = reply
        return reply

    def _encode(self, messages: list[Message], generation: bool) -> Prompt:
        dicts = [
            {"role": m.role, "content": [*map(image_part, m.images), {"type": "text", "text": m.content}]}
            if m.images
            else {"role": m.role, "content": m.content}
            for m in messages
        ]
        return self.lm.encode(dicts, system=self.system)

    def _cache_free(self) -> None:
        pass  # the cache is the server's

    def _rewind(self) -> None:
        pass  # the server's prefix cache follows the messages by itself

    def _assistant_message(self, tokens: list[Token]) -> Message:
        return Message("assistant", "".join(t.text for t in tokens))
