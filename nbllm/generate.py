"""The token stream: ``stream()`` yields ``Token`` records, ``generate()`` collects them.

``TokenStream`` owns the loop: it takes ``Step`` records from an engine run
(see ``nbllm.engine``) and turns them into ``Token`` records with the text
(stop strings held back while pending), the alternatives and the stats, and
decides when generation ends. ``completion()`` reads it to the end and parses
a structured value. ``generate``, chat replies, the views and the magics all
use it; none of them knows which engine produced the steps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .decode import TextAssembler, describe, piece_of
from .engine import Cancelled, InUseError, ModelHandle, Request, Step
from .request import make_request
from .tokens import Completion, Stats, Token

__all__ = ["TokenStream", "stream", "generate", "check_prompt_cache"]


@dataclass
class _State:
    """What a stream and its loop share (the loop holds no reference to the stream, so a stream
    nobody holds is freed, and its cache released, at once)."""

    stats: Stats
    tokens: list[Token] = field(default_factory=list)
    cancelled: bool = False
    ended: str | None = None


class TokenStream:
    """An iterator of ``Token`` records with live ``stats``, ``cancel()`` and ``completion()``.

    Iterate it once; the last record has a ``finish_reason``. ``cancel()`` (from
    any thread, e.g. a Stop button) ends it after the current token, or within
    one prefill chunk while the prompt is being processed. ``close()`` ends it
    now (from another thread: after the current token). However it ends, a
    prompt cache it used keeps exactly the tokens it covers.

    Args:
        lm: The model handle.
        request: The validated request (``nbllm.request.make_request``).
        prompt_cache: A ``PromptCache`` (prefix reuse), mlx-lm cache layers, or ``None``.
    """

    def __init__(self, lm: ModelHandle, request: Request, prompt_cache: Any = None):
        self.request, self.prompt = request, request.prompt
        self._state = _State(Stats(prompt_tokens=len(request.prompt)))
        self._lm = lm
        self._run = lm.engine.start(request, prompt_cache, owner=self)
        self.constraint = self._run.constraint
        self._lock = threading.Lock()  # held while a token is being produced
        self._thread: int | None = None
        self._close_requested = False
        self._it: Any = None

    @property
    def stats(self) -> Stats:
        """Figures of this generation, updated as it runs."""
        return self._state.stats

    @property
    def tokens(self) -> list[Token]:
        """The token records produced so far."""
        return self._state.tokens

    # -- iteration ---------------------------------------------------------------
    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Token:
        if not self._lock.acquire(blocking=False):
            raise InUseError(
                "this stream is being iterated on another thread; iterate a stream from one thread at a time"
            )
        try:
            self._thread = threading.get_ident()
            if self._it is None:
                if self._state.ended is not None:
                    raise StopIteration
                self._it = _loop(self._run, self.request, self._lm, self._state)
            return next(self._it)
        finally:
            self._lock.release()
            if self._close_requested:
                self.close()

    # -- control -----------------------------------------------------------------
    def cancel(self) -> None:
        """End after the current token (``finish_reason='cancelled'``); safe from any thread."""
        self._state.cancelled = True
        interrupt = getattr(self._run, "interrupt", None)  # a remote run closes its HTTP stream at once
        if interrupt is not None:
            interrupt()

    @property
    def cancelled(self) -> bool:
        return self._state.cancelled

    def close(self) -> None:
        """End now and release the model state (a prompt cache keeps what it covers).

        From another thread than the one iterating, the stream ends after the
        token being produced.
        """
        if not self._lock.acquire(blocking=False):
            self._close_requested = self._state.cancelled = True
            return
        try:
            self._close_requested = False
            if self._it is not None:
                self._it.close()
            elif self._state.ended is None:
                self._run.close()
                self._state.ended = "cancelled"
        finally:
            self._lock.release()

    def release_lease(self) -> bool:
        """Close this stream for a new request on the same prompt cache, if it is safe here.

        Safe when called on the thread that iterates it and it is not producing
        a token now (a stream left unfinished in a notebook). Returns whether it closed.
        """
        if self._thread not in (None, threading.get_ident()) or self._lock.locked():
            return False
        self.close()
        return True

    # -- results -----------------------------------------------------------------
    @property
    def text(self) -> str:
        """The text streamed so far."""
        return "".join(t.text for t in self.tokens)

    @property
    def finish_reason(self) -> str | None:
        """How the stream ended (``None`` while it runs)."""
        if self.tokens and self.tokens[-1].finish_reason:
            return self.tokens[-1].finish_reason
        return self._state.ended

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.prompt.ids)

    def partial(self) -> Completion:
        """The tokens so far as a ``Completion`` (nothing more is generated, no value is parsed)."""
        return Completion.from_tokens(self.tokens, self.stats, ended=self.finish_reason)

    def completion(self) -> Completion:
        """Read the stream to the end and return it as a ``Completion``.

        With a structured-output constraint, ``value`` holds the parsed value.

        Raises:
            StructuredOutputError: The output does not complete the constraint.
        """
        for _ in self:
            pass
        done = self.partial()
        if self.constraint is not None:
            done.value = self.constraint.finish(done)
        return done

    def __repr__(self) -> str:
        return f"TokenStream({len(self.prompt)} prompt tokens, {len(self.tokens)} generated, finish_reason={self.finish_reason!r})"


def _loop(run: Any, request: Request, lm: ModelHandle, state: _State) -> Any:
    """The token loop: engine steps in, ``Token`` records out, until a finish reason."""
    tokenizer, params, k = lm.tokenizer, request.params, request.top_logprobs
    text = TextAssembler(tokenizer, request.stop, continuation=request.prompt.continuation)
    eos, stats = tokenizer.eos_token_ids, state.stats
    tic, first = time.perf_counter(), 0.0
    steps = run.generate(lambda: state.cancelled)
    try:
        for n, step in enumerate(steps):
            if n == 0:
                first = time.perf_counter()
                stats.cached_tokens = run.cached_tokens
                stats.time_to_first_token = first - tic
                stats.prompt_tps = (len(request.prompt) - stats.cached_tokens) / max(first - tic, 1e-9)
            finish, piece = _finish(step, step.token in eos, text, n, request.max_tokens, state.cancelled)
            if finish is None and step.finish is not None:
                finish, piece = step.finish, piece + text.flush()
            token = _record(step, n, piece, finish, lm, params, k)
            stats.generated_tokens = n + 1
            if n > 0:
                stats.generation_tps = n / (time.perf_counter() - first)
            state.tokens.append(token)
            yield token
            if finish is not None:
                break
    except (Cancelled, GeneratorExit) as err:
        state.ended = "cancelled"
        if isinstance(err, GeneratorExit):
            raise
    except KeyboardInterrupt:
        state.ended = "interrupted"
        raise
    except BaseException:
        state.ended = "error"
        raise
    finally:
        steps.close()
        run.close()
        counts = getattr(run, "draft_counts", None)
        if counts is not None and counts.proposed:
            stats.draft_proposed, stats.draft_accepted, stats.draft_rounds = (
                counts.proposed,
                counts.accepted,
                counts.rounds,
            )
        _server_figures(run, stats)
        if state.ended is None and (not state.tokens or state.tokens[-1].finish_reason is None):
            state.ended = getattr(run, "ended", None) or "cancelled"
        stats.peak_memory_gb = _peak_memory_gb()


def _server_figures(run: Any, stats: Stats) -> None:
    """A server reports the prompt's size and its cache hits when the reply ends (``usage``)."""
    prompt_tokens = getattr(run, "prompt_tokens", None)
    if prompt_tokens is not None:
        stats.prompt_tokens, stats.cached_tokens = prompt_tokens, run.cached_tokens
        new = prompt_tokens - run.cached_tokens
        stats.prompt_tps = new / max(stats.time_to_first_token, 1e-9) if stats.time_to_first_token else 0.0


