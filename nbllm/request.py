"""Building a ``Request``: every generation argument validated once, before anything runs.

``stream``, ``Stepper``, ``Chat``, the widgets and the magics all build their
requests here, so a bad value gets the same one-line "expected X, got Y" error
everywhere, and nothing (a cache, a chat, a stepper) has changed when it does.
The checks are ordered cheap first: settings, then the constraint (compiled in
about a millisecond), then the prompt (a vision prompt runs the vision tower).
"""

from __future__ import annotations

import os
from typing import Any

from .engine import ModelHandle, Request
from .prompt import Prompt
from .sampling import SamplingParams, resolve_logit_bias

__all__ = [
    "make_request",
    "check_options",
    "STRUCTURED_KEYS",
    "REPLY_KEYS",
    "TOP_LOGPROBS_MAX",
    "check_max_kv_size",
]

STRUCTURED_KEYS = ("schema", "json", "regex", "choices", "grammar")
TOP_LOGPROBS_MAX = 100
# Request fields taken from the keyword arguments as they are (None: the default).
_FIXED = (
    "draft_model",
    "num_draft_tokens",
    "max_tokens",
    "top_logprobs",
    "stop",
    "logits_processors",
    "max_kv_size",
    "prefill_step_size",
    "progress",
    "constraint",
)
_MAX_TOKENS_MAX = 10_000_000


def make_request(
    lm: ModelHandle,
    prompt: Any,
    *,
    system: str | None = None,
    raw: bool = False,
    images: Any = None,
    truncate: bool = False,
    **settings: Any,
) -> Request:
    """Validate the arguments of a generation and encode its prompt.

    Args:
        lm: The model handle (its tokenizer, vocabulary and context).
        prompt: Text, chat messages, token ids, or a ``Prompt`` from ``lm.encode``.
        system: System message (chat template only).
        raw: Plain completion, no chat template.
        images: Image(s) for a vision model.
        truncate: Keep the last context-length tokens of a prompt that is longer
            than the model's context instead of refusing it.
        **settings: ``max_tokens`` (256, in ``[1, 10_000_000]``), ``top_logprobs``
            (0, in ``[0, min(100, vocab)]``), ``stop`` (a string or a list),
            ``logits_processors`` (callables ``processor(tokens, logits) -> logits``),
            ``max_kv_size`` (``>= 8``, when no prompt cache is given),
            ``prefill_step_size`` (``None``: the engine's choice), ``progress``
            (``progress(done, total)`` during prefill), a constraint
            (``constraint=`` from ``make_constraint``, or one of ``schema=``,
            ``json=``, ``regex=``, ``choices=``, ``grammar=``), ``draft_model``
            (speculative decoding: a loaded model or a folder, same tokenizer) with
            ``num_draft_tokens`` (3, in ``[1, 64]``), and the sampling settings
            (``SamplingParams`` fields).

    Returns:
        A ``Request``.

    Raises:
        ValueError, TypeError: A bad argument (the message says what was expected).
    """
    fields = _settings(lm, settings)
    return Request(prompt=_encode(lm, prompt, system, raw, images, truncate), **fields)


# The settings a chat (or any caller that supplies its own prompt) may set for every reply.
REPLY_KEYS = frozenset(
    {
        "max_tokens",
        "top_logprobs",
        "stop",
        "logits_processors",
        "prefill_step_size",
        "progress",
        "constraint",
        *STRUCTURED_KEYS,
    }
)


def check_options(lm: ModelHandle, options: dict[str, Any], allowed: frozenset[str] = REPLY_KEYS) -> None:
    """Validate generation settings without a prompt (e.g. a chat's defaults); raises as ``make_request`` does."""
    rest = dict(options)
    SamplingParams.from_kwargs(rest)
    unknown = set(rest) - allowed
    if unknown:
        raise TypeError(f"unexpected setting(s): {', '.join(sorted(unknown))}")
    _settings(lm, options)


