"""nbllm: run and understand local MLX language models in Jupyter."""

from __future__ import annotations

from .blas import enable_fast_blas as _enable_fast_blas

# Must run before mlx.core is first imported (see nbllm.blas).
_enable_fast_blas()

from .adapt import FineTune, finetune, quantize  # noqa: E402
from .blas import blas_status  # noqa: E402
from .cache import PromptCache  # noqa: E402
from .chat import Chat, ChatReply  # noqa: E402
from .distribution import Distribution  # noqa: E402
from .generate import TokenStream, generate, stream  # noqa: E402
from .inside import AttentionMap, Comparison, LogitLens, Scored, compare  # noqa: E402
from .loading import load  # noqa: E402
from .model import LM, ModelInfo  # noqa: E402
from .prompt import Prompt  # noqa: E402
from .remote import RemoteLM, connect  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .stepper import Stepper  # noqa: E402
from .structured import Constraint, StructuredOutputError, make_constraint  # noqa: E402
from .tokens import Alternative, Completion, Stats, Token, TurnStats  # noqa: E402
from .version import __version__  # noqa: E402
from .vision import VisionLM  # noqa: E402


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext nbllm``: register the ``%llm`` / ``%%llm`` magics (see ``nbllm.magics``)."""
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext nbllm``: remove the magics."""
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)


__all__ = [
    "LM",
    "ModelInfo",
    "Prompt",
    "load",
    "connect",
    "RemoteLM",
    "stream",
    "generate",
    "TokenStream",
    "Stepper",
    "VisionLM",
    "make_constraint",
    "Constraint",
    "StructuredOutputError",
    "PromptCache",
    "Chat",
    "ChatReply",
    "Distribution",
    "TurnStats",
    "blas_status",
    "compare",
    "finetune",
    "FineTune",
    "quantize",
    "LogitLens",
    "AttentionMap",
    "Scored",
    "Comparison",
    "SamplingParams",
    "Token",
    "Alternative",
    "Completion",
    "Stats",
    "__version__",
    "load_ipython_extension",
    "unload_ipython_extension",
]