def _finish(
    step: Step, is_eos: bool, text: TextAssembler, n: int, max_tokens: int, cancelled: bool
) -> tuple[str | None, str]:
    """The finish reason at token ``n`` (or ``None``) and the text this token releases."""
    piece = "" if is_eos else text.add(step.token, step.text)
    finish = None
    if is_eos:
        finish = "stop"
    elif text.stopped:
        finish = "stop_string"
    elif n + 1 == max_tokens:
        finish = "length"
    elif cancelled:
        finish = "cancelled"
    if finish is not None and finish != "stop_string":
        piece += text.flush()
    return finish, piece


def _record(step: Step, n: int, text: str, finish: str | None, lm: ModelHandle, params: Any, k: int) -> Token:
    logprob, sampled_prob, top = describe(step.token, step.dist, params, k, lm.tokenizer, lm.pieces)
    return Token(
        id=step.token,
        text=text,
        piece=piece_of(lm.tokenizer, step.token, lm.pieces),
        logprob=float("nan") if logprob is None else logprob,
        index=n,
        top=top,
        sampled_prob=sampled_prob,
        forced=step.forced,
        from_draft=step.from_draft,
        accepted=step.accepted,
        special=finish == "stop",
        finish_reason=finish,
        masked_prob=step.masked_prob,
    )


