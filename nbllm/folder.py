"""A model folder on disk: its config, its tokenizer, and the dtype rule for its weights.

Shared by text and vision loading; every way a folder can be unusable ends in
one line that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

__all__ = ["read_config", "read_json", "load_tokenizer", "cast_weights"]

# Cast half-precision weights to fp32 on CPU only while that stays small: fp32
# reaches BLAS (fast), bf16/fp16 matmuls do not on MLX's CPU backend.
_FP32_BUDGET_BYTES = 4 * 1024**3
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{path} is not a model folder: expected config.json and *.safetensors weights")
    config = read_json(cfg_file)
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{cfg_file} has no model_type: expected a Hugging Face / MLX model config")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"{path} is not a model folder: no *.safetensors weights")
    return config


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{file} is not valid JSON: {str(err)[:120]}") from None


def load_tokenizer(path: Path, eos_token_ids: Any = None) -> Any:
    """mlx-lm's tokenizer for a model folder; a missing or broken file is named in one line."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    present = [f for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model") if (path / f).exists()]
    if not present and not list(path.glob("*.tiktoken")):
        raise ValueError(
            f"{path} has no tokenizer: expected tokenizer.json (or tokenizer.model, vocab.json + merges.txt)"
        )
    for name in _TOKENIZER_JSON:
        if (path / name).exists():
            read_json(path / name)
    try:
        return mlx_load_tokenizer(path, eos_token_ids=eos_token_ids)
    except Exception as err:  # tokenizers/transformers raise many types for a damaged file
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not read the tokenizer ({', '.join(present)}) in {path}: {first}") from None


def cast_weights(model: Any, config: dict[str, Any], dtype: str | None) -> str:
    """Apply ``load``'s ``dtype`` rule to ``model``; returns the dtype the weights were stored in."""
    from mlx.utils import tree_flatten

    weights = [v for _, v in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))]
    floats = [v.dtype for v in weights if mx.issubdtype(v.dtype, mx.floating)]
    stored = str(floats[0]).replace("mlx.core.", "") if floats else "?"
    if dtype is None:
        return stored
    if dtype == "auto":
        if mx.default_device() != mx.cpu or config.get("quantization"):
            return stored
        if not any(d in (mx.float16, mx.bfloat16) for d in floats):
            return stored
        if sum(v.size for v in weights) * 4 > _FP32_BUDGET_BYTES:
            return stored
        dtype = "float32"
    model.set_dtype(getattr(mx, dtype))
    # The cast is lazy, scheduled on this thread's stream; MLX ties streams to threads, so
    # a first generation on another thread (a server's worker) could not evaluate it.
    mx.eval(model.parameters())
    return stored
