"""Remote engines: models on OpenAI-compatible servers behind nbllm's engine seam (``nbllm.connect``)."""

from .caps import Capabilities
from .lm import RemoteLM, RemotePrompt, connect

__all__ = ["connect", "RemoteLM", "RemotePrompt", "Capabilities"]
