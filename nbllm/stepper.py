"""Token-at-a-time generation: step, choose, back, branch.

The stepper drives the model itself, one decode step per token, because
``mlx_lm.generate_step`` always computes one token ahead. After each token
it computes the next distribution eagerly, so ``candidates()`` is free and
``back(n)`` costs one decode step: trim the KV cache, feed one token again.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Sequence, cast

import mlx.core as mx

from .decode import TextAssembler, describe, piece_of
from .sampling import LogitsProcessor, SamplingParams, make_processors, make_token_sampler
from .tokens import Alternative, Token

if TYPE_CHECKING:
    from .model import LM

__all__ = ["Stepper"]


class Stepper:
    """Generate one token at a time, with full control over each choice.

    Args:
        lm: A loaded model.
        prompt: Text, chat messages or token ids (as for ``stream``).
        top_logprobs: Alternatives attached to each ``Token`` (default 10).
        system: System message (chat template only).
        raw: Plain completion, no chat template.
        images: Image(s) for a vision model.
        logits_processors: Extra ``processor(tokens, logits) -> logits`` callables.
        constraint: A structured-output constraint (rolled back with ``back``).
        prefill_step_size: Prompt tokens per prefill chunk.
        prompt_cache: A ``PromptCache``: the prompt reuses its longest cached
            prefix and is left in it; the stepper then works on its own copy.
        **options: Sampling settings, as for ``stream`` (default greedy).

    Invariant: after ``back(n)``, greedy ``step()`` calls reproduce exactly the
    tokens that were there.
    """

    def __init__(
        self,
        lm: "LM",
        prompt: Any,
        *,
        top_logprobs: int = 10,
        system: str | None = None,
        raw: bool = False,
        images: Sequence[Any] | Any | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        constraint: Any = None,
        prefill_step_size: int = 2048,
        prompt_cache: Any = None,
        **options: Any,
    ):
        from mlx_lm.models.cache import make_prompt_cache

        from .generate import _as_list, _constraint_from

        self.lm = lm
        self.params = SamplingParams.from_kwargs(options)
        self.constraint = _constraint_from(lm, constraint, options)
        if options:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(options))}")
        if prompt_cache is not None and not hasattr(prompt_cache, "prepare"):
            raise TypeError(f"prompt_cache: expected a PromptCache or None, got {type(prompt_cache).__name__}")
        if not isinstance(top_logprobs, int) or not 1 <= top_logprobs <= min(100, lm.vocab_size):
            raise ValueError(f"top_logprobs: expected an integer in [1, {min(100, lm.vocab_size)}], got {top_logprobs!r}")
        self.top_logprobs = top_logprobs
        self.prompt_ids = lm.encode(prompt, system=system, raw=raw)
        embeddings = lm.prepare_inputs(self.prompt_ids, _as_list(images))
        self._embeddings, self._chunk = embeddings, prefill_step_size  # kept for a cache rebuild
        extra = list(logits_processors or [])
        if self.constraint is not None:
            self.constraint.reset()
            extra.append(self.constraint.processor)
        self._procs = make_processors(self.params, lm.tokenizer, lm.vocab_size, extra=extra)
        self._sampler = make_token_sampler(self.params)
        self._eos = lm.tokenizer.eos_token_ids
        self.tokens: list[Token] = []
        self.finish_reason: str | None = None
        if prompt_cache is None:
            self._cache = make_prompt_cache(lm.model)
            self._prefill(self.prompt_ids, embeddings, prefill_step_size)
        else:
            self._cache, reused = prompt_cache.prepare(self.prompt_ids, lm.media_key(self.prompt_ids))
            try:
                emb = embeddings[reused:] if embeddings is not None else None
                self._prefill(self.prompt_ids[reused:], emb, prefill_step_size)
            finally:
                prompt_cache.commit(self.prompt_ids)
            # back()/branch() move this cache; the shared one keeps the prompt.
            self._cache = copy.deepcopy(self._cache)
        self._continuation = not lm.is_chat(prompt, raw)
        self._text = TextAssembler(lm.tokenizer, continuation=self._continuation)
        self.text = ""

    # -- state ---------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """Prompt ids followed by the generated ids."""
        return self.prompt_ids + [t.id for t in self.tokens]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def candidates(self, k: int | None = None) -> tuple[Alternative, ...]:
        """The ``k`` most likely next tokens (model and sampler probabilities)."""
        self._check_open()
        _, _, top = describe(0, self._logprobs, self.params, k or self.top_logprobs, self.lm.tokenizer, self.lm.pieces)
        return top

    @property
    def logprobs(self) -> mx.array:
        """The full next-token log-distribution, after processors, shape ``(vocab,)``."""
        return self._logprobs

    # -- moves ---------------------------------------------------------------
    def step(self) -> Token:
        """Sample the next token with the stepper's settings and return it."""
        self._check_open()
        if self.params.seed is not None:
            # Seed per position: reproducible across steppers, after back(), and in branches.
            mx.random.seed((self.params.seed * 1_000_003 + len(self.ids)) % 2**32)
        token_id = int(cast(int, self._sampler(self._logprobs[None]).item()))
        return self._take(token_id)

    def choose(self, token: int | str) -> Token:
        """Take ``token`` (an id, or text that is exactly one token) instead of sampling."""
        self._check_open()
        if isinstance(token, str):
            ids = self.lm.tokenizer.encode(token, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"choose: expected text that is one token, {token!r} encodes to {len(ids)} tokens {ids}")
            token = ids[0]
        if not isinstance(token, int) or not 0 <= token < self.lm.vocab_size:
            raise ValueError(f"choose: expected a token id in [0, {self.lm.vocab_size}) or one token of text, got {token!r}")
        if self.constraint is not None and not cast(float, self._logprobs[token].item()) > -float("inf"):
            raise ValueError(f"choose: token {token} ({piece_of(self.lm.tokenizer, token, self.lm.pieces)!r}) is not allowed by the constraint here")
        return self._take(token)

    def back(self, n: int = 1) -> None:
        """Undo the last ``n`` tokens: trim the KV cache and recompute one step."""
        if not isinstance(n, int) or not 0 <= n <= len(self.tokens):
            raise ValueError(f"back: expected an integer in [0, {len(self.tokens)}], got {n!r}")
        if n == 0:
            return
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        keep = len(self.tokens) - n
        del self.tokens[keep:]
        self.finish_reason = None
        if self.constraint is not None:
            self.constraint.rollback(n)
        ids = self.ids
        if can_trim_prompt_cache(self._cache):
            # The cache must cover ids[:-1]; feeding ids[-1] gives the next distribution.
            trim_prompt_cache(self._cache, self._cache[0].offset - (len(ids) - 1))
            self._forward(ids[-1:])
        else:  # e.g. a rotating cache past its window: rebuild from scratch
            from mlx_lm.models.cache import make_prompt_cache

            self._cache = make_prompt_cache(self.lm.model)
            generated = ids[len(self.prompt_ids) :]
            if generated:
                self._feed(self.prompt_ids, self._embeddings, self._chunk)
                self._prefill(generated, None, self._chunk)
            else:
                self._prefill(self.prompt_ids, self._embeddings, self._chunk)
        self._retext()

    def reset(self) -> None:
        """Back to the prompt."""
        self.back(len(self.tokens))

    def branch(self) -> "Stepper":
        """An independent copy: steps on either one do not affect the other."""
        twin = copy.copy(self)
        twin._cache = copy.deepcopy(self._cache)
        twin.tokens = list(self.tokens)
        if self.constraint is not None:
            twin.constraint = self.constraint.copy()
            twin._procs = [twin.constraint.processor if p is self.constraint.processor else p for p in self._procs]
        twin._retext()
        return twin

    # -- internals -----------------------------------------------------------
    def _check_open(self) -> None:
        if self.finish_reason is not None:
            raise RuntimeError(f"generation has finished ({self.finish_reason}); call back() or reset() to continue")

    def _take(self, token_id: int) -> Token:
        current, index = self._logprobs, len(self.tokens)
        forced = bool(mx.sum(current > -mx.inf).item() == 1) if self.constraint is not None else False
        masked = self.constraint.masked_prob(index) if self.constraint is not None else None
        is_eos = token_id in self._eos
        if not is_eos:
            # Start the next decode step first; the records below are built while it runs.
            self._forward([token_id], history=self.ids + [token_id])
        logprob, sampled_prob, top = describe(token_id, current, self.params, self.top_logprobs, self.lm.tokenizer, self.lm.pieces)
        text = self._text.flush() if is_eos else self._text.add(token_id)
        token = Token(
            id=token_id, text=text, piece=piece_of(self.lm.tokenizer, token_id, self.lm.pieces), logprob=logprob,
            index=index, top=top, sampled_prob=sampled_prob, forced=forced, special=is_eos,
            finish_reason="stop" if is_eos else None, masked_prob=masked,
        )
        self.tokens.append(token)
        self.text += text
        if is_eos:
            self.finish_reason = "stop"
        return token

    def _prefill(self, ids: list[int], embeddings: mx.array | None, chunk: int) -> None:
        # Same schedule as mlx_lm.generate_step (all but the last token in
        # chunks, then the last alone), so greedy output matches it exactly.
        self._feed(ids[:-1], embeddings[:-1] if embeddings is not None else None, chunk)
        self._forward(ids[-1:], embeddings[-1:] if embeddings is not None else None)

    def _feed(self, ids: list[int], embeddings: mx.array | None, chunk: int) -> None:
        """Run ``ids`` through the model into the cache, in chunks, keeping no logits."""
        for start in range(0, len(ids), chunk):
            emb = embeddings[start : start + chunk] if embeddings is not None else None
            self._call(ids[start : start + chunk], emb)
            mx.eval([c.state for c in self._cache])

    def _call(self, ids: list[int], embeddings: mx.array | None) -> mx.array:
        if embeddings is not None:
            return self.lm.model(mx.array(ids)[None], cache=self._cache, input_embeddings=embeddings[None])
        return self.lm.model(mx.array(ids)[None], cache=self._cache)

    def _forward(self, ids: list[int], embeddings: mx.array | None = None, history: list[int] | None = None) -> None:
        """Feed ``ids``; the next distribution is computed in the background (read it to wait)."""
        logits = self._call(ids, embeddings)[:, -1, :]
        if self._procs:
            context = mx.array(self.ids if history is None else history)
            for proc in self._procs:
                logits = proc(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self._logprobs = logprobs[0]
        mx.async_eval(self._logprobs)

    def _retext(self) -> None:
        self._text = TextAssembler(self.lm.tokenizer, continuation=self._continuation)
        self.text = ""
        for t in self.tokens:
            self.text += self._text.flush() if t.special else self._text.add(t.id)
