"""The local engine: an mlx-lm model (or mlx-vlm's language model behind an adapter) in this process.

Two ways through a run, because mlx-lm offers one and a stepper needs another:

* ``generate`` is mlx-lm's ``generate_step`` as is: prefill in chunks, then a
  loop that computes step n+1 while step n is being recorded. Streams use it.
* ``prefill`` / ``advance`` / ``trim`` drive the model one token at a time,
  computing each next distribution eagerly, so the token at every position can
  be chosen. ``generate_step`` always runs one step ahead, so it cannot.

Every model call runs on mlx-lm's thread-local generation stream: MLX ties
streams to the thread that made them, and a run may be iterated on a worker
thread (a chat widget outside a kernel, a server). A run holds its layers
alone; a shared ``PromptCache`` is leased for the run and gets back the
tokens its layers cover, whatever happens (an error, an interrupt, a cancel).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Generator
from itertools import chain
from typing import Any, cast

import mlx.core as mx

from .distribution import Distribution
from .engine import Cancelled, Request, Step
from .kv import settle, trim_ahead
from .prompt import Prompt
from .sampling import make_processors, make_token_sampler
from .sdpa import cpu_prefill
from .speculative import DraftCounts, speculative_steps

__all__ = ["MLXEngine", "MLXRun", "generation_stream", "prefill_step_for"]


def prefill_step_for(device: Any) -> int:
    """Prompt tokens per prefill chunk: mlx-lm's 2048 on Metal; 512 on the CPU backend, where
    attention over a chunk costs more than the matmuls it saves (measured in bench/bench_cpu.py:
    1.26-1.27x the prefill rate of 2048 at 2,048 tokens, 1.19-1.40x at 3,000, with the C softmax)."""
    return 512 if device == mx.cpu else 2048


def generation_stream() -> Any:
    """mlx-lm's generation stream (thread-local: each thread gets its own)."""
    from mlx_lm.generate import generation_stream as stream

    return stream


class MLXEngine:
    """Runs requests on an mlx-lm style model: ``model(ids, cache=, input_embeddings=)``.

    Args:
        model: The mlx module (an mlx-lm model, or an adapter with its signature).
        tokenizer: mlx-lm's ``TokenizerWrapper`` (for end-of-sequence ids).
        vocab_size: Output size.
    """

    def __init__(self, model: Any, tokenizer: Any, vocab_size: int):
        self.model, self.tokenizer, self.vocab_size = model, tokenizer, vocab_size
        self.prefill_step_size = prefill_step_for(mx.default_device())

    def start(self, request: Request, cache: Any = None, owner: Any = None) -> MLXRun:
        """A run over ``request.prompt``; ``cache`` is a ``PromptCache``, mlx-lm cache layers, or ``None``."""
        return MLXRun(self, request, cache, owner)

    def make_layers(self, max_kv_size: int | None = None) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return list(make_prompt_cache(self.model, max_kv_size=max_kv_size))

    def bind(self, layers: list[Any], prompt: Prompt) -> None:
        """Attach to ``layers`` what the model needs besides ids and embeddings (nothing, for text models)."""

    def call(self, ids: list[int], layers: list[Any], embeddings: mx.array | None = None) -> mx.array:
        """Logits ``(1, len(ids), vocab)``, feeding ``ids`` (or their embeddings) into ``layers``."""
        if embeddings is not None:
            return self.model(mx.array(ids)[None], cache=layers, input_embeddings=embeddings[None])
        return self.model(mx.array(ids)[None], cache=layers)


