"""Token-at-a-time generation: step, choose, back, branch.

The stepper drives an engine run one token at a time (``Run.advance``): after
each token the next distribution is computed eagerly, so ``candidates()`` is
free, and ``back(n)`` costs one decode step (trim the KV cache, feed one token
again). The run is the record of positions; the stepper's tokens are checked
against it at every move, so an interrupt anywhere in a move cannot leave the
two out of step.
"""

from __future__ import annotations

import copy
from typing import Any

from .decode import TextAssembler, describe, piece_of
from .distribution import Distribution
from .engine import ModelHandle, Request, Step
from .request import TOP_LOGPROBS_MAX, make_request
from .tokens import Alternative, Token

__all__ = ["Stepper"]


class Stepper:
    """Generate one token at a time, with full control over each choice.

    Args:
        lm: A loaded model.
        prompt: Text, chat messages, token ids or a ``Prompt`` (as for ``stream``);
            or a ``Request`` from ``nbllm.request.make_request`` (then no other arguments).
        top_logprobs: Alternatives attached to each ``Token`` (default 10).
        prompt_cache: A ``PromptCache``: the prompt reuses its longest cached
            prefix and is left in it; the stepper then works on its own copy.
        **kwargs: As for ``stream`` (``system``, ``raw``, ``images``,
            ``logits_processors``, a constraint, ``prefill_step_size``,
            ``progress``, ``truncate`` and the sampling settings; default greedy).

    Invariant: after ``back(n)``, greedy ``step()`` calls reproduce exactly the
    tokens that were there.
    """

    def __init__(
        self, lm: ModelHandle, prompt: Any, *, top_logprobs: int = 10, prompt_cache: Any = None, **kwargs: Any
    ):
        if prompt_cache is not None and not hasattr(prompt_cache, "prepare"):
            raise TypeError(f"prompt_cache: expected a PromptCache or None, got {type(prompt_cache).__name__}")
        if prompt_cache is not None and getattr(prompt_cache, "lm", lm) is not lm:
            raise ValueError("prompt_cache: expected a PromptCache made for this model, got one made for another")
        limit = min(TOP_LOGPROBS_MAX, lm.vocab_size)
        if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or not 1 <= top_logprobs <= limit:
            raise ValueError(f"top_logprobs: expected an integer in [1, {limit}], got {top_logprobs!r}")
        for name in ("max_tokens", "stop"):
            if name in kwargs:
                raise TypeError(f"unexpected argument {name!r}: a stepper takes one token per call")
        if isinstance(prompt, Request):  # already built (and validated) by make_request
            if kwargs:
                raise TypeError(f"unexpected argument(s) with a Request: {', '.join(sorted(kwargs))}")
            self.request = prompt
        else:
            self.request = make_request(lm, prompt, top_logprobs=top_logprobs, **kwargs)
        self.lm = lm
        self.source = prompt if isinstance(prompt, str) else None  # the text, when the prompt was made from text
        self._options = dict(kwargs, top_logprobs=top_logprobs)
        self.prompt = self.request.prompt
        self.params = self.request.params
        self.top_logprobs = self.request.top_logprobs or top_logprobs
        self._run: Any = lm.engine.start(self.request, prompt_cache)
        self._run.prefill()
        self.constraint = self._run.constraint
        self.tokens: list[Token] = []
        self._text = TextAssembler(lm.tokenizer, continuation=self.prompt.continuation)

    # -- state ---------------------------------------------------------------
    @property
    def prompt_ids(self) -> list[int]:
        return list(self.prompt.ids)

    @property
    def ids(self) -> list[int]:
        """Prompt ids followed by the generated ids."""
        return list(self.prompt.ids) + [t.id for t in self.tokens]

    @property
    def text(self) -> str:
        """The generated text so far."""
        return "".join(t.text for t in self.tokens)

    @property
    def finish_reason(self) -> str | None:
        """``stop`` once an end-of-sequence token was taken, else ``None``."""
        return self.tokens[-1].finish_reason if self.tokens else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def distribution(self) -> Distribution:
        """The next position's distribution (after processors and constraint); once done, the last one's."""
        self._sync()
        return self._run.distribution()

    @property
    def logprobs(self) -> Any:
        """The full next-token log-distribution (an ``mx.array`` of shape ``(vocab,)``)."""
        return self.distribution.source

    @property
    def prompt_kind(self) -> str:
        """How the prompt reached the model: ``"chat template"`` or ``"raw continuation"``."""
        return "chat template" if self.prompt.chat else "raw continuation"

    def reprompt(self, *, raw: bool) -> Stepper:
        """A new stepper on the same text with or without the chat template (a system message needs the template).

        Raises:
            ValueError: The stepper was not made from text, or the model has no chat template.
        """
        if self.source is None:
            raise ValueError("reprompt: expected a stepper made from text, this one was made from ids or messages")
        if not raw and not getattr(self.lm.tokenizer, "has_chat_template", False):
            raise ValueError(f"reprompt: {self.lm.name} has no chat template")
        options = dict(self._options, raw=raw)
        if raw:
            options.pop("system", None)
        return Stepper(self.lm, self.source, **options)

    def candidates(self, k: int | None = None) -> tuple[Alternative, ...]:
        """The ``k`` most likely next tokens (model and sampler probabilities)."""
        _, _, top = describe(
            0, self.distribution, self.params, k or self.top_logprobs, self.lm.tokenizer, self.lm.pieces
        )
        return top

    # -- moves ---------------------------------------------------------------
    def step(self) -> Token:
        """Sample the next token with the stepper's settings and take it."""
        self._sync()
        self._check_open()
        return self._take(self._run.sample())

    def choose(self, token: int | str) -> Token:
        """Take ``token`` (an id, or text) instead of sampling; returns the last token taken.

        Text that is several tokens takes them one after another (all or none:
        if the constraint refuses one, the ones before it are undone).
        """
        self._sync()
        self._check_open()
        ids = self._token_ids(token)
        taken = 0
        try:
            for i in ids:
                self._check_allowed(i)
                last = self._take(i)
                taken += 1
                if self.done and taken < len(ids):
                    raise ValueError(f"choose: {token!r} ends generation after {taken} of its {len(ids)} tokens")
        except BaseException:
            if taken:
                self.back(taken)
            raise
        return last

    def back(self, n: int = 1) -> None:
        """Undo the last ``n`` tokens: trim the KV cache and recompute one step."""
        self._sync()
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(self.tokens):
            raise ValueError(f"back: expected an integer in [0, {len(self.tokens)}], got {n!r}")
        if n == 0:
            return
        self._run.trim(n)
        self._sync()

    def reset(self) -> None:
        """Back to the prompt."""
        self.back(len(self.tokens))

    def branch(self) -> Stepper:
        """An independent copy: steps on either one do not affect the other."""
        self._sync()
        twin = copy.copy(self)
        twin._run = self._run.fork()
        twin.constraint = twin._run.constraint
        twin.tokens = list(self.tokens)
        twin._retext()
        return twin

    def __repr__(self) -> str:
        return f"Stepper({len(self.prompt)} prompt tokens, {len(self.tokens)} generated: {self.text!r})"

    # -- internals -----------------------------------------------------------
    def _check_open(self) -> None:
        if self.done:
            raise RuntimeError(f"generation has finished ({self.finish_reason}); call back() or reset() to continue")

    def _token_ids(self, token: int | str) -> list[int]:
        vocab = self.lm.vocab_size
        if isinstance(token, str):
            ids = list(self.lm.tokenizer.encode(token, add_special_tokens=False))
            if not ids:
                raise ValueError(f"choose: expected text of at least one token, got {token!r}")
            return ids
        known = token in self.lm.pieces  # a remote model's local keys are negative (nbllm.remote.vocab)
        if not isinstance(token, int) or isinstance(token, bool) or not (0 <= token < vocab or known):
            raise ValueError(f"choose: expected a token id in [0, {vocab}) or text, got {token!r}")
        return [token]

    def _check_allowed(self, token: int) -> None:
        if self.constraint is not None and self._run.distribution().logprob(token) == -float("inf"):
            piece = piece_of(self.lm.tokenizer, token, self.lm.pieces)
            raise ValueError(f"choose: token {token} ({piece!r}) is not allowed by the constraint here")

    def _take(self, token_id: int) -> Token:
        step = self._run.advance(token_id)  # all or nothing
        try:
            record = self._record(step)
            self.tokens.append(record)
        except BaseException:
            self._sync()
            raise
        return record

    def _record(self, step: Step) -> Token:
        is_eos = step.token in self.lm.tokenizer.eos_token_ids
        text = self._text.flush() if is_eos else self._text.add(step.token)
        logprob, sampled_prob, top = describe(
            step.token, step.dist, self.params, self.top_logprobs, self.lm.tokenizer, self.lm.pieces
        )
        return Token(
            id=step.token,
            text=text,
            piece=piece_of(self.lm.tokenizer, step.token, self.lm.pieces),
            logprob=float("nan") if logprob is None else logprob,
            index=len(self.tokens),
            top=top,
            sampled_prob=sampled_prob,
            forced=step.forced,
            special=is_eos,
            finish_reason="stop" if is_eos else None,
            masked_prob=step.masked_prob,
        )

    def _sync(self) -> None:
        """Make the tokens and the run agree (an interrupt between them leaves one a token ahead)."""
        taken = len(self._run.ids) - len(self.prompt)
        if taken > len(self.tokens):
            self._run.trim(taken - len(self.tokens))
        elif taken < len(self.tokens):
            del self.tokens[taken:]
        else:
            return
        self._retext()

    def _retext(self) -> None:
        self._text = TextAssembler(self.lm.tokenizer, continuation=self.prompt.continuation)
        tokens, self.tokens = self.tokens, []
        for t in tokens:
            text = self._text.flush() if t.special else self._text.add(t.id)
            self.tokens.append(t if t.text == text else _with_text(t, text))


def _with_text(token: Token, text: str) -> Token:
    from dataclasses import replace

    return replace(token, text=text)
