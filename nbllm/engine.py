"""The engine seam: what the token loop needs from whatever runs the model.

Data flows one way: a ``Request`` (built once by ``nbllm.request``) goes to an
``Engine``, which returns a ``Run``: one decoding position over the prompt.
A run yields ``Step`` records (the token taken and the distribution it was
taken from); ``TokenStream``, ``Stepper`` and ``Chat`` turn those into ``Token``
records, and every view draws those. Nothing above this seam knows whether the
steps come from mlx-lm in this process, mlx-vlm, or a server over HTTP.

An engine must offer: prefill (or reuse of a cached prefix) of a prompt, a
fast loop that samples and advances (``generate``), one position's
distribution (full or top-k), taking a chosen token (``advance``), and going
back (``trim``). ``nbllm.mlx_engine`` implements it for local MLX models.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .distribution import Distribution
from .prompt import Prompt
from .sampling import LogitsProcessor, SamplingParams

__all__ = ["Request", "Step", "Engine", "Run", "ModelHandle", "Cancelled", "InUseError"]


@dataclass(frozen=True, eq=False)
class Request:
    """One generation request, every argument validated (see ``nbllm.request.make_request``).

    Attributes:
        prompt: The encoded prompt.
        params: Sampling settings.
        logit_bias: ``{token id: bias}`` resolved from ids or one-token strings.
        logits_processors: User processors ``processor(tokens, logits) -> logits``.
        constraint: A structured-output constraint (each run works on its own copy).
        stop: Stop strings.
        max_tokens: Most tokens to generate.
        top_logprobs: Alternatives attached to each token.
        prefill_step_size: Prompt tokens per prefill chunk.
        max_kv_size: Bound on the KV cache when no prompt cache is given.
        progress: ``progress(done, total)`` called during prefill.
        draft_model: A loaded draft model for speculative decoding (same tokenizer), or ``None``.
        num_draft_tokens: Tokens the draft proposes per model pass.
    """

    prompt: Prompt
    params: SamplingParams
    logit_bias: dict[int, float] | None = None
    logits_processors: tuple[LogitsProcessor, ...] = ()
    constraint: Any = None
    stop: tuple[str, ...] = ()
    max_tokens: int = 256
    top_logprobs: int = 0
    prefill_step_size: int | None = None
    max_kv_size: int | None = None
    progress: Callable[[int, int], None] | None = None
    draft_model: Any = None
    num_draft_tokens: int = 3


@dataclass(frozen=True, eq=False)
class Step:
    """One token an engine took, with the distribution it was taken from.

    Attributes:
        token: The token id.
        dist: The distribution at that position (after processors and constraint).
        forced: True when the constraint allowed only this token.
        masked_prob: Model probability the constraint's mask removed (``None``
            without a constraint).
        from_draft: Speculative decoding: the draft proposed it and the model kept it.
        accepted: Speculative decoding: whether the draft's proposal here was kept
            (``None``: no proposal at this position).
        finish: The engine says generation ends after this token (a server's
            ``finish_reason``: servers do not send the end-of-sequence token itself).
        text: The text this token adds, when the engine knows it better than its
            piece (a server's streamed content); ``None``: decode the token.
    """

    token: int
    dist: Distribution
    forced: bool = False
    masked_prob: float | None = None
    from_draft: bool = False
    accepted: bool | None = None
    finish: str | None = None
    text: str | None = None


class InUseError(RuntimeError):
    """A prompt cache, chat or stream is in use by another thread (or by a call still running)."""


class Cancelled(Exception):
    """Raised inside a run to stop it early (a cancel during prefill); never escapes the stream."""


class Run(Protocol):
    """One decoding position over a prompt, owned by one stream or stepper."""

    constraint: Any
    cached_tokens: int

    def generate(self, cancelled: Callable[[], bool]) -> Generator[Step, None, None]:
        """Prefill, then sample and advance up to ``max_tokens`` times (the fast loop).

        ``cancelled()`` is polled between prefill chunks (raise ``Cancelled`` then).
        """
        ...

    def prefill(self, cancelled: Callable[[], bool] | None = None) -> None:
        """Feed the prompt so ``distribution()`` is the first position's (the step-by-step path)."""
        ...

    def distribution(self) -> Distribution:
        """The next position's distribution."""
        ...

    def sample(self) -> int:
        """Draw the next token with the request's sampler (does not advance)."""
        ...

    def advance(self, token: int) -> Step:
        """Take ``token`` at the next position; all or nothing (on failure the run is as before)."""
        ...

    def trim(self, n: int) -> None:
        """Forget the last ``n`` taken tokens."""
        ...

    def fork(self) -> Run:
        """An independent copy at the same position."""
        ...

    def close(self) -> None:
        """Release what the run holds (a prompt cache gets the tokens it now covers)."""
        ...


class Engine(Protocol):
    """Runs requests for one model."""

    def start(self, request: Request, cache: Any = None, owner: Any = None) -> Run:
        """A run over ``request.prompt``, reusing ``cache`` (a ``PromptCache``) when given.

        ``owner`` is the stream the run serves (a cache it leases can then tell
        whether that stream may be closed for a new request).
        """
        ...


class ModelHandle(Protocol):
    """What the request builder, the stream, the stepper and chat need from a loaded model."""

    tokenizer: Any
    vocab_size: int
    pieces: dict[int, str]

    @property
    def name(self) -> str: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def context_length(self) -> int | None: ...

    @property
    def is_vision(self) -> bool: ...

    def encode(self, prompt: Any, *, system: str | None = None, raw: bool = False, images: Any = None) -> Prompt: ...

    def decode(self, ids: Sequence[int]) -> str: ...