def _peak_memory_gb() -> float:
    import mlx.core as mx

    return float(mx.get_peak_memory()) / 1e9


def check_prompt_cache(lm: ModelHandle, prompt_cache: Any) -> None:
    """``prompt_cache``: ``None``, a ``PromptCache`` made for ``lm``, or a list of mlx-lm cache layers."""
    if prompt_cache is None or isinstance(prompt_cache, list):
        return
    if not hasattr(prompt_cache, "prepare"):
        raise TypeError(
            f"prompt_cache: expected a PromptCache, mlx-lm cache layers or None, got {type(prompt_cache).__name__}"
        )
    if getattr(prompt_cache, "lm", lm) is not lm:
        raise ValueError("prompt_cache: expected a PromptCache made for this model, got one made for another")


def stream(lm: ModelHandle, prompt: Any, *, prompt_cache: Any = None, **kwargs: Any) -> TokenStream:
    """Stream a completion token by token.

    Args:
        lm: A loaded model.
        prompt: Text (chat template applied when the model has one), chat
            messages, token ids, or a ``Prompt`` from ``lm.encode``.
        prompt_cache: A ``PromptCache`` (reuses the longest cached prefix) or mlx-lm cache layers.
        **kwargs: Everything ``nbllm.request.make_request`` takes: ``max_tokens``
            (256), ``top_logprobs`` (0), ``stop``, ``system``, ``raw``, ``images``,
            ``logits_processors``, ``max_kv_size``, ``prefill_step_size``,
            ``progress``, ``truncate``, a constraint (``schema=``, ``json=``,
            ``regex=``, ``choices=``, ``grammar=`` or ``constraint=``) and the
            sampling settings (``temperature``, ``top_k``, ``top_p``, ``min_p``,
            ``xtc_probability``, ``xtc_threshold``, ``repetition_penalty``,
            ``presence_penalty``, ``frequency_penalty``, ``penalty_context``,
            ``logit_bias``, ``seed``).

    Returns:
        A ``TokenStream`` of ``Token`` records (nothing runs until it is iterated).
    """
    check_prompt_cache(lm, prompt_cache)
    return TokenStream(lm, make_request(lm, prompt, **kwargs), prompt_cache)


def generate(lm: ModelHandle, prompt: Any, **kwargs: Any) -> Completion:
    """Generate to the end and return a ``Completion`` (text, tokens, stats, parsed ``value``).

    Takes the same arguments as ``stream``.
    """
    return stream(lm, prompt, **kwargs).completion()
