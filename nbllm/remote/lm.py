"""``nbllm.connect``: a model on an OpenAI-compatible server, used like a loaded ``LM``.

``RemoteLM`` is a model handle (see ``nbllm.engine.ModelHandle``): ``stream``,
``generate``, ``stepper``, ``Chat``, the views and the magics take it as they
take a local model. Prompts stay text or chat messages (the server applies
its own tokenizer and chat template); tokens come back as the pieces the
server reports (see ``nbllm.remote.vocab``). What needs the weights in this
process (the logit lens, attention, scoring, speculative decoding, logits
processors) says so in one line.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..handle import HandleMethods
from ..model import as_list, checked_messages, is_messages, with_system
from ..prompt import Prompt, check_text
from .caps import Capabilities, probe
from .constraint import ServerConstraint
from .engine import RemoteEngine
from .http import Client
from .images import image_part
from .vocab import RemoteTokenizer

__all__ = ["RemoteLM", "RemotePrompt", "connect"]


@dataclass(frozen=True, eq=False)
class RemotePrompt(Prompt):
    """A prompt the server will tokenize: raw ``text`` (continuation) or chat ``messages``.

    ``ids`` holds token ids only for a prompt given as ids.
    """

    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None

    def __repr__(self) -> str:
        kind = "continuation" if self.continuation else f"chat, {len(self.messages or ())} message(s)"
        return f"RemotePrompt({kind})"


class RemoteLM(HandleMethods):
    """A model served over HTTP (vLLM, SGLang, llama.cpp, Ollama, mlx_lm.server, ``nbllm serve``).

    Made by ``nbllm.connect``. ``caps`` says what the server can do (probed
    once, on first use).
    """

    is_remote = True
    context_length: int | None = None  # the server checks the context
    vocab_size = 1 << 31  # unknown here: ids are the server's (or local keys, see nbllm.remote.vocab)

    def __init__(self, client: Client, model: str | None = None):
        self.client = client
        self.tokenizer = RemoteTokenizer()
        self.pieces = self.tokenizer.pieces
        self._model = model
        self._caps: Capabilities | None = None
        self._lock = threading.Lock()
        self._engine = RemoteEngine(client, lambda: self.caps, self.tokenizer)

    @property
    def caps(self) -> Capabilities:
        """What the server can do (probed on first use)."""
        with self._lock:
            if self._caps is None:
                self._caps = probe(self.client, self._model)
            return self._caps

    @property
    def name(self) -> str:
        return self._model or self.caps.model

    @property
    def engine(self) -> RemoteEngine:
        return self._engine

    @property
    def is_vision(self) -> bool:
        """Whether to send images: the server said its model takes them, or did not say (then it may refuse)."""
        return self.caps.images is not False

    @property
    def chat_class(self) -> type:
        """What ``nbllm.Chat(this model)`` makes: a chat that sends the history to the server."""
        from .chat import RemoteChat

        return RemoteChat

    def server_constraint(self, **spec: Any) -> ServerConstraint:
        return ServerConstraint.make(**spec)

    def __repr__(self) -> str:
        caps = self._caps
        what = f"{caps.kind}, {caps.max_top_logprobs} alternatives" if caps else "not probed yet"
        return f"RemoteLM({self._model or (caps.model if caps else '?')!r} at {self.client.base_url}, {what})"

    # -- prompts -----------------------------------------------------------------------
    def encode(self, prompt: Any, *, system: str | None = None, raw: bool = False, images: Any = None) -> Prompt:
        """The prompt as the server will get it: raw text, token ids or chat messages (see ``LM.encode``)."""
        if isinstance(prompt, Prompt):
            if system is not None or raw or images is not None:
                raise ValueError("prompt: an encoded Prompt takes no system=, raw= or images=")
            return prompt
        pictures = [image_part(p) for p in as_list(images)]
        if pictures and not self.is_vision:
            raise ValueError(f"images: {self.name} is a text-only model (its server says so)")
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            if not prompt:
                raise ValueError("prompt: expected at least one character, got an empty prompt")
            if raw:
                if system is not None or pictures:
                    raise ValueError("prompt: raw=True takes no system message or images; use a chat prompt")
                return RemotePrompt(ids=(), continuation=True, text=prompt)
            messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        elif is_messages(prompt):
            messages = checked_messages(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            if pictures or system is not None:
                raise ValueError("prompt: token ids take no system message or images")
            return RemotePrompt(ids=tuple(int(t) for t in prompt), continuation=True)
        else:
            raise TypeError(
                f"prompt: expected str, list of token ids or list of chat messages, got {type(prompt).__name__}"
            )
        messages = with_system(messages, system)
        if pictures:
            last = next(i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user")
            text = messages[last]["content"]
            messages[last] = dict(messages[last], content=[*pictures, {"type": "text", "text": text}])
        return RemotePrompt(ids=(), continuation=False, messages=tuple(messages))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def close(self) -> None:
        self.client.close()


def connect(base_url: str, *, model: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> RemoteLM:
    """A model on an OpenAI-compatible server, usable wherever a loaded model is.

    Args:
        base_url: The server, e.g. ``http://127.0.0.1:8000`` or ``.../v1``.
        model: The model id to request (default: the first the server lists).
        api_key: Bearer token (default: ``$NBLLM_API_KEY`` or ``$OPENAI_API_KEY`` if set).
        timeout: Seconds to wait to connect and between bytes of a reply.

    Nothing is sent until the model is first used; then a few one-token
    requests find out what the server can do (``lm.caps``).
    """
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError(f"model: expected a model id string or None, got {model!r}")
    key = api_key if api_key is not None else os.environ.get("NBLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return RemoteLM(Client(base_url, key, timeout), model)
