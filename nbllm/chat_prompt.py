"""Chat tokenization: a conversation's token ids as the chat template renders it, replies as generated.

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

__all__ = ["Message", "ChatRenderer", "as_dict", "same_text"]


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
