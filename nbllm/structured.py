"""Structured output: a constraint that masks the logits so the text parses.

``make_constraint(lm, schema=...)`` (or ``json=True``, ``regex=``, ``choices=``,
``grammar=``) compiles the request with llguidance (see ``nbllm.grammar``) and
returns a ``Constraint``: a logits processor plus the bookkeeping the token
stream and the stepper need (which steps were forced, how much probability
the mask removed, rollback for ``back()``, copies for branches).

The mask is applied with plain ``mx.where``, so it runs on CPU and Metal alike
(outlines' MLX path calls a Metal-only kernel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx

from .grammar import OutputSpec, compile_matcher, ll_tokenizer, output_spec

if TYPE_CHECKING:
    import numpy as np

    from .tokens import Completion

__all__ = ["Constraint", "StructuredOutputError", "make_constraint"]


class StructuredOutputError(ValueError):
    """The output did not complete the constraint (e.g. ``max_tokens`` ran out).

    Attributes:
        partial_text: The text generated so far (not valid output).
        finish_reason: Why generation ended (``length``, ``cancelled``...).
    """

    def __init__(self, message: str, partial_text: str, finish_reason: str | None = None):
        super().__init__(message)
        self.partial_text = partial_text
        self.finish_reason = finish_reason


def make_constraint(
    lm: Any,
    *,
    schema: Any = None,
    json: bool | None = None,
    regex: str | None = None,
    choices: Sequence[str] | None = None,
    grammar: str | None = None,
) -> Constraint:
    """Compile a structured-output request for ``lm``'s tokenizer.

    Give exactly one of:

    Args:
        lm: The model (anything with mlx-lm's ``tokenizer``) the mask is built for.
        schema: A Pydantic model class (value: an instance), a JSON Schema dict
            or JSON string (value: the parsed object), or any type Pydantic can
            describe such as ``list[int]``.
        json: ``True`` for any JSON object (value: a dict).
        regex: A regular expression the whole output must match (value: the text).
        choices: Strings; the output is exactly one of them (value: that string).
        grammar: A context-free grammar in Lark syntax, as llguidance and
            outlines accept it, or GBNF (value: the text).

    Returns:
        A fresh ``Constraint`` (compiled grammars are cached per tokenizer).

    Raises:
        ValueError: Invalid schema, regex or grammar; TypeError: wrong argument type.
    """
    spec = output_spec(schema=schema, json=json, regex=regex, choices=choices, grammar=grammar)
    matcher = compile_matcher(spec, lm.tokenizer)
    return Constraint(spec, matcher, ll_tokenizer(lm.tokenizer).vocab_size, sorted(lm.tokenizer.eos_token_ids))


class Constraint:
    """A compiled output constraint, stateful per generation.

    ``processor(tokens, logits)`` is a logits processor for mlx-lm's loop and
    the stepper. Its first call after ``reset()`` sees the prompt; each later
    call sees one more token (the one chosen at the previous step), which it
    feeds to the grammar before masking the next step. A call with no new token
    (after ``rollback``) just recomputes the mask. Once the output is complete,
    only EOS is allowed, so generation ends with ``finish_reason="stop"``.

    Attributes:
        spec: What was asked for (kind, grammar, parser, label).
        processor: The logits processor (bound to this constraint's state).
    """

    def __init__(self, spec: OutputSpec, matcher: Any, grammar_vocab: int, eos_ids: Sequence[int]):
        self.spec = spec
        self._matcher = matcher
        # The tokenizer's size; the mask is cut or padded to the logits' (models often pad the output layer).
        self._grammar_vocab = grammar_vocab
        self._eos = list(eos_ids)
        import numpy as np  # here and below: keeps `import nbllm` fast

        self._words = np.zeros((grammar_vocab + 31) // 32, dtype=np.int32)  # llguidance's bitmask
        self._base: int | None = None
        self._consumed = 0
        self._steps: list[_Step] = []  # one per generated position
        self.processor = self._process

    def __repr__(self) -> str:
        return f"Constraint({self.spec.label}, {self._consumed} tokens in, complete={self.is_complete})"

    # -- protocol used by stream() and Stepper ------------------------------
    def reset(self) -> None:
        """Back to the start of the output (the next processor call sees the prompt)."""
        self._matcher.reset()
        self._base = None
        self._consumed = 0
        self._steps.clear()

    def fresh(self) -> Constraint:
        """A new constraint for the same spec, at the start of the output (one per generation)."""
        return Constraint(self.spec, self._matcher.deep_copy(), self._grammar_vocab, self._eos)._reset()

    def _reset(self) -> Constraint:
        self.reset()
        return self

    @property
    def consumed(self) -> int:
        """Generated tokens the grammar has taken so far."""
        return self._consumed

    def was_forced(self, n: int) -> bool:
        """Whether step ``n`` (0-based) allowed exactly one token."""
        return 0 <= n < len(self._steps) and self._steps[n].allowed == 1

    def allowed_count(self, n: int) -> int | None:
        """How many tokens the mask allowed at step ``n`` (None if not computed)."""
        return self._steps[n].allowed if 0 <= n < len(self._steps) else None

    def masked_prob(self, n: int) -> float | None:
        """Model probability the mask removed at step ``n`` (0 = the model agreed anyway).

        Computed on first request from that step's logits, which are kept for
        the last few steps only (``None`` for older ones never asked about).
        """
        if not 0 <= n < len(self._steps):
            return None
        return self._steps[n].removed()

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` generated tokens (for ``Stepper.back``).

        A final EOS never reaches the grammar, so ``n`` may exceed what was
        consumed by one; the next processor call re-feeds any token rolled back
        too far from the history it is shown.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"rollback: expected an integer >= 0, got {n!r}")
        self._rewind(min(n, self._consumed))

    def _rewind(self, n: int) -> None:
        if n and not self._matcher.rollback(n):
            raise RuntimeError(f"rollback: llguidance could not roll back {n} tokens: {self._matcher.get_error()}")
        self._consumed -= n

    def copy(self) -> Constraint:
        """An independent copy in the same state (for ``Stepper.branch``)."""
        twin = Constraint(self.spec, self._matcher.deep_copy(), self._grammar_vocab, self._eos)
        twin._base, twin._consumed = self._base, self._consumed
        twin._steps = [_Step(st.allowed, st.removed()) for st in self._steps]
        return twin

    def finish(self, completion: Completion) -> Any:
        """Check that the generated tokens complete the constraint and parse the text.

        Raises:
            StructuredOutputError: The output is incomplete (e.g. ``max_tokens``
                ran out) or does not parse; ``partial_text`` holds the text.
        """
        ids = [t.id for t in completion.tokens if not t.special]
        replay = self._matcher.deep_copy()
        replay.reset()
        reason = completion.finish_reason
        if not replay.consume_tokens(ids) or not replay.is_accepting():
            hint = " (raise max_tokens)" if reason == "length" else ""
            raise StructuredOutputError(
                f"output for {self.spec.label} is incomplete after {len(ids)} tokens "
                f"(finish_reason {reason!r}){hint}; partial text: {_clip(completion.text)!r}",
                completion.text,
                reason,
            )
        try:
            return self.spec.parse(completion.text)
        except ValueError as e:
            raise StructuredOutputError(
                f"output for {self.spec.label} does not parse: {e}", completion.text, reason
            ) from None

    @property
    def is_complete(self) -> bool:
        """Whether the tokens consumed so far form a complete output."""
        return bool(self._matcher.is_accepting())

    # -- the logits processor ------------------------------------------------
    def _process(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # Start the forward pass now; the mask is computed while it runs.
        mx.async_eval(logits)
        if self._base is None:
            self._base = len(tokens)
        # Sync with the history: normally one new token (the one chosen at the
        # previous step); none or fewer after a rollback.
        position = len(tokens) - self._base
        if position < 0:
            raise RuntimeError("constraint out of step: history is shorter than the prompt it first saw; call reset()")
        if position < self._consumed:
            self._rewind(self._consumed - position)
        elif position > self._consumed:
            for token in cast(list, tokens[self._base + self._consumed :].tolist()):
                self._consume(int(token))
        bits, allowed = self._mask(logits.shape[-1])
        del self._steps[self._consumed :]
        for old in self._steps[-_KEEP_LOGITS : -_KEEP_LOGITS + 1]:
            old.release()
        self._steps.append(_Step(allowed, logits=logits, bits=bits))
        # mx.where, not a Metal kernel: the same code runs on CPU and GPU.
        return mx.where(mx.array(bits), logits, -mx.inf)

    def _consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ValueError(
                f"constraint: token {token} is not allowed here by {self.spec.label} ({self._matcher.get_error()})"
            )
        self._consumed += 1

    def _mask(self, size: int) -> tuple[np.ndarray, int]:
        """The allowed tokens as a bool vector of the logits' length (llguidance's bitmask, unpacked), and their count."""
        import numpy as np

        m = self._matcher
        if m.is_stopped() or m.is_error():
            bits = np.zeros(size, dtype=np.bool_)
        else:
            m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            bits = np.unpackbits(self._words.view(np.uint8), count=size, bitorder="little").view(np.bool_)
        if m.is_stopped() or not bits.any():  # complete (or stuck): only EOS, so generation ends
            bits[[e for e in self._eos if e < size]] = True
        return bits, int(np.count_nonzero(bits))


_KEEP_LOGITS = 4  # steps whose logits stay referenced for masked_prob (stream() asks one step behind)


class _Step:
    """What the mask did at one position: how many tokens it allowed, how much probability it removed."""

    __slots__ = ("_bits", "_logits", "_removed", "allowed")

    def __init__(
        self, allowed: int, removed: float | None = None, logits: mx.array | None = None, bits: np.ndarray | None = None
    ):
        self.allowed = allowed
        self._removed, self._logits, self._bits = removed, logits, bits

    def removed(self) -> float | None:
        if self._removed is None and self._logits is not None and self._bits is not None:
            # In numpy, on demand: mlx's exp over a 150K vocabulary costs ~1 ms on CPU per token.
            import numpy as np

            x = np.array(self._logits.astype(mx.float32)).reshape(-1)
            e = np.exp(x - x.max())
            kept = e[self._bits].sum(dtype=np.float64) / e.sum(dtype=np.float64)
            self._removed = 0.0 if math.isnan(kept) else min(1.0, max(0.0, 1.0 - float(kept)))
            self.release()
        return self._removed

    def release(self) -> None:
        self._logits = self._bits = None


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
