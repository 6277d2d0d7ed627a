"""Chat sessions: message history on top of a reused prompt cache.

Each turn's prompt is the chat template's rendering of the history (see
``nbllm.chat_prompt``: assistant replies go back in as the tokens the model
generated, so the cache built while generating them is reused as is). When
the history outgrows the model's context (or the cache's ``max_kv_size``),
the oldest exchanges are left out of the prompt (the system message stays)
and the turn's stats say how many.

How a reply ends decides what the history keeps: read to the end, cancelled
(``cancel()``, a Stop button), closed, or superseded by a new ``send()``, the
text streamed so far is the assistant's message; an error or an interrupt
(KeyboardInterrupt) leaves the history as it was before the turn.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, replace
from typing import Any

from .cache import PromptCache
from .chat_prompt import ChatRenderer, Message, as_dict, check_message, parse_history, same_text
from .engine import InUseError, ModelHandle
from .generate import TokenStream
from .progress import progress_bar
from .prompt import Prompt, check_text
from .request import check_options, make_request
from .tokens import Completion, Stats, Token, TurnStats

__all__ = ["Chat", "ChatReply", "TurnStats"]

_FORMAT = "nbllm-chat/1"


class ChatReply:
    """The streamed reply to one message: iterate it for ``Token`` records, or read ``text``.

    Reading ``text`` or ``completion()`` runs the reply to the end first, so a
    reply behaves like a response whether or not anyone iterated it.
    """

    def __init__(self, chat: Chat, ts: TokenStream, base: list[Message], user: Message, context: int, dropped: int):
        self._chat, self._ts, self._base, self._user = chat, ts, base, user
        self._context, self._dropped = context, dropped
        self.done = False

    def __iter__(self) -> ChatReply:
        return self

    def __next__(self) -> Token:
        if self.done:
            raise StopIteration
        try:
            token = next(self._ts)
        except StopIteration:
            self._finish(keep=True)
            raise
        except BaseException:  # an error or an interrupt: the turn did not happen
            self._finish(keep=False)
            raise
        if token.finish_reason is not None:
            self._finish(keep=True)
        return token

    @property
    def tokens(self) -> list[Token]:
        """The token records streamed so far."""
        return self._ts.tokens

    @property
    def text(self) -> str:
        """The whole reply text (runs the reply to the end if it is still streaming)."""
        for _ in self:
            pass
        return self._ts.text

    @property
    def stats(self) -> Stats:
        return self._ts.stats

    @property
    def prompt(self) -> Prompt:
        return self._ts.prompt

    @property
    def prompt_ids(self) -> list[int]:
        return self._ts.prompt_ids

    @property
    def constraint(self) -> Any:
        """The structured-output constraint of this reply, if any."""
        return self._ts.constraint

    @property
    def finish_reason(self) -> str | None:
        return self._ts.finish_reason

    def cancel(self) -> None:
        """End after the current token (thread-safe); the partial reply is kept."""
        self._ts.cancel()

    def close(self) -> None:
        """Stop now; the text streamed so far is kept as the reply."""
        self._finish(keep=True)

    def partial(self) -> Completion:
        """The reply so far as a ``Completion`` (nothing more is generated)."""
        return self._ts.partial()

    def completion(self) -> Completion:
        """Read the reply to the end and return it as a ``Completion`` (``value`` parsed for a constraint)."""
        for _ in self:
            pass
        return self._ts.completion()

    def _closable_here(self) -> bool:
        return self.done or self._ts.release_lease()

    def _finish(self, keep: bool) -> None:
        if self.done:
            return
        self.done = True
        try:
            self._ts.close()
        finally:
            self._chat._settle_reply(self, keep)

    def __repr__(self) -> str:
        return f"ChatReply({self._ts.text!r}, finish_reason={self.finish_reason!r})"


class Chat:
    """A conversation with a model, reusing the KV cache from turn to turn.

    Args:
        lm: A loaded model with a chat template.
        system: System message (kept across ``reset``).
        history: Earlier messages (``{"role", "content"}`` dicts alternating
            user/assistant, e.g. from ``Chat.from_json``; an assistant message may
            carry ``token_ids``).
        prompt_cache: A ``PromptCache`` to use (default: a new one).
        max_kv_size: Bound the new cache (see ``PromptCache``); the prompt then
            keeps to that many tokens too.
        kv_bits: Quantize the new cache (see ``PromptCache``).
        progress: Show a tqdm bar for prefills of at least 512 new tokens.
        **settings: Defaults for every reply: ``max_tokens`` (512), sampling
            settings (``temperature``, ``top_p``, ... as for ``stream``),
            ``top_logprobs``, ``stop``, ``logits_processors``, a constraint;
            ``send(..., progress=callback)`` reports one reply's prefill.
    """

    def __new__(cls, lm: ModelHandle, *args: Any, **kwargs: Any) -> Chat:
        # A remote model names its own kind of chat (nbllm.remote.chat): Chat(lm) works for both.
        special = getattr(lm, "chat_class", None) if cls is Chat else None
        return super().__new__(special if special is not None else cls)

    def __init__(
        self,
        lm: ModelHandle,
        system: str | None = None,
        *,
        history: list[dict[str, Any]] | None = None,
        prompt_cache: PromptCache | None = None,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        progress: bool = False,
        **settings: Any,
    ):
        if not getattr(lm.tokenizer, "has_chat_template", False):
            raise ValueError(f"Chat: expected a model with a chat template, {lm.name} has none")
        if prompt_cache is not None and (max_kv_size is not None or kv_bits is not None):
            raise ValueError("expected prompt_cache or max_kv_size/kv_bits, got both")
        if prompt_cache is not None and getattr(prompt_cache, "lm", None) is not lm:
            raise ValueError("prompt_cache: expected a PromptCache made for this model")
        settings.setdefault("max_tokens", 512)
        check_options(lm, settings)
        self.lm, self.progress = lm, bool(progress)
        self.system = system
        self.settings = settings
        self.cache = (
            prompt_cache if prompt_cache is not None else PromptCache(lm, max_kv_size=max_kv_size, kv_bits=kv_bits)
        )
        self._renderer = ChatRenderer(lm.tokenizer)
        self._messages = parse_history(history if history is not None else [], lm)
        self._start_at = 0  # messages before this one no longer fit the prompt
        self._pending: ChatReply | None = None
        self._last: TurnStats | None = None
        self._lock = threading.RLock()

    @property
    def system(self) -> str | None:
        """The system message (may be changed between turns)."""
        return self._system

    @system.setter
    def system(self, value: str | None) -> None:
        if value is not None:
            check_text(value, "system")
        self._system = value

    # -- conversation --------------------------------------------------------
    def send(self, text: str, images: Any = None, **overrides: Any) -> ChatReply:
        """Send a user message; returns the reply as a stream of ``Token``s.

        Args:
            text: The message (non-empty).
            images: Image(s) for this message (vision models): path, URL, PIL
                image, array or bytes. Later turns about them reuse the cache.
            **overrides: Settings for this reply only (as in the constructor).
        """
        check_message(text, "send")
        pictures = tuple(images) if isinstance(images, (list, tuple)) else (() if images is None else (images,))
        if pictures and not self.lm.is_vision:
            raise ValueError(f"images: {self.lm.name} is a text-only model; load a vision model to use images")
        with self._lock:
            self._settle()
            return self._start(list(self._messages), Message("user", text, images=pictures), overrides)

    def regenerate(self, **overrides: Any) -> ChatReply:
        """Answer the last user message again; the new reply replaces the old one when it arrives."""
        with self._lock:
            self._settle()
            if not self._messages:
                raise IndexError("regenerate: expected a previous exchange, the history is empty")
            return self._start(self._messages[:-2], self._messages[-2], overrides)

    def undo(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Drop the last exchange (user message and reply), rewinding the cache; returns it."""
        with self._lock:
            self._settle()
            if not self._messages:
                raise IndexError("undo: expected an exchange to drop, the history is empty")
            dropped = self._messages[-2:]
            self._messages = self._messages[:-2]
            self._start_at = min(self._start_at, len(self._messages))
            self._rewind()
            return as_dict(dropped[0]), as_dict(dropped[1])

    def edit(self, i: int, text: str) -> None:
        """Replace the text of message ``i`` of ``history`` (later messages are kept)."""
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"edit: expected an integer index, got {type(i).__name__}")
        check_message(text, "edit")
        with self._lock:
            self._settle()
            n = len(self._messages)
            if not -n <= i < n:
                raise IndexError(f"edit: expected an index in [{-n}, {n}), got {i}")
            old = self._messages[i]
            self._messages[i] = Message(old.role, text, images=old.images)
            self._rewind()

    def reset(self) -> None:
        """Forget the conversation (the system message and its cached tokens stay)."""
        with self._lock:
            self._settle()
            self._messages, self._start_at = [], 0
            self._rewind()

    # -- views -------------------------------------------------------------------
    @property
    def history(self) -> list[dict[str, Any]]:
        """The finished messages as ``{"role", "content"}`` dicts (system message excluded).

        A user message with images also has ``"images"``: how many.
        """
        return [dict(as_dict(m), **({"images": len(m.images)} if m.images else {})) for m in self._messages]

    @property
    def last_stats(self) -> TurnStats | None:
        """Figures for the last finished reply, including cache reuse and dropped messages."""
        return self._last

    def __repr__(self) -> str:
        return f"Chat({self.lm.name!r}, {len(self._messages)} messages, {self.cache!r})"

    def to_json(self, indent: int | None = 2) -> str:
        """The session as JSON (assistant messages keep their token ids, so ``from_json`` is exact)."""
        messages = [
            dict(as_dict(m), **({"token_ids": list(m.ids)} if m.ids is not None else {})) for m in self._messages
        ]
        return json.dumps(
            {"format": _FORMAT, "model": self.lm.name, "system": self.system, "messages": messages},
            indent=indent,
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, lm: ModelHandle, text: str, **kwargs: Any) -> Chat:
        """A session from ``to_json`` output; ``kwargs`` as for ``Chat``.

        Raises:
            ValueError: ``text`` is not such a document (malformed, wrong types, too deeply nested).
        """
        if not isinstance(text, (str, bytes, bytearray)):
            raise ValueError(f"from_json: expected a JSON string from Chat.to_json, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(
                f"from_json: expected a JSON document from Chat.to_json, got invalid JSON ({str(err)[:80]})"
            ) from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"from_json: expected a {_FORMAT} document")
        system, messages = data.get("system"), data.get("messages") or []
        if system is not None and not isinstance(system, str):
            raise ValueError(f"from_json: expected system as a string or null, got {type(system).__name__}")
        try:
            return cls(lm, system, history=messages, **kwargs)
        except TypeError as err:
            raise ValueError(f"from_json: {err}") from None

    def to_markdown(self) -> str:
        """The conversation as Markdown, one section per message."""
        parts = [f"**System:** {self.system}"] if self.system else []
        parts += [
            f"### {m.role.capitalize()}\n\n" + (f"*[{len(m.images)} image(s)]*\n\n" if m.images else "") + m.content
            for m in self._messages
        ]
        return "\n\n".join(parts) + "\n"

    # -- internals -----------------------------------------------------------------
    def _start(self, base: list[Message], user: Message, overrides: dict[str, Any]) -> ChatReply:
        check_options(self.lm, overrides)
        options = {**self.settings, **overrides}
        start, prompt = self._fit(base, user, options["max_tokens"])
        if options.get("progress") is None and self.progress:
            options["progress"] = progress_bar(min_total=512)
        request = make_request(self.lm, prompt, **options)
        reply = ChatReply(self, TokenStream(self.lm, request, self.cache), base, user, len(self.cache.ids), start)
        self._pending = reply
        return reply

    def _fit(self, base: list[Message], user: Message, max_tokens: int) -> tuple[int, Prompt]:
        """Leave out the oldest exchanges when the prompt leaves no room for a reply; (messages left out, prompt).

        Once over the budget, exchanges go until the prompt is half of it: the
        prompt's start then stays put for the next turns, so they reuse the cache
        (dropping one exchange a turn would change the prefix, and re-run it, every turn).
        """
        limits = [n for n in (self.lm.context_length, self.cache.max_kv_size) if n]
        start = min(self._start_at, len(base))
        prompt = self._encode(base[start:] + [user], generation=True)
        if limits:
            budget = min(limits) - min(max_tokens, min(limits) // 4)
            target = budget if len(prompt) <= budget else budget // 2
            while start < len(base) and len(prompt) > target:
                start += 2  # whole exchanges, so the prompt still starts with a user turn
                prompt = self._encode(base[start:] + [user], generation=True)
        return start, prompt

    def _encode(self, messages: list[Message], generation: bool) -> Prompt:
        ids = self._renderer.ids(self.system, messages, generation)
        images = [image for m in messages for image in m.images]
        return replace(self.lm.encode(ids, images=images or None), continuation=False)

    def _settle(self) -> None:
        pending = self._pending
        if pending is not None:
            if not pending._closable_here():
                raise InUseError(
                    "this Chat is in use: a reply is streaming on another thread; wait for it or cancel() it"
                )
            pending.close()
        self._cache_free()

    def _cache_free(self) -> None:
        self.cache.ensure_free()

    def _settle_reply(self, reply: ChatReply, keep: bool) -> None:
        with self._lock:
            if self._pending is reply:
                self._pending = None
            tokens = reply.tokens
            if not keep or not tokens:  # an error, an interrupt, or nothing streamed: no turn
                return
            assistant = self._assistant_message(tokens)
            self._messages = reply._base + [reply._user, assistant]
            self._start_at = max(self._start_at, reply._dropped)
            stats = reply.stats
            self._last = TurnStats(
                **asdict(stats),
                context_tokens=reply._context,
                reuse_rate=stats.cached_tokens / reply._context if reply._context else None,
                finish_reason=reply.finish_reason,
                dropped_messages=reply._dropped,
            )

    def _assistant_message(self, tokens: list[Token]) -> Message:
        """The reply as a message, with its generated ids when they spell its text."""
        content = "".join(t.text for t in tokens)
        ids = [t.id for t in tokens if not t.special]
        exact = same_text(self.lm.decode(ids), content)
        return Message("assistant", content, tuple(ids) if exact else None)

    def _rewind(self) -> None:
        """Trim the cache to what the remaining history shares with it."""
        if not self._messages and self.system is None:
            self.cache.trim_to(0)
            return
        prompt = self._encode(self._messages[self._start_at :], generation=False)
        self.cache.trim_to(self.cache.common_prefix(prompt.ids))
