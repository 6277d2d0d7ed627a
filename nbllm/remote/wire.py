"""The OpenAI-compatible wire format: request bodies out, token entries in.

What the client relies on, per server (their docs; only nbllm serve and
mlx_lm.server are run by the tests here):

- Chat completions with ``logprobs: true, top_logprobs: k``: each choice's
  ``logprobs.content`` is a list of ``{token, logprob, bytes, top_logprobs: [...]}``
  (OpenAI's shape; vLLM https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html,
  SGLang https://docs.sglang.ai/basic_usage/openai_api_completions.html, llama.cpp
  https://github.com/ggml-org/llama.cpp/tree/master/tools/server). llama.cpp adds
  ``id``; nbllm serve adds ``token_id``, and reports the end-of-sequence token
  too, marked ``special``, so its probability is known; mlx_lm.server sends ``id`` with the raw
  vocabulary entry as ``token`` and only without streaming.
- Legacy completions with ``logprobs: k``: ``{tokens, token_logprobs, top_logprobs: [{text: logprob}]}``
  (vLLM, SGLang); mlx_lm.server and nbllm serve answer in the chat shape above.
- Streaming: ``data: {json}`` events, ``data: [DONE]``; ``stream_options: {include_usage: true}``
  adds a last event with ``usage`` (``prompt_tokens_details.cached_tokens`` where the server counts it).
- Structured output: ``response_format: {type: json_schema, json_schema: {name, schema}}``
  (all but mlx_lm.server); regex and choices: vLLM's ``structured_outputs``
  (https://docs.vllm.ai/en/latest/features/structured_outputs.html, which nbllm serve also
  takes), SGLang's ``regex`` extra parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..decode import byte_level_text
from ..sampling import SamplingParams

__all__ = ["Entry", "entries_of", "sampling_fields", "usage_of", "text_of", "logprob_fields"]


@dataclass(frozen=True)
class Entry:
    """One token as a server reported it: its text, its id (when given), logprob and alternatives."""

    piece: str
    id: int | None
    logprob: float | None
    top: tuple[tuple[str, int | None, float], ...] = ()
    special: bool = False  # nbllm serve marks the end-of-sequence token it reports
    raw: bytes | None = None  # the token's bytes (OpenAI's ``bytes``): a partial character stays partial


def entries_of(choice: dict[str, Any], raw_pieces: bool = False) -> list[Entry]:
    """The token entries of one choice (either logprobs shape); ``[]`` when the server sent none.

    ``raw_pieces``: the server reports vocabulary entries (``'ĠParis'``), turned into text here.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    fix = byte_level_text if raw_pieces else _text
    if isinstance(logprobs.get("content"), list):
        out = []
        for item in logprobs["content"]:
            if not isinstance(item, dict) or "logprob" not in item:
                continue
            top = tuple(
                (fix(t.get("token", "")), _id(t), _logprob(t.get("logprob")))
                for t in item.get("top_logprobs") or ()
                if isinstance(t, dict)
            )
            special = item.get("special") is True
            raw = _bytes(item.get("bytes"))
            out.append(Entry(fix(item.get("token", "")), _id(item), _logprob(item["logprob"]), top, special, raw))
        return out
    tokens = logprobs.get("tokens")
    if isinstance(tokens, list):  # the legacy completions shape
        lps = logprobs.get("token_logprobs") or [None] * len(tokens)
        tops = logprobs.get("top_logprobs") or [None] * len(tokens)
        return [
            Entry(fix(str(t)), None, _logprob(lp), tuple((fix(k), None, _logprob(v)) for k, v in (top or {}).items()))
            for t, lp, top in zip(tokens, lps, tops)
        ]
    return []


def _bytes(value: Any) -> bytes | None:
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value)
    return None


def _text(piece: Any) -> str:
    return str(piece)


def _id(item: dict[str, Any]) -> int | None:
    for name in ("token_id", "id"):
        value = item.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _logprob(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return -math.inf
    return v if not math.isnan(v) else -math.inf


def text_of(choice: dict[str, Any]) -> str:
    """A choice's new text: ``delta.content`` (streamed chat), ``message.content`` or ``text``."""
    for key in ("delta", "message"):
        part = choice.get(key)
        if isinstance(part, dict):
            return str(part.get("content") or "")
    return str(choice.get("text") or "")


def usage_of(event: dict[str, Any]) -> tuple[int, int] | None:
    """``(prompt_tokens, cached_tokens)`` from an event's ``usage``, if it has one."""
    usage = event.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return None
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return usage["prompt_tokens"], int(cached) if isinstance(cached, int) else 0


def logprob_fields(chat: bool, k: int, legacy_int: bool) -> dict[str, Any]:
    """Ask for each token's logprob and ``k`` alternatives (chat shape, or the legacy completions integer)."""
    if chat or not legacy_int:
        return {"logprobs": True, "top_logprobs": k}
    return {"logprobs": k}


def sampling_fields(params: SamplingParams, logit_bias: dict[int, float] | None) -> dict[str, Any]:
    """The sampler as OpenAI fields plus the common extensions (top_k, min_p, repetition_penalty, xtc)."""
    out: dict[str, Any] = {"temperature": params.temperature}
    if params.top_p < 1.0:
        out["top_p"] = params.top_p
    if params.top_k:
        out["top_k"] = params.top_k
    if params.min_p:
        out["min_p"] = params.min_p
    if params.seed is not None:
        out["seed"] = params.seed
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(params, name)
        if value is not None:
            out[name] = value
    if params.xtc_probability:
        out["xtc_probability"], out["xtc_threshold"] = params.xtc_probability, params.xtc_threshold
    if logit_bias:
        if min(logit_bias) < 0:
            raise ValueError("logit_bias: this server reports no token ids; give ids from its own vocabulary")
        out["logit_bias"] = {str(k): v for k, v in logit_bias.items()}
    return out
