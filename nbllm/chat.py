"""Chat sessions: message history on top of a reused prompt cache.

Each turn's prompt is the chat template's rendering of the history. Assistant
replies go back in as the tokens the model generated (when their text is
unchanged), so the cache built while generating them is reused as is; where
the template renders earlier turns differently, the cache is trimmed to the
common prefix and the turn's ``reuse_rate`` says how much was kept.

Interrupting a reply (``cancel()``, ``close()``, KeyboardInterrupt, or a new
``send()`` before the old reply was read to the end) keeps the text streamed so
far as the assistant's message; a reply interrupted before its first token
leaves the history unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .cache import PromptCache, progress_bar
from .sampling import SamplingParams
from .tokens import Completion, Stats, Token, TurnStats

if TYPE_CHECKING:
    from .generate import TokenStream
    from .model import LM

__all__ = ["Chat", "ChatReply", "TurnStats"]

_FORMAT = "nbllm-chat/1"
_SETTINGS = {"max_tokens", "top_logprobs", "stop", "logits_processors", "prefill_step_size", "constraint",
             "schema", "json", "regex", "choices", "grammar"}


@dataclass(frozen=True)
class _Message:
    role: str
    content: str
    ids: tuple[int, ...] | None = None  # an assistant reply's generated tokens, EOS excluded
    images: tuple[Any, ...] = ()  # a user message's images (vision models), shown before its text


class ChatReply:
    """The streamed reply to one message: iterate it for ``Token`` records.

    When it ends (or is interrupted) the chat's history holds the exchange.
    """

    def __init__(self, chat: "Chat", ts: "TokenStream", base: list[_Message], user: _Message, context: int):
        self._chat, self._ts, self._base, self._user, self._context = chat, ts, base, user, context
        self.tokens: list[Token] = []
        self.done = False

    def __iter__(self) -> "ChatReply":
        return self

    def __next__(self) -> Token:
        if self.done:
            raise StopIteration
        try:
            token = next(self._ts)
        except BaseException:  # StopIteration, KeyboardInterrupt, errors: settle, then re-raise
            self._finish()
            raise
        self.tokens.append(token)
        if token.finish_reason is not None:
            self._finish()
        return token

    @property
    def text(self) -> str:
        """The reply text streamed so far."""
        return "".join(t.text for t in self.tokens)

    @property
    def stats(self) -> Stats:
        return self._ts.stats

    @property
    def prompt_ids(self) -> list[int]:
        return self._ts.prompt_ids

    @property
    def constraint(self) -> Any:
        """The structured-output constraint of this reply, if any."""
        return self._ts.constraint

    @property
    def finish_reason(self) -> str | None:
        if self.tokens and self.tokens[-1].finish_reason:
            return self.tokens[-1].finish_reason
        return "cancelled" if self.done and self.tokens else None

    def cancel(self) -> None:
        """End after the current token (thread-safe); the partial reply is kept."""
        self._ts.cancel()

    def close(self) -> None:
        """Stop now; the text streamed so far is kept as the reply."""
        self._finish()

    def completion(self) -> Completion:
        """Read the reply to the end and return it as a ``Completion``."""
        for _ in self:
            pass
        completion = Completion.from_tokens(self.tokens, self._ts.stats)
        if self.constraint is not None:
            completion.value = self.constraint.finish(completion)
        return completion

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._ts.close()
        self._chat._settle_reply(self)

    def __repr__(self) -> str:
        return f"ChatReply({self.text!r}, finish_reason={self.finish_reason!r})"


class Chat:
    """A conversation with a model, reusing the KV cache from turn to turn.

    An interrupted reply keeps the text streamed so far (nothing, if it was
    interrupted before its first token); ``regenerate()`` redoes it.

    Args:
        lm: A loaded model with a chat template.
        system: System message (kept across ``reset``).
        history: Earlier messages (``{"role", "content"}`` dicts alternating
            user/assistant, e.g. from ``Chat.from_json``; an assistant message may
            carry ``token_ids``).
        prompt_cache: A ``PromptCache`` to use (default: a new one).
        max_kv_size: Bound the new cache (see ``PromptCache``).
        kv_bits: Quantize the new cache (see ``PromptCache``).
        progress: Show a tqdm bar for prefills of at least 512 new tokens.
        **settings: Defaults for every reply: ``max_tokens`` (512), sampling
            settings (``temperature``, ``top_p``, ... as for ``stream``),
            ``top_logprobs``, ``stop``, ``logits_processors``.
    """

    def __init__(self, lm: "LM", system: str | None = None, *, history: list[dict[str, Any]] | None = None,
                 prompt_cache: PromptCache | None = None, max_kv_size: int | None = None, kv_bits: int | None = None,
                 progress: bool = False, **settings: Any):
        if not getattr(lm.tokenizer, "has_chat_template", False):
            raise ValueError(f"Chat: expected a model with a chat template, {lm.name} has none")
        if prompt_cache is not None and (max_kv_size is not None or kv_bits is not None):
            raise ValueError("expected prompt_cache or max_kv_size/kv_bits, got both")
        if prompt_cache is not None and getattr(prompt_cache, "lm", None) is not lm:
            raise ValueError("prompt_cache: expected a PromptCache made for this model")
        settings.setdefault("max_tokens", 512)
        self._check_settings(settings)
        self.lm, self.progress = lm, bool(progress)
        self.system = system
        self.settings = settings
        self.cache = prompt_cache if prompt_cache is not None else PromptCache(lm, max_kv_size=max_kv_size, kv_bits=kv_bits)
        self._messages = self._parse_history(history or [])
        self._pending: ChatReply | None = None
        self._last: TurnStats | None = None
        self._checkpoint: tuple[str | None, tuple[_Message, ...], str, list[int]] = (None, (), "", [])

    @property
    def system(self) -> str | None:
        """The system message (may be changed between turns)."""
        return self._system

    @system.setter
    def system(self, value: str | None) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"system: expected a str or None, got {type(value).__name__}")
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
        _check_text(text, "send")
        pictures = tuple(images) if isinstance(images, (list, tuple)) else (() if images is None else (images,))
        if pictures and not self.lm.is_vision:
            raise ValueError(f"images: {self.lm.name} is a text-only model; load a vision model to use images")
        self._settle()
        return self._start(list(self._messages), _Message("user", text, images=pictures), overrides)

    def regenerate(self, **overrides: Any) -> ChatReply:
        """Answer the last user message again; the new reply replaces the old one when it arrives."""
        self._settle()
        if not self._messages:
            raise IndexError("regenerate: expected a previous exchange, the history is empty")
        return self._start(self._messages[:-2], self._messages[-2], overrides)

    def undo(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Drop the last exchange (user message and reply), rewinding the cache; returns it."""
        self._settle()
        if not self._messages:
            raise IndexError("undo: expected an exchange to drop, the history is empty")
        dropped = self._messages[-2:]
        self._messages = self._messages[:-2]
        self._rewind()
        return _as_dict(dropped[0]), _as_dict(dropped[1])

    def edit(self, i: int, text: str) -> None:
        """Replace the text of message ``i`` of ``history`` (later messages are kept)."""
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"edit: expected an integer index, got {type(i).__name__}")
        _check_text(text, "edit")
        self._settle()
        n = len(self._messages)
        if not -n <= i < n:
            raise IndexError(f"edit: expected an index in [{-n}, {n}), got {i}")
        old = self._messages[i]
        self._messages[i] = _Message(old.role, text, images=old.images)
        self._rewind()

    def reset(self) -> None:
        """Forget the conversation (the system message and its cached tokens stay)."""
        self._settle()
        self._messages = []
        self._rewind()

    # -- views -------------------------------------------------------------------
    @property
    def history(self) -> list[dict[str, Any]]:
        """The finished messages as ``{"role", "content"}`` dicts (system message excluded).

        A user message with images also has ``"images"``: how many.
        """
        return [dict(_as_dict(m), **({"images": len(m.images)} if m.images else {})) for m in self._messages]

    @property
    def last_stats(self) -> TurnStats | None:
        """Figures for the last finished reply, including cache reuse."""
        return self._last

    def __repr__(self) -> str:
        return f"Chat({self.lm.name!r}, {len(self._messages)} messages, {self.cache!r})"

    def to_json(self, indent: int | None = 2) -> str:
        """The session as JSON (assistant messages keep their token ids, so ``from_json`` is exact)."""
        messages = [dict(_as_dict(m), **({"token_ids": list(m.ids)} if m.ids is not None else {})) for m in self._messages]
        return json.dumps({"format": _FORMAT, "model": self.lm.name, "system": self.system, "messages": messages},
                          indent=indent, ensure_ascii=False)

    @classmethod
    def from_json(cls, lm: "LM", text: str, **kwargs: Any) -> "Chat":
        """A session from ``to_json`` output; ``kwargs`` as for ``Chat``."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"from_json: expected a JSON string from Chat.to_json, got {type(text).__name__}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"from_json: expected a {_FORMAT} document")
        return cls(lm, data.get("system"), history=data.get("messages") or [], **kwargs)

    def to_markdown(self) -> str:
        """The conversation as Markdown, one section per message."""
        parts = [f"**System:** {self.system}"] if self.system else []
        parts += [f"### {m.role.capitalize()}\n\n" + (f"*[{len(m.images)} image(s)]*\n\n" if m.images else "") + m.content
                  for m in self._messages]
        return "\n\n".join(parts) + "\n"

    # -- internals -----------------------------------------------------------------
    def _start(self, base: list[_Message], user: _Message, overrides: dict[str, Any]) -> ChatReply:
        from .generate import stream

        self._check_settings(overrides)
        ids = self._prompt_ids(base + [user], generation=True)
        progress = progress_bar(min_total=512) if self.progress else None
        images = [image for m in base + [user] for image in m.images]
        ts = stream(self.lm, ids, prompt_cache=self.cache, progress=progress, images=images or None,
                    **{**self.settings, **overrides})
        self._pending = ChatReply(self, ts, list(base), user, len(self.cache.ids))
        return self._pending

    def _settle(self) -> None:
        if self._pending is not None:
            self._pending.close()
        if self.cache.busy:  # shared with a stream that is still running
            raise RuntimeError("the chat's PromptCache is in use by another stream; finish or close it first")

    def _settle_reply(self, reply: ChatReply) -> None:
        if self._pending is reply:
            self._pending = None
        if not reply.tokens:  # interrupted before the first token: nothing to keep
            return
        content = reply.text
        ids = [t.id for t in reply.tokens if not t.special]
        same = _same_text(self.lm.decode(ids), content)
        self._messages = reply._base + [reply._user, _Message("assistant", content, tuple(ids) if same else None)]
        stats = reply.stats
        self._last = TurnStats(**asdict(stats), context_tokens=reply._context,
                               reuse_rate=stats.cached_tokens / reply._context if reply._context else None,
                               finish_reason=reply.finish_reason)

    def _rewind(self) -> None:
        """Trim the cache to what the remaining history shares with it."""
        ids = self._prompt_ids(self._messages, generation=False) if self._messages or self.system else []
        self.cache.trim_to(self.cache.common_prefix(ids))

    def _prompt_ids(self, msgs: list[_Message], generation: bool) -> list[int]:
        """Token ids of the template's rendering, with assistant turns as generated.

        A pure function of the messages (so a fresh session gives the same ids);
        the checkpoint only saves re-rendering the turns it has already seen.
        """
        full = self._render(msgs, generation)
        system, seen, text, ids = self._checkpoint
        start = len(seen)
        if system != self.system or start > len(msgs) or any(a is not b for a, b in zip(seen, msgs)) or not full.startswith(text):
            start, text, ids = 0, "", []
        for k in range(start, len(msgs)):
            m = msgs[k]
            if m.role != "assistant" or m.ids is None:
                continue
            before = self._render(msgs[:k], True)
            if not before.startswith(text) or not full.startswith(before + m.content):
                break  # the template re-renders this turn differently: plain text from here
            ids = ids + self._encode(before[len(text):]) + list(m.ids)
            text = before + m.content
            self._checkpoint = (self.system, tuple(msgs[: k + 1]), text, ids)
        return ids + self._encode(full[len(text):])

    def _render(self, msgs: list[_Message], generation: bool) -> str:
        dicts = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [_template_dict(m) for m in msgs]
        return str(self.lm.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation))

    def _encode(self, text: str) -> list[int]:
        return list(self.lm.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _parse_history(self, history: Any) -> list[_Message]:
        if not isinstance(history, list):
            raise TypeError(f"history: expected a list of message dicts, got {type(history).__name__}")
        out: list[_Message] = []
        for i, m in enumerate(history):
            role = "user" if i % 2 == 0 else "assistant"
            if not isinstance(m, dict) or m.get("role") != role or not isinstance(m.get("content"), str):
                raise ValueError(f"history[{i}]: expected {{'role': '{role}', 'content': str}} (user/assistant alternating), got {m!r:.80}")
            ids = m.get("token_ids")
            if ids is not None and (role != "assistant" or not isinstance(ids, list)
                                    or not all(isinstance(t, int) and 0 <= t < self.lm.vocab_size for t in ids)):
                raise ValueError(f"history[{i}]: expected token_ids only on assistant messages, as ids in [0, {self.lm.vocab_size})")
            # Ids from another tokenizer would not spell the text: fall back to the text.
            keep = ids is not None and _same_text(self.lm.decode(ids), m["content"])
            out.append(_Message(role, m["content"], tuple(ids) if ids is not None and keep else None))
        if len(out) % 2:
            raise ValueError(f"history: expected complete user/assistant exchanges, got {len(out)} messages")
        return out

    @staticmethod
    def _check_settings(settings: dict[str, Any]) -> None:
        rest = dict(settings)
        SamplingParams.from_kwargs(rest)
        if set(rest) - _SETTINGS:
            raise TypeError(f"unexpected setting(s): {', '.join(sorted(set(rest) - _SETTINGS))}")


def _same_text(decoded: str, content: str) -> bool:
    # mlx-lm's streaming detokenizer drops one leading space of a reply.
    return decoded == content or (decoded[:1] == " " and decoded[1:] == content)


def _as_dict(m: _Message) -> dict[str, Any]:
    return {"role": m.role, "content": m.content}


def _template_dict(m: _Message) -> dict[str, Any]:
    # Image parts make the template emit one marker per image; prepare_inputs expands them.
    if not m.images:
        return _as_dict(m)
    return {"role": m.role, "content": [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.content}]}


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{where}: expected a str message, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: expected a non-empty message, got {text!r}")