class MLXRun:
    """One decoding position over mlx-lm cache layers (see ``nbllm.engine.Run``)."""

    def __init__(self, engine: MLXEngine, request: Request, cache: Any, owner: Any):
        self.engine, self.request, self.prompt = engine, request, request.prompt
        self.constraint = request.constraint.fresh() if request.constraint is not None else None
        self.cached_tokens = 0
        self._cache = cache
        self._owner = weakref.ref(owner) if owner is not None else None  # no cycle: a dropped stream is freed at once
        self._shared = cache is not None and hasattr(cache, "prepare")
        self._leased = False
        self._layers: list[Any] | None = None
        self._ids: list[int] = list(self.prompt.ids)  # prompt + taken tokens
        self._fed = 0  # of them, how many the layers hold
        self._logprobs: mx.array | None = None  # the distribution after the first _dist_at ids
        self._dist_at = -1
        self._eos = set(engine.tokenizer.eos_token_ids)
        self._sampler = make_token_sampler(request.params, engine.vocab_size)
        self._chunk = request.prefill_step_size or engine.prefill_step_size
        self._procs: list[Any] = []
        self.draft_counts = DraftCounts()

    # -- the fast loop --------------------------------------------------------
    def generate(self, cancelled: Callable[[], bool]) -> Generator[Step, None, None]:
        """mlx-lm's ``generate_step`` over the prompt; yields one ``Step`` per token."""
        from mlx_lm.generate import generate_step, wired_limit

        request, constraint = self.request, self.constraint
        layers, reused = self._open()
        try:
            self._procs = self._processors(context_prefix=self.prompt.ids[:reused])
            emb = self.prompt.embeddings
            if request.params.seed is not None:
                mx.random.seed(request.params.seed)

            def progress(done: int, total: int) -> None:
                if request.progress is not None:
                    request.progress(done, total)
                if done < total and cancelled():
                    raise Cancelled()

            plain = None
            if request.draft_model is not None:
                if emb is not None:
                    raise ValueError("draft_model: speculative decoding takes text prompts, not images")
                steps: Any = speculative_steps(
                    self.engine.model,
                    request.draft_model.engine,
                    list(self.prompt.ids[reused:]),
                    list(self.prompt.ids[:reused]),
                    layers,
                    num_draft_tokens=request.num_draft_tokens,
                    max_tokens=request.max_tokens,
                    sampler=self._sampler,
                    processors=self._procs or None,
                    prefill_step_size=self._chunk,
                    counts=self.draft_counts,
                )
            else:
                plain = generate_step(
                    mx.array(self.prompt.ids[reused:]),
                    self.engine.model,
                    max_tokens=request.max_tokens,
                    sampler=self._sampler,
                    logits_processors=self._procs or None,
                    prompt_cache=layers,
                    prefill_step_size=self._chunk,
                    prompt_progress_callback=progress,
                    input_embeddings=emb[reused:] if emb is not None else None,
                )
                steps = ((int(cast(int, t)), lp, False, None) for t, lp in plain)  # generate_step yields ints
            with wired_limit(self.engine.model, [generation_stream()]):
                try:
                    with cpu_prefill():  # the prompt is processed on the first step
                        head = next(steps, None)
                    for n, (token, logprobs, from_draft, accepted) in enumerate(chain([head] if head else [], steps)):
                        self._ids.append(token)
                        forced = constraint is not None and constraint.was_forced(n)
                        masked = constraint.masked_prob(n) if constraint is not None else None
                        yield Step(token, Distribution(logprobs), forced, masked, from_draft, accepted)
                finally:
                    steps.close()
                    if plain is not None:
                        plain.close()
        finally:
            self._fed = len(self._ids)
            self._release()

    # -- one token at a time ----------------------------------------------------
    def prefill(self, cancelled: Callable[[], bool] | None = None) -> None:
        """Feed the prompt (reusing a cached prefix); the first distribution is then ready."""
        layers, reused = self._open()
        try:
            self._procs = self._processors()
            self._fed = reused
            self._feed(self.prompt.ids[reused:-1], reused, cancelled)
            self._forward([self.prompt.ids[-1]], embeddings=self._embeddings(len(self.prompt) - 1, len(self.prompt)))
            if self._shared:  # the shared cache keeps the prompt; this run moves its own copy
                self._layers = copy.deepcopy(layers)
        finally:
            self._release()

    def distribution(self) -> Distribution:
        return Distribution(self._ready())

    def sample(self) -> int:
        logprobs = self._ready()
        seed = self.request.params.seed
        if seed is not None:
            # Seeded per position: reproducible across runs, after trim(), and in forks.
            mx.random.seed((seed * 1_000_003 + len(self._ids)) % 2**64)
        with mx.stream(generation_stream()):
            return int(cast(int, self._sampler(logprobs[None]).item()))

    def advance(self, token: int) -> Step:
        """Take ``token``; the layers, the constraint and the ids move together or not at all."""
        current = self._ready()
        constraint, index = self.constraint, len(self._ids) - len(self.prompt)
        forced = bool(mx.sum(current > -mx.inf).item() == 1) if constraint is not None else False
        masked = constraint.masked_prob(index) if constraint is not None else None
        step = Step(token, Distribution(current), forced, masked)
        if token in self._eos:  # the end: nothing to feed, no next distribution
            self._ids.append(token)
            return step
        consumed = constraint.consumed if constraint is not None else 0
        try:
            self._forward([token], history=self._ids + [token])
        except BaseException:
            self._undo(current, consumed)
            raise
        self._ids.append(token)
        return step

    def trim(self, n: int) -> None:
        """Forget the last ``n`` taken tokens; costs one decode step (or a rebuild for untrimmable layers)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        keep = len(self._ids) - n
        if not len(self.prompt) <= keep <= len(self._ids):
            raise ValueError(f"trim: expected at most {len(self._ids) - len(self.prompt)} tokens, got {n}")
        if n == 0:
            return
        if self.constraint is not None:  # an end-of-sequence token never reached the grammar
            self.constraint.rollback(n - (self._ids[-1] in self._eos))
        layers = self._layers
        del self._ids[keep:]
        if self._dist_at == keep and self._fed == keep:  # only an unfed end token went: nothing to recompute
            return
        if layers is not None and can_trim_prompt_cache(layers) and self._fed >= keep - 1:
            trim_prompt_cache(layers, self._fed - (keep - 1))
            self._fed = keep - 1
            self._forward(self._ids[-1:], embeddings=self._embeddings(keep - 1, keep), history=self._ids)
        else:
            self._rebuild()

    def fork(self) -> MLXRun:
        twin = copy.copy(self)
        twin._layers = copy.deepcopy(self._layers)
        twin._ids = list(self._ids)
        twin._cache = twin._owner = None
        twin._shared = False
        if self.constraint is not None:
            twin.constraint = self.constraint.copy()
            twin._procs = twin._processors()
        return twin

    def close(self) -> None:
        self._release()
        self._layers, self._logprobs = None, None

    @property
    def ids(self) -> list[int]:
        """Prompt ids followed by the taken ones."""
        return list(self._ids)

    # -- internals -----------------------------------------------------------------
    def _open(self) -> tuple[list[Any], int]:
        cache, prompt = self._cache, self.prompt
        if self._shared:
            layers, reused = cache.prepare(prompt.ids, prompt.media, owner=self._owner() if self._owner else None)
            self._leased = True
        elif cache is not None:  # mlx-lm cache layers given as they are
            layers, reused = list(cache), 0
        else:
            layers, reused = self.engine.make_layers(self.request.max_kv_size), 0
        self._layers, self.cached_tokens = layers, reused
        self.engine.bind(layers, self.prompt)
        return layers, reused

    def _release(self) -> None:
        if self._layers is not None:
            settle(self._layers)
        if self._leased:
            cache, self._cache, self._shared, self._leased = self._cache, None, False, False
            cache.commit(self._ids[: max(self._fed, self.cached_tokens)])

    def _processors(self, context_prefix: Any = ()) -> list[Any]:
        request = self.request
        extra = list(request.logits_processors)
        if self.constraint is not None:
            extra.append(self.constraint.processor)
        return make_processors(request.params, request.logit_bias, context_prefix=context_prefix, extra=extra)

    def _embeddings(self, start: int, stop: int) -> mx.array | None:
        emb = self.prompt.embeddings
        return emb[start:stop] if emb is not None and start < len(self.prompt) else None

    def _feed(self, ids: Any, start: int, cancelled: Callable[[], bool] | None) -> None:
        """Run ``ids`` (which begin at position ``start``) into the layers in chunks, keeping no logits."""
        total, progress = len(ids), self.request.progress
        for done in range(0, total, self._chunk):
            if cancelled is not None and cancelled():
                raise Cancelled()
            chunk = list(ids[done : done + self._chunk])
            with mx.stream(generation_stream()), cpu_prefill():
                self.engine.call(chunk, self._layers or [], self._embeddings(start + done, start + done + len(chunk)))
                mx.eval([c.state for c in self._layers or []])
            self._fed = start + done + len(chunk)
            if progress is not None:
                progress(done + len(chunk), total)

    def _forward(self, ids: list[int], embeddings: mx.array | None = None, history: list[int] | None = None) -> None:
        """Feed ``ids``; the next distribution is computed in the background (reading it waits)."""
        with mx.stream(generation_stream()):
            logits = self.engine.call(ids, self._layers or [], embeddings)[:, -1, :]
            if self._procs:
                context = mx.array(self._ids if history is None else history)
                for proc in self._procs:
                    logits = proc(context, logits)
            logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
            mx.async_eval(logprobs)
        self._logprobs = logprobs
        self._fed += len(ids)
        self._dist_at = self._fed

    def _ready(self) -> mx.array:
        if self._logprobs is None:
            raise RuntimeError("the run has no next distribution: it was closed, or it ended at end-of-sequence")
        return self._logprobs

    def _undo(self, current: mx.array, consumed: int) -> None:
        # A failed step may have moved some layers and the grammar: put both back.
        if self.constraint is not None and self.constraint.consumed > consumed:
            self.constraint.rollback(self.constraint.consumed - consumed)
        layers, fed = self._layers or [], len(self._ids)
        settle(layers)
        if trim_ahead(layers, fed):
            self._fed, self._logprobs, self._dist_at = fed, current, fed
        else:  # e.g. a rotating layer past its window: rebuild from the ids
            self._rebuild()

    def _rebuild(self) -> None:
        """Fresh layers fed with every id but the last, then the last: the state ``trim`` or ``_undo`` could not restore."""
        self._layers = self.engine.make_layers(self.request.max_kv_size)
        self.engine.bind(self._layers, self.prompt)
        self._fed, p = 0, len(self.prompt)
        if len(self._ids) > p:  # the prompt (with its embeddings) and the taken tokens, in separate chunks
            self._feed(self._ids[:p], 0, None)
            self._feed(self._ids[p:-1], p, None)
        else:
            self._feed(self._ids[:-1], 0, None)
        self._forward(
            self._ids[-1:], embeddings=self._embeddings(len(self._ids) - 1, len(self._ids)), history=self._ids
        )