def _settings(lm: ModelHandle, options: dict[str, Any]) -> dict[str, Any]:
    """Every ``Request`` field but the prompt, validated (cheap checks first)."""
    options = dict(options)
    fixed = {k: options.pop(k, None) for k in _FIXED}
    max_tokens = 256 if fixed["max_tokens"] is None else fixed["max_tokens"]
    top_logprobs = 0 if fixed["top_logprobs"] is None else fixed["top_logprobs"]
    params = SamplingParams.from_kwargs(options)
    constraint = _constraint(lm, fixed["constraint"], options)
    if options:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(options))}")
    params.check_vocab(lm.vocab_size)
    _check_int(max_tokens, "max_tokens", 1, _MAX_TOKENS_MAX)
    _check_int(top_logprobs, "top_logprobs", 0, min(TOP_LOGPROBS_MAX, lm.vocab_size))
    if fixed["prefill_step_size"] is not None:
        _check_int(fixed["prefill_step_size"], "prefill_step_size", 1, 1 << 20)
    check_max_kv_size(fixed["max_kv_size"])
    stop = fixed["stop"]
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop: expected a non-empty string or a list of them, got {stop!r}")
    processors = tuple(fixed["logits_processors"] or ())
    if not all(callable(p) for p in processors):
        raise TypeError("logits_processors: expected callables processor(tokens, logits) -> logits")
    progress = fixed["progress"]
    if progress is not None and not callable(progress):
        raise TypeError(f"progress: expected a callable progress(done, total) or None, got {type(progress).__name__}")
    bias = resolve_logit_bias(params.logit_bias, lm.tokenizer, lm.vocab_size) if params.logit_bias else None
    if params.xtc_probability > 0:
        params = _with_xtc_specials(params, lm.tokenizer)
    return dict(
        params=params,
        logit_bias=bias,
        logits_processors=processors,
        constraint=constraint,
        stop=stops,
        max_tokens=max_tokens,
        top_logprobs=top_logprobs,
        prefill_step_size=fixed["prefill_step_size"],
        max_kv_size=fixed["max_kv_size"],
        progress=progress,
        **_draft(lm, fixed["draft_model"], fixed["num_draft_tokens"]),
    )


def _draft(lm: ModelHandle, draft: Any, num: Any) -> dict[str, Any]:
    """The draft model (a loaded model, or a path the handle can load) and its proposal length, checked."""
    if draft is None:
        if num is not None:
            raise ValueError("num_draft_tokens: expected it only with draft_model=")
        return {}
    num = 3 if num is None else num
    _check_int(num, "num_draft_tokens", 1, 64)
    if not hasattr(draft, "engine"):
        loader = getattr(lm, "load_related", None)
        if loader is None or not isinstance(draft, (str, os.PathLike)):
            raise TypeError(f"draft_model: expected a loaded model or a model folder, got {type(draft).__name__}")
        draft = loader(draft)
    if not hasattr(draft.engine, "call") or not hasattr(lm.engine, "call"):
        raise ValueError("draft_model: speculative decoding needs local MLX models for both the model and the draft")
    probe = "Speculative decoding, 42 tokens!"
    if draft.vocab_size != lm.vocab_size or draft.encode(probe, raw=True).ids != lm.encode(probe, raw=True).ids:
        raise ValueError(
            f"draft_model: expected a draft with the same tokenizer as {lm.name}, {draft.name} has another"
        )
    return {"draft_model": draft, "num_draft_tokens": num}


def _encode(lm: ModelHandle, prompt: Any, system: str | None, raw: bool, images: Any, truncate: bool) -> Prompt:
    if isinstance(prompt, Prompt):
        if system is not None or raw or images is not None:
            raise ValueError("prompt: an encoded Prompt takes no system=, raw= or images=; pass them to lm.encode")
        encoded = prompt
    else:
        encoded = lm.encode(prompt, system=system, raw=raw, images=images)
    context = lm.context_length
    if context is not None and len(encoded) > context:
        if not truncate:
            raise ValueError(
                f"prompt: expected at most {context} tokens (the model's context), got {len(encoded)}; "
                "shorten it, or pass truncate=True to keep the last ones"
            )
        encoded = encoded.tail(context)
    return encoded


def _constraint(lm: ModelHandle, constraint: Any, options: dict[str, Any]) -> Any:
    spec = {k: options.pop(k) for k in STRUCTURED_KEYS if k in options}
    spec = {k: v for k, v in spec.items() if v is not None and v is not False}
    if constraint is not None and not hasattr(constraint, "processor"):
        raise TypeError(
            f"constraint: expected a Constraint from nbllm.make_constraint, got {type(constraint).__name__}"
        )
    if not spec:
        return constraint
    if constraint is not None or len(spec) > 1:
        raise ValueError(f"expected at most one of constraint/schema/json/regex/choices/grammar, got {sorted(spec)}")
    server = getattr(lm, "server_constraint", None)  # a remote model: the server enforces it
    if server is not None:
        return server(**spec)
    from .structured import make_constraint

    return make_constraint(lm, **spec)


def _with_xtc_specials(params: SamplingParams, tokenizer: Any) -> SamplingParams:
    # As mlx-lm's generate does: XTC never removes the newline or end-of-sequence tokens.
    from dataclasses import replace

    specials = list(tokenizer.encode("\n", add_special_tokens=False)) + sorted(tokenizer.eos_token_ids)
    return replace(params, xtc_special_tokens=tuple(dict.fromkeys(int(t) for t in specials)))


def check_max_kv_size(value: Any) -> None:
    """``max_kv_size``: ``None`` or an integer >= 8 (mlx-lm keeps 4 tokens of a rotating cache)."""
    if value is not None:
        _check_int(value, "max_kv_size", 8, 1 << 30, "or None")


def _check_int(value: Any, name: str, lo: int, hi: int, extra: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        tail = f" {extra}" if extra else ""
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}]{tail}, got {value!r}")
