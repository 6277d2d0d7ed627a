"""What a server can do, found out once per connection with a few one-token requests.

Servers that speak the same API differ in what they return (see
``nbllm.remote.wire``). The probe asks, in at most five small requests: which
server it is (``/v1/models``' ``owned_by``), whether streamed chunks carry
``logprobs`` and how many alternatives, whether non-streamed replies do,
whether raw ``/v1/completions`` works. What it cannot ask cheaply (structured
output, continuing a partial reply) comes from the server's documentation,
per kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .http import Client
from .wire import entries_of

__all__ = ["Capabilities", "probe", "kind_of"]

# owned_by (or the model id's form) -> kind
_OWNERS = {"nbllm": "nbllm", "vllm": "vllm", "sglang": "sglang", "llamacpp": "llama.cpp", "library": "ollama"}
# Per kind, from each server's documentation: json_schema response_format; regex/choices extension; assistant prefill.
_DOCUMENTED: dict[str, tuple[bool, str | None, bool]] = {
    "nbllm": (True, "structured_outputs", True),
    "vllm": (True, "structured_outputs", True),
    "sglang": (True, "regex", True),
    "llama.cpp": (True, "gbnf", True),  # `grammar` (GBNF); a last assistant message is continued
    "ollama": (True, None, False),
    "mlx_lm": (False, None, False),
    "unknown": (True, None, False),
}


@dataclass(frozen=True)
class Capabilities:
    """What one server does.

    Attributes:
        kind: ``nbllm``, ``vllm``, ``sglang``, ``llama.cpp``, ``ollama``, ``mlx_lm`` or ``unknown``.
        model: The model id requests name.
        streamed_logprobs: Streamed chunks carry each token's logprob and alternatives.
        max_top_logprobs: Most alternatives per token it returns (0: no logprobs at all).
        completions: Raw text completion (``/v1/completions``) works.
        token_ids: Its logprob entries carry token ids.
        json_schema: It takes ``response_format`` with a JSON Schema (documented).
        constraints: Its extension for regex and choices (``None``: none documented).
        prefill: It continues a partial assistant message (the stepper on a chat prompt needs it).
        raw_pieces: It reports vocabulary entries (``'ĠParis'``) rather than text.
        images: Whether the model takes images, when the server says (``capabilities`` in
            ``/v1/models``, as nbllm serve and Ollama list them); ``None``: not said (then a
            text-only server refuses an image with its own message).
    """

    kind: str
    model: str
    streamed_logprobs: bool
    max_top_logprobs: int
    completions: bool
    token_ids: bool
    json_schema: bool
    constraints: str | None
    prefill: bool
    raw_pieces: bool
    images: bool | None = None

    def lacks(self, what: str) -> str:
        """One line naming what this server cannot do, for errors and views."""
        return f"{self.kind} server ({self.model}): {what}"


def _images(models: Any, model: str) -> bool | None:
    data = models.get("data") if isinstance(models, dict) else None
    entry = next((m for m in data or [] if isinstance(m, dict) and m.get("id") == model), None)
    listed = entry.get("capabilities") if entry else None
    return "vision" in listed if isinstance(listed, list) else None


def kind_of(models: Any) -> tuple[str, list[str]]:
    """The server's kind and the model ids from a ``/v1/models`` reply."""
    data = models.get("data") if isinstance(models, dict) else None
    entries = [m for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    ids = [m["id"] for m in entries]
    owners = {str(m.get("owned_by", "")).lower() for m in entries}
    for owner, kind in _OWNERS.items():
        if owner in owners:
            return kind, ids
    if any(m.get("object") == "model" and "owned_by" not in m for m in entries):
        return "mlx_lm", ids  # mlx_lm.server lists local models without an owner
    return "unknown", ids


def probe(client: Client, model: str | None) -> Capabilities:
    """Ask the server what it can do (a handful of one-token requests).

    Raises:
        ConnectionError: The server is not there or does not speak the API.
        ValueError: ``model`` is not one it serves (when it lists them).
    """
    try:
        listing = client.get("/models")
        kind, ids = kind_of(listing)
    except (ConnectionError, ValueError) as err:
        if model is None:
            raise ValueError(f"{client.base_url}: the server did not list its models ({err}); pass model=") from None
        listing, kind, ids = None, "unknown", []
    if model is None:
        if not ids:
            raise ValueError(f"{client.base_url}: the server lists no models; pass model=")
        model = ids[0]
    elif ids and model not in ids and kind in ("nbllm", "vllm", "sglang"):
        raise ValueError(f"model: expected one of {ids} (what {client.base_url} serves), got {model!r}")
    hello = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    streamed, top = 0, 0
    for k in (20, 10, 5):
        try:
            events = list(client.stream("/chat/completions", dict(hello, logprobs=True, top_logprobs=k)))
        except ValueError:
            continue  # refused this many alternatives: try fewer
        found = [e for ev in events for c in ev.get("choices") or () for e in entries_of(c)]
        streamed = max((len(e.top) for e in found), default=0) if found else 0
        top = k
        break
    has_stream_lp = streamed > 0
    ids_given, plain = False, 0
    try:
        reply = client.post("/chat/completions", dict(hello, logprobs=True, top_logprobs=min(top, 10) or 5))
        found = [e for c in reply.get("choices") or () for e in entries_of(c)]
        plain = max((len(e.top) for e in found), default=0)
        ids_given = any(e.id is not None for e in found)
    except ValueError:
        pass
    completions = True
    try:
        client.post("/completions", {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0})
    except ValueError:
        completions = False
    json_schema, constraints, prefill = _DOCUMENTED[kind]
    return Capabilities(
        kind=kind,
        model=model,
        streamed_logprobs=has_stream_lp,
        max_top_logprobs=streamed if has_stream_lp else plain,
        completions=completions,
        token_ids=ids_given,
        json_schema=json_schema,
        constraints=constraints,
        prefill=prefill,
        raw_pieces=kind == "mlx_lm",
        images=_images(listing, model),
    )
