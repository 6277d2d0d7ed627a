"""The methods every model handle offers, written once: a local ``LM`` and a ``RemoteLM`` share them.

Each one hands the handle to the function that does the work (``stream``,
``generate``, ``Stepper``, and the inside-the-model tools, which refuse in one
line a model whose weights are not in this process).
"""

from __future__ import annotations

from typing import Any

from .generate import TokenStream, generate, stream
from .inside import AttentionMap, LogitLens, Scored, attention, logit_lens, score
from .stepper import Stepper
from .tokens import Completion

__all__ = ["HandleMethods"]


class HandleMethods:
    """``stream``, ``generate``, ``stepper``, ``logit_lens``, ``attention`` and ``score`` on the handle itself."""

    # -- generation ------------------------------------------------------------
    def stream(self, prompt: Any, **kwargs: Any) -> TokenStream:
        """Stream ``Token`` records; see ``nbllm.stream``."""
        return stream(self, prompt, **kwargs)  # type: ignore[arg-type]

    def generate(self, prompt: Any, **kwargs: Any) -> Completion:
        """Generate to the end and return a ``Completion``; see ``nbllm.generate``."""
        return generate(self, prompt, **kwargs)  # type: ignore[arg-type]

    def stepper(self, prompt: Any, **kwargs: Any) -> Stepper:
        """A token-at-a-time ``Stepper``; see ``nbllm.Stepper``."""
        return Stepper(self, prompt, **kwargs)  # type: ignore[arg-type]

    # -- inside the model ------------------------------------------------------
    def logit_lens(self, prompt: Any, *, top_k: int = 5, **encode: Any) -> LogitLens:
        """What every layer already predicts at every position; see ``nbllm.inside.logit_lens``."""
        return logit_lens(self, prompt, top_k=top_k, **encode)

    def attention(self, prompt: Any, **encode: Any) -> AttentionMap:
        """Every attention layer's weights over the prompt; see ``nbllm.inside.attention``."""
        return attention(self, prompt, **encode)

    def score(self, text: Any, **kwargs: Any) -> Scored:
        """How likely the model finds a given text, token by token; see ``nbllm.inside.score``."""
        return score(self, text, **kwargs)
