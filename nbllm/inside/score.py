"""Surprise: how likely the model finds a *given* text, token by token (teacher forcing, no sampling)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..decode import TextAssembler, piece_of
from ..prompt import Prompt
from ..tokens import Alternative, Token
from .run import forward, needs_local
from .stats import position_stats

__all__ = ["Scored", "score"]


@dataclass(frozen=True, eq=False)
class Scored(Sequence[Token]):
    """The scored tokens of a text: a sequence of ``Token`` records with ``rank`` and ``entropy``.

    Attributes:
        tokens: One record per scored token (every token after the first): its
            ``logprob`` given what came before, ``rank`` (0 = the model's top
            choice), ``entropy`` of the model's distribution there, and ``top``.
        prompt: The encoded text.
        roles: Per scored token, the role of the chat message it belongs to
            (``"user"``, ``"assistant"``, ...), or ``None`` outside messages / for plain text.
    """

    tokens: tuple[Token, ...]
    prompt: Prompt
    roles: tuple[str | None, ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: Any) -> Any:
        return self.tokens[i]

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood per token."""
        return math.exp(-sum(t.logprob for t in self.tokens) / max(len(self.tokens), 1))

    def surprising(self, n: int = 5, role: str | None = None) -> list[Token]:
        """The ``n`` least likely tokens (of one role's messages, e.g. ``"assistant"``)."""
        pool = [t for t, r in zip(self.tokens, self.roles or [None] * len(self.tokens)) if role is None or r == role]
        return sorted(pool, key=lambda t: t.logprob)[:n]


def score(
    lm: Any, text: Any, *, top_k: int = 5, chunk: int = 512, raw: bool = True, system: str | None = None
) -> Scored:
    """Score a given text (or a chat transcript) under ``lm``.

    Args:
        lm: A loaded (local MLX) model.
        text: Text (``raw=True``: as it is), chat messages (rendered with the chat
            template; each token is attributed to its message's role), token ids or a ``Prompt``.
        top_k: Alternatives attached to each token.
        chunk: Tokens fed per forward pass (long texts stream through a KV cache).
        raw: For text: no chat template (the default: score the text itself).
        system: System message, for messages.

    Returns:
        ``Scored``: the tokens after the first, each scored given all before it.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk: expected an integer >= 1, got {chunk!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= min(100, lm.vocab_size):
        raise ValueError(f"top_k: expected an integer in [0, {min(100, lm.vocab_size)}], got {top_k!r}")
    needs_local(lm, "scoring a text")
    is_chat = bool(isinstance(text, (list, tuple)) and text and isinstance(text[0], dict))
    if is_chat:  # the transcript as it is: no assistant prompt appended
        lm.encode(text, system=system)  # the checks messages get
        sys_msgs = [{"role": "system", "content": system}] if system is not None else []
        prompt = lm.encode(list(lm.tokenizer.apply_chat_template(sys_msgs + list(text), add_generation_prompt=False)))
    elif isinstance(text, str):
        prompt = lm.encode(text, raw=raw, system=system)
    else:  # token ids or a Prompt
        prompt = lm.encode(text)
    if len(prompt) < 2:
        raise ValueError("text: expected at least two tokens (the first has nothing before it to be scored on)")
    ids = list(prompt.ids)
    figures: list[Any] = []

    def measure(start: int, logits: mx.array) -> None:
        targets = ids[start + 1 : start + 1 + logits.shape[0]]
        if not targets:  # the last position predicts past the text
            return
        got = position_stats(np.asarray(logits[: len(targets)].astype(mx.float32)), np.array(targets), top_k)
        figures.extend(
            zip(
                got.logprob.tolist(),
                got.rank.tolist(),
                got.entropy.tolist(),
                got.top_ids.tolist(),
                got.top_logprobs.tolist(),
            )
        )

    forward(lm, prompt, chunk=chunk, each=measure)
    text_out = TextAssembler(lm.tokenizer, continuation=True)
    text_out.add(ids[0])
    tokens = []
    for n, (token, (logprob, rank, entropy, top_ids, top_lps)) in enumerate(zip(ids[1:], figures)):
        alts = sorted(zip(top_ids, top_lps), key=lambda e: -e[1])
        tokens.append(
            Token(
                id=token,
                text=text_out.add(token),
                piece=piece_of(lm.tokenizer, token, lm.pieces),
                logprob=float(logprob),
                index=n,
                top=tuple(Alternative(int(i), piece_of(lm.tokenizer, int(i), lm.pieces), float(v)) for i, v in alts),
                rank=int(rank),
                entropy=float(entropy),
            )
        )
    roles = _roles(lm, text, system, ids) if is_chat else ()
    return Scored(tuple(tokens), prompt, roles)


def _roles(lm: Any, messages: Any, system: str | None, ids: list[int]) -> tuple[str | None, ...]:
    """Each scored token's message role: render the transcript message by message and see where ids grow."""
    bounds: list[tuple[int, str]] = []
    sys_msgs = [{"role": "system", "content": system}] if system is not None else []
    for k, m in enumerate(messages):
        upto = list(lm.tokenizer.apply_chat_template(sys_msgs + list(messages[: k + 1]), add_generation_prompt=False))
        bounds.append((len(upto), str(m.get("role"))))
    out: list[str | None] = []
    for position in range(1, len(ids)):
        out.append(next((role for end, role in bounds if position < end), None))
    return tuple(out)
