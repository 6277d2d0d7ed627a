"""Turning token ids and log-probabilities into ``Token`` records.

Shared by the token stream and the stepper: the streaming text (multi-byte
safe, stop strings held back while a partial match is pending) and the
per-token figures (logprob, top alternatives under the model and under the
sampler) from whatever distribution the engine reported.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .distribution import Distribution
from .sampling import SamplingParams
from .tokens import Alternative

__all__ = ["TextAssembler", "describe", "piece_of", "byte_level_text", "token_bytes"]


class TextAssembler:
    """Streaming detokenizer plus stop-string matching.

    ``add(id)`` returns the text that is safe to show now; text that could be
    the start of a stop string is held back until it can be decided.

    mlx-lm's BPE/SentencePiece detokenizers drop the first token's leading
    space, right for a chat reply but wrong for a completion: "The capital of
    France is" continues with " Paris". ``continuation=True`` keeps it.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), continuation: bool = False):
        # A private copy: mlx-lm's wrapper shares one detokenizer per tokenizer.
        self._detok = copy.copy(tokenizer.detokenizer)
        self._detok.reset()
        if continuation and not isinstance(getattr(type(self._detok), "text", None), property):
            # They trim only while their text is empty: start it with one char
            # and move the read offset past it, so it is never shown.
            self._detok.text, self._detok.offset = "\0", 1
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def add(self, token_id: int, text: str | None = None) -> str:
        """The text safe to show after ``token_id`` (``text``: what it adds, when the engine says so)."""
        if text is not None:
            return self._release(text)
        self._detok.add_token(token_id)
        return self._release(self._detok.last_segment)

    def flush(self) -> str:
        """Finish: release everything still held (minus a completed stop string)."""
        self._detok.finalize()
        text = self._release(self._detok.last_segment)
        if not self.stopped:
            text, self._pending = text + self._pending, ""
        return text

    def _release(self, segment: str) -> str:
        if self.stopped:
            return ""
        self._pending += segment
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        hold = self._held_suffix(self._pending)
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best


def piece_of(tokenizer: Any, token_id: int, memo: dict[int, str]) -> str:
    """The token's own text; raw token form when it is a partial UTF-8 byte."""
    piece = memo.get(token_id)
    if piece is None:
        piece = tokenizer.decode([token_id])
        if "\ufffd" in piece:
            piece = _raw_bytes(tokenizer, token_id) or piece
        memo[token_id] = piece
    return piece


def _byte_table() -> dict[str, int]:
    # GPT-2 byte-level BPE maps each byte to a printable character; invert it.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTES = _byte_table()


def _raw_bytes(tokenizer: Any, token_id: int) -> str | None:
    """A partial UTF-8 token shown as escaped bytes, e.g. ``'\\xc3'``."""
    raw = str(tokenizer.convert_ids_to_tokens(token_id))
    if raw.startswith("<0x") and raw.endswith(">"):  # SentencePiece byte fallback
        return raw
    data = _byte_level(raw)
    return None if data is None else data.decode("utf-8", errors="backslashreplace")


def _byte_level(raw: str) -> bytes | None:
    """A byte-level BPE vocabulary entry (``'ĠParis'``) as its bytes; ``None`` when it is not one."""
    return bytes(_BYTES[ch] for ch in raw) if raw and all(ch in _BYTES for ch in raw) else None


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The token's own bytes (a partial UTF-8 character stays partial: ``b'\\xe0'``)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text.encode("utf-8")
    raw = str(tokenizer.convert_ids_to_tokens(token_id))
    if raw.startswith("<0x") and raw.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(raw[3:-1], 16)])
    data = _byte_level(raw)
    return text.encode("utf-8") if data is None else data


def byte_level_text(raw: str) -> str:
    """A vocabulary entry as text: ``'ĠParis'`` (byte-level BPE) or ``'▁Paris'`` (SentencePiece) -> ``' Paris'``.

    For servers that report raw vocabulary entries (mlx_lm.server); other text is returned as it is.
    """
    if "▁" in raw:
        return raw.replace("▁", " ")
    data = _byte_level(raw)
    return raw if data is None else data.decode("utf-8", errors="backslashreplace")


def describe(
    token_id: int,
    dist: Distribution,
    params: SamplingParams,
    k: int,
    tokenizer: Any,
    memo: dict[int, str],
) -> tuple[float | None, float | None, tuple[Alternative, ...]]:
    """Figures for one position.

    Args:
        token_id: The token taken at this position.
        dist: The position's distribution (after processors).
        params: Sampling settings, for the sampler's own distribution.
        k: How many top alternatives to return (0 for none).

    Returns:
        ``(logprob, sampled_prob, top)``. ``sampled_prob`` is ``None`` when
        ``k == 0`` or only the top entries of the distribution are known;
        ``logprob`` is ``None`` when the engine did not report this token.
    """
    import numpy as np

    from .filters import sampled_probs

    # A numpy view of the evaluated vector: indexing it needs no new mlx work,
    # which would queue behind the step the engine has already started.
    lp = dist.numpy()
    if lp is None:  # only the top entries are known (a server's top_logprobs)
        top = tuple(Alternative(i, piece_of(tokenizer, i, memo), v) for i, v in dist.top(k))
        return dist.logprob(token_id), None, top
    if k <= 0:
        return float(lp[token_id]), None, ()
    entries = dist.top(k)
    ids = np.array([i for i, _ in entries] + [token_id])
    probs = sampled_probs(lp, params, ids)
    top = tuple(Alternative(i, piece_of(tokenizer, i, memo), v, float(p)) for (i, v), p in zip(entries, probs[:-1]))
    return float(lp[token_id]), float(probs[-1]), top
