"""The ``Prompt`` record: a prompt as the model will see it, made once by ``lm.encode``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Prompt", "check_text"]


@dataclass(frozen=True, eq=False)
class Prompt:
    """Token ids plus everything an engine needs to feed them, frozen.

    Build it with ``lm.encode(prompt, system=..., raw=..., images=...)``; every
    generation path (``stream``, ``Stepper``, ``Chat``) takes one as its prompt.

    Attributes:
        ids: The token ids, image placeholders expanded.
        continuation: True when the text continues the prompt (raw text or token
            ids), False when it is a reply after a chat template (a reply's first
            token then loses its leading space, as chat UIs show it).
        embeddings: Merged image+text input embeddings, shape ``(len(ids), hidden)``,
            for vision models; ``None`` for text.
        media: Content hashes of the prompt's images, in order (a cache must not
            reuse one image's keys and values for another).
        positions: Rotary position ids ``(3, len(ids))`` for models with
            multimodal RoPE (Qwen-VL), else ``None``.
        rope_delta: For those models, position minus index of every token after
            the last image (decoding continues from there).
    """

    ids: tuple[int, ...]
    continuation: bool = True
    embeddings: Any = None
    media: tuple[str, ...] = ()
    positions: Any = None
    rope_delta: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    @property
    def chat(self) -> bool:
        """Whether the prompt went through a chat template (the reply starts fresh)."""
        return not self.continuation

    def tail(self, n: int) -> Prompt:
        """The last ``n`` tokens only (a left-truncated prompt); refused when images would be cut."""
        if n >= len(self.ids):
            return self
        if self.media:
            raise ValueError(f"prompt: cannot truncate a prompt with images to {n} tokens; shorten the text instead")
        return replace(self, ids=self.ids[len(self.ids) - n :])

    def __repr__(self) -> str:
        extra = f", {len(self.media)} image(s)" if self.media else ""
        kind = "continuation" if self.continuation else "chat"
        return f"Prompt({len(self.ids)} tokens, {kind}{extra})"

    @staticmethod
    def of(ids: Sequence[int], continuation: bool = True) -> Prompt:
        """A text prompt from token ids (already validated)."""
        return Prompt(tuple(int(t) for t in ids), continuation)


def check_text(text: Any, where: str) -> str:
    """``text`` if it is a str the tokenizer can encode; else a ValueError naming the position."""
    if not isinstance(text, str):
        raise TypeError(f"{where}: expected a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}: character {err.start} ({text[err.start]!r}) cannot be encoded "
            "(a lone surrogate?); expected valid Unicode text"
        ) from None
    return text
