"""The OpenAI-compatible replies of ``nbllm serve``: token records to chunks and whole replies.

Every token's ``logprobs`` with up to 20 ``top_logprobs`` (streamed too), each
entry with ``token_id`` and its real ``bytes`` as well as ``token``; the
end-of-sequence token reported too, marked ``special``; ``usage`` with
``prompt_tokens_details.cached_tokens``; the prompt's ``prompt_token_ids`` when
asked (``return_token_ids``, vLLM's names).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..tokens import Stats, Token
from .protocol import Call

__all__ = ["chunk", "final_reply", "usage", "finish_of"]


def _entry(token: Token, with_top: bool, bytes_of: Callable[[int], bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "token": token.piece,
        "token_id": token.id,
        "logprob": _finite(token.logprob),
        "bytes": list(bytes_of(token.id)),
    }
    if token.special:
        out["special"] = True  # the end-of-sequence token: not part of the text
    if with_top:
        out["top_logprobs"] = [
            {
                "token": a.piece,
                "token_id": a.id,
                "logprob": _finite(a.logprob),
                "bytes": list(bytes_of(a.id)),
            }
            for a in token.top
        ]
    return out


def _finite(value: float) -> float:
    # JSON has no -Infinity or NaN; OpenAI writes -9999.0 for a token the model rules out.
    return value if math.isfinite(value) else -9999.0


def _logprobs_field(tokens: list[Token], call: Call) -> dict[str, Any] | None:
    if not call.logprobs:
        return None
    content = [_entry(t, True, call.bytes_of) for t in tokens]
    if call.chat:
        return {"content": content}
    # completions: the legacy shape too, so OpenAI's client reads it
    return {
        "content": content,
        "tokens": [e["token"] for e in content],
        "token_logprobs": [e["logprob"] for e in content],
        "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in content],
        "text_offset": [],
    }


def finish_of(token: Token | None) -> str | None:
    reason = token.finish_reason if token is not None else None
    return {"stop_string": "stop", "cancelled": "stop"}.get(reason or "", reason)


def chunk(
    call: Call, model: str, tokens: list[Token], text: str, finish: str | None, first: bool, prompt_ids: Any = None
) -> dict[str, Any]:
    """One streamed event for ``tokens`` (usually one); the first carries the prompt's ids when asked."""
    choice: dict[str, Any] = {"index": 0, "logprobs": _logprobs_field(tokens, call), "finish_reason": finish}
    if call.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text
    kind = "chat.completion.chunk" if call.chat else "text_completion"
    out = {"id": _id(call), "object": kind, "created": call.created, "model": model, "choices": [choice]}
    if first and call.return_ids and prompt_ids is not None:
        out["prompt_token_ids"] = list(prompt_ids)
    return out


def final_reply(call: Call, model: str, tokens: list[Token], stats: Stats, prompt_ids: Any = None) -> dict[str, Any]:
    """The whole reply (``stream: false``)."""
    text = "".join(t.text for t in tokens)
    finish = finish_of(tokens[-1] if tokens else None) or "stop"
    choice: dict[str, Any] = {"index": 0, "logprobs": _logprobs_field(tokens, call), "finish_reason": finish}
    if call.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    kind = "chat.completion" if call.chat else "text_completion"
    out = {"id": _id(call), "object": kind, "created": call.created, "model": model, "choices": [choice]}
    out["usage"] = usage(stats)
    if call.return_ids and prompt_ids is not None:
        out["prompt_token_ids"] = list(prompt_ids)  # vLLM's name for it
    return out


def usage(stats: Stats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def _id(call: Call) -> str:
    return ("chatcmpl-" if call.chat else "cmpl-") + call.id
