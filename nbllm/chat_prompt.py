"""Chat messages: parsing a history, and tokenization of a conversation as the chat template renders it.

Re-tokenizing a reply's text does not always give back the tokens the model
generated (BPE merges across what were separate steps), and then the cache
built while generating it would not match the next turn's prompt. So each
assistant turn goes back in as its generated ids, with the template's text
around it tokenized as usual. Where the template renders an earlier turn
differently on a later turn (some strip reasoning, or trim whitespace), the
text from there on is tokenized plainly and the cache is reused up to that
point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .prompt import check_text

__all__ = ["Message", "ChatRenderer", "as_dict", "same_text", "check_message", "parse_history"]


@dataclass(frozen=True)
class Message:
    """One finished chat message.

    Attributes:
        role: ``user`` or ``assistant``.
        content: Its text.
        ids: An assistant reply's generated tokens (end-of-sequence excluded), when they spell ``content``.
        images: A user message's images (vision models), shown before its text.
    """

    role: str
    content: str
    ids: tuple[int, ...] | None = None
    images: tuple[Any, ...] = ()


class ChatRenderer:
    """Token ids of a conversation, remembering the turns it has already tokenized.

    The ids are a pure function of (system, messages); the checkpoint only
    saves re-rendering the turns seen on earlier calls.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._checkpoint: tuple[str | None, tuple[Message, ...], str, list[int]] = (None, (), "", [])

    def ids(self, system: str | None, messages: list[Message], generation: bool) -> list[int]:
        """The ids of ``messages`` after ``system``; with ``generation``, the assistant prompt follows."""
        full = self.render(system, messages, generation)
        sys_seen, seen, text, ids = self._checkpoint
        start = len(seen)
        if (
            sys_seen != system
            or start > len(messages)
            or any(a is not b for a, b in zip(seen, messages))
            or not full.startswith(text)
        ):
            start, text, ids = 0, "", []
        for k in range(start, len(messages)):
            m = messages[k]
            if m.role != "assistant" or m.ids is None:
                continue
            before = self.render(system, messages[:k], True)
            if not before.startswith(text) or not full.startswith(before + m.content):
                break  # the template re-renders this turn differently: plain text from here
            ids = ids + self._encode(before[len(text) :]) + list(m.ids)
            text = before + m.content
            self._checkpoint = (system, tuple(messages[: k + 1]), text, ids)
        return ids + self._encode(full[len(text) :])

    def render(self, system: str | None, messages: list[Message], generation: bool) -> str:
        """The template's text for ``messages``."""
        dicts = ([{"role": "system", "content": system}] if system is not None else []) + [
            _template_dict(m) for m in messages
        ]
        return str(self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []


def same_text(decoded: str, content: str) -> bool:
    """Whether generated ids decode to a reply's text (mlx-lm's detokenizer drops one leading space)."""
    return decoded == content or (decoded[:1] == " " and decoded[1:] == content)


def as_dict(m: Message) -> dict[str, Any]:
    return {"role": m.role, "content": m.content}


def _template_dict(m: Message) -> dict[str, Any]:
    # Image parts make the template emit one marker per image; encoding with images expands them.
    if not m.images:
        return as_dict(m)
    return {"role": m.role, "content": [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.content}]}


def check_message(text: Any, where: str) -> None:
    """A chat message: non-empty text the tokenizer can encode."""
    check_text(text, where)
    if not text.strip():
        raise ValueError(f"{where}: expected a non-empty message, got {text!r}")


def parse_history(history: Any, lm: Any) -> list[Message]:
    """``{"role", "content"}`` dicts (user/assistant alternating, assistant ``token_ids`` optional) as messages.

    Raises:
        ValueError: Anything else (wrong types, roles out of turn, ids outside the vocabulary).
    """
    if not isinstance(history, list):
        raise ValueError(f"history: expected a list of message dicts, got {type(history).__name__}")
    out: list[Message] = []
    for i, m in enumerate(history):
        role = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != role or not isinstance(m.get("content"), str):
            raise ValueError(
                f"history[{i}]: expected {{'role': '{role}', 'content': str}} (user/assistant alternating), got {m!r:.80}"
            )
        check_text(m["content"], f"history[{i}]")
        ids = m.get("token_ids")
        if ids is not None and (
            role != "assistant"
            or not isinstance(ids, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < lm.vocab_size for t in ids)
        ):
            raise ValueError(
                f"history[{i}]: expected token_ids only on assistant messages, as ids in [0, {lm.vocab_size})"
            )
        # Ids from another tokenizer would not spell the text: fall back to the text.
        keep = ids is not None and same_text(lm.decode(ids), m["content"])
        out.append(Message(role, m["content"], tuple(ids) if ids is not None and keep else None))
    if len(out) % 2:
        raise ValueError(f"history: expected complete user/assistant exchanges, got {len(out)} messages")
    return out
