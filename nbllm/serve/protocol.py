"""The OpenAI-compatible API, server side: request bodies to nbllm arguments, tokens to replies.

Requests: ``/v1/chat/completions`` (messages, text and ``image_url`` parts)
and ``/v1/completions`` (a string or token ids). Sampling uses OpenAI's names
where they exist (``temperature``, ``top_p``, ``seed``, ``presence_penalty``,
``frequency_penalty``, ``logit_bias``, ``stop``, ``max_tokens`` /
``max_completion_tokens``) and the common extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``xtc_probability``, ``xtc_threshold``). Structured
output: ``response_format`` (``json_object``, ``json_schema``) and vLLM's
``structured_outputs`` (``regex``, ``choice``, ``json``; also ``guided_regex``,
``guided_choice``). ``continue_final_message`` continues a last assistant
message; ``return_token_ids`` adds the prompt's ``prompt_token_ids`` (vLLM's
names), which the remote stepper then sends back as ids.

The replies are built in ``nbllm.serve.replies``.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..prompt import Prompt

__all__ = ["Call", "BadRequest", "parse_call", "encode_prompt", "MAX_TOP_LOGPROBS"]

MAX_TOP_LOGPROBS = 20
_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "xtc_probability": "xtc_probability",
    "xtc_threshold": "xtc_threshold",
}


class BadRequest(ValueError):
    """A request the server refuses with 400 (or ``status``)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Call:
    """One parsed request."""

    chat: bool
    prompt: Any
    kwargs: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    images: list[Any] = field(default_factory=list)
    continue_final: bool = False
    return_ids: bool = False
    bytes_of: Callable[[int], bytes] = field(default=lambda i: b"", repr=False)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_call(body: Any, chat: bool, allow_image_urls: bool = False) -> Call:
    """Check a request body and turn it into nbllm arguments (``BadRequest`` naming the field otherwise)."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object as the request body")
    if body.get("n", 1) != 1:
        raise BadRequest("n: expected 1 (one choice per request)", param="n")
    kwargs: dict[str, Any] = {}
    for name, ours in _SAMPLING.items():
        if body.get(name) is not None:
            kwargs[ours] = body[name]
    kwargs.setdefault("temperature", 1.0)  # OpenAI's default
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    kwargs["max_tokens"] = 256 if limit is None else limit
    if body.get("stop") is not None:
        kwargs["stop"] = body["stop"]
    if body.get("logit_bias"):
        bias = body["logit_bias"]
        try:
            kwargs["logit_bias"] = {int(k): float(v) for k, v in dict(bias).items()}
        except (TypeError, ValueError):
            raise BadRequest("logit_bias: expected {token id: bias}", param="logit_bias") from None
    call = Call(chat=chat, prompt=None, kwargs=kwargs, stream=bool(body.get("stream", False)))
    call.return_ids = body.get("return_token_ids") is True
    options = body.get("stream_options") or {}
    call.include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    # vLLM's option: usage in every chunk, so a stream cut short still knows its prompt's size and cache hits
    call.continuous_usage = call.include_usage and bool(options.get("continuous_usage_stats"))
    _logprobs(body, call)
    kwargs["top_logprobs"] = call.top_logprobs
    kwargs.update(_structured(body))
    if chat:
        _messages(body, call, allow_image_urls)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ok_ids = (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        )
        if not (isinstance(prompt, str) and prompt) and not ok_ids:
            raise BadRequest("prompt: expected a non-empty string or a list of token ids", param="prompt")
        call.prompt = prompt
    return call


def _logprobs(body: dict[str, Any], call: Call) -> None:
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if isinstance(lp, int) and not isinstance(lp, bool):  # the legacy completions form: logprobs=k
        call.logprobs, top = True, lp if top is None else top
    elif lp not in (None, True, False):
        raise BadRequest("logprobs: expected true/false (or an integer for completions)", param="logprobs")
    else:
        call.logprobs = bool(lp)
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(
                f"top_logprobs: expected an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}", param="top_logprobs"
            )
        if top and not call.logprobs:
            raise BadRequest("top_logprobs: expected logprobs=true with it", param="top_logprobs")
        call.top_logprobs = top


def _structured(body: dict[str, Any]) -> dict[str, Any]:
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            return {"json": True}
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise BadRequest(
                    "response_format.json_schema.schema: expected a JSON Schema object", param="response_format"
                )
            return {"schema": schema}
        if kind != "text":
            raise BadRequest("response_format: expected type text, json_object or json_schema", param="response_format")
    extra = body.get("structured_outputs") or {}
    if not isinstance(extra, dict):
        raise BadRequest("structured_outputs: expected an object", param="structured_outputs")
    regex = extra.get("regex", body.get("guided_regex"))
    choice = extra.get("choice", body.get("guided_choice"))
    schema = extra.get("json", body.get("guided_json"))
    given = {k: v for k, v in {"regex": regex, "choices": choice, "schema": schema}.items() if v is not None}
    if len(given) > 1:
        raise BadRequest(f"expected one structured-output constraint, got {sorted(given)}")
    return given


def _messages(body: dict[str, Any], call: Call, allow_urls: bool) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"messages[{i}]: expected a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            texts, parts = [], []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    call.images.append(_image(part.get("image_url"), allow_urls))
                    parts.append({"type": "image"})  # filled, in order, from images= (nbllm.vision)
                else:
                    raise BadRequest(f"messages[{i}].content: expected text and image_url parts", param="messages")
            content = "".join(texts)
            if parts:
                out.append({"role": m["role"], "content": [*parts, {"type": "text", "text": content}]})
                continue
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: expected a string or a list of parts", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for it
        out.append({"role": role, "content": content})
    call.continue_final = bool(body.get("continue_final_message")) and out[-1]["role"] == "assistant"
    if out[-1]["role"] == "assistant" and not call.continue_final:
        raise BadRequest(
            "messages: the last message is the assistant's; pass continue_final_message=true to continue it"
        )
    call.prompt = out


def _image(spec: Any, allow_urls: bool) -> Any:
    """A data URI as a PIL image; http(s) URLs only when the server allows them; nothing from its files."""
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise BadRequest("image_url: expected {url: ...}", param="messages")
    if url.startswith("data:"):
        from PIL import Image

        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
            image = Image.open(io.BytesIO(data))
            image.load()
        except (IndexError, binascii.Error, OSError, ValueError):
            raise BadRequest("image_url: expected a base64 data URI of an image", param="messages") from None
        return image
    if url.startswith(("http://", "https://")):
        if not allow_urls:
            raise BadRequest(
                "image_url: this server takes data URIs only (start it with --allow-image-urls to fetch URLs)",
                param="messages",
            )
        return url
    raise BadRequest("image_url: expected a data URI (server-side files are never read)", param="messages")


def encode_prompt(lm: Any, call: Call) -> Any:
    """The ``Prompt`` (or text) nbllm generates from, with the chat template for messages."""
    if not call.chat:
        return call.prompt
    if call.continue_final:
        ids = lm.tokenizer.apply_chat_template(
            call.prompt, add_generation_prompt=False, continue_final_message=True, tokenize=True
        )
        return Prompt.of(list(ids), continuation=True)
    return call.prompt
