"""nbllm: run and understand local MLX language models in Jupyter."""

from __future__ import annotations

from .blas import enable_fast_blas as _enable_fast_blas

# Must run before mlx.core is first imported (see nbllm.blas).
_enable_fast_blas()

from .generate import TokenStream, generate, stream  # noqa: E402
from .model import LM, ModelInfo, load  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .stepper import Stepper  # noqa: E402
from .tokens import Alternative, Completion, Stats, Token  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LM",
    "ModelInfo",
    "load",
    "stream",
    "generate",
    "TokenStream",
    "Stepper",
    "SamplingParams",
    "Token",
    "Alternative",
    "Completion",
    "Stats",
    "__version__",
]
