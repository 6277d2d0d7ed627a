"""The ``LM`` handle: a loaded model, its tokenizer, its engine, and prompts turned into ``Prompt`` records."""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from .handle import HandleMethods
from .mlx_engine import MLXEngine
from .prompt import Prompt, check_text

__all__ = ["LM", "ModelInfo", "as_list", "is_messages", "checked_messages", "with_system"]


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is.

    Attributes:
        name: Hub id or folder name.
        path: Local folder the weights came from.
        architecture: mlx-lm / mlx-vlm ``model_type``.
        parameters: Parameter count.
        dtype: Dtype of the (unquantized) weights in memory.
        stored_dtype: Dtype of the weights in the files (differs when ``load`` cast them).
        weights_gb: Memory the weights take now, in GB (an fp16 model cast to fp32 takes twice its files).
        quantization_bits: Bits per weight when quantized, else ``None``.
        vocab_size: Output vocabulary size.
        context_length: Maximum positions from the config (``None`` if unknown).
        has_chat_template: Whether prompts are wrapped in a chat template by default.
        is_vision: Whether the model accepts images.
        device: ``cpu`` or ``gpu`` (Metal).
        blas: Which BLAS the CPU backend's matmuls use (see ``nbllm.blas_status``).
        cpu_attention: Whether long prompts' attention on the CPU backend uses nbllm's C softmax, or why not.
        load_seconds: Wall time of ``load``.
        bits_per_weight: Mean bits per parameter (32 for fp32; about 4.5 for 4-bit groups of 64).
        disk_gb: Size of the weight files the handle was loaded from or saved to (``None``: only in memory).
        adapters: The adapter folder applied (``None``: none).
    """

    name: str
    path: str
    architecture: str
    parameters: int
    dtype: str
    stored_dtype: str
    weights_gb: float
    quantization_bits: int | None
    vocab_size: int
    context_length: int | None
    has_chat_template: bool
    is_vision: bool
    device: str
    blas: str
    cpu_attention: str
    load_seconds: float
    bits_per_weight: float = 0.0
    disk_gb: float | None = None
    adapters: str | None = None


class LM(HandleMethods):
    """A loaded language model: the mlx module, its tokenizer, its config and its engine.

    Use ``lm.encode(prompt)`` for the ``Prompt`` the model sees, and
    ``lm.stream(...)``, ``lm.generate(...)``, ``lm.stepper(...)`` (see
    ``nbllm.stream`` for the options).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: dict[str, Any],
        name: str,
        path: Path,
        load_seconds: float = 0.0,
        stored_dtype: str | None = None,
        loader: Callable[..., LM] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.path = Path(path)
        self.pieces: dict[int, str] = {}
        text_cfg = config.get("text_config", {}) or {}
        self.vocab_size = int(config.get("vocab_size") or text_cfg.get("vocab_size") or len(tokenizer._tokenizer))
        ctx = config.get("max_position_embeddings") or text_cfg.get("max_position_embeddings")
        self._context = int(ctx) if ctx else None
        self._load_seconds = load_seconds
        self._stored_dtype = stored_dtype
        self._loader = loader  # how this model was loaded: load_related() loads others the same way
        self.adapter_path: Path | None = None  # the adapter folder applied (nbllm.adapt)
        self.disk_path: Path | None = self.path  # where these exact weights are on disk (None: memory only)
        self._engine = self._make_engine()

    def load_related(self, name_or_path: Any) -> LM:
        """Load another model the way this one was loaded (``nbllm.load``), e.g. a draft model given by path."""
        if self._loader is None:
            raise ValueError(
                f"{self.name} was not loaded with nbllm.load; load the other model with nbllm.load yourself"
            )
        return self._loader(name_or_path)

    def _make_engine(self) -> MLXEngine:
        return MLXEngine(self.model, self.tokenizer, self.vocab_size)

    # -- description -------------------------------------------------------
    @property
    def engine(self) -> MLXEngine:
        """The engine that runs this model's requests (in this process, on MLX)."""
        return self._engine

    @property
    def context_length(self) -> int | None:
        """Most prompt tokens the model takes (from its config; ``None`` if unknown)."""
        return self._context

    @property
    def is_vision(self) -> bool:
        return False

    @property
    def info(self) -> ModelInfo:
        from mlx.utils import tree_flatten

        from .blas import blas_status
        from .sdpa import softmax_status

        params = cast(list[tuple[str, mx.array]], tree_flatten(self.model.parameters()))
        weights = [v for k, v in params if not k.endswith((".scales", ".biases"))]
        dtype = next((_dtype_name(v.dtype) for v in weights if mx.issubdtype(v.dtype, mx.floating)), "?")
        quant = self.config.get("quantization") or {}
        return ModelInfo(
            name=self.name,
            path=str(self.path),
            architecture=str(self.config.get("model_type", "?")),
            parameters=_count_parameters(self.model),
            dtype=dtype,
            stored_dtype=self._stored_dtype or dtype,
            weights_gb=round(sum(int(v.nbytes) for _, v in params) / 1e9, 3),
            quantization_bits=quant.get("bits"),
            vocab_size=self.vocab_size,
            context_length=self._context,
            has_chat_template=bool(getattr(self.tokenizer, "has_chat_template", False)),
            is_vision=self.is_vision,
            device="gpu" if mx.default_device() == mx.gpu else "cpu",
            blas=_blas_summary(blas_status()),
            cpu_attention=softmax_status() if mx.default_device() == mx.cpu else "Metal: MLX's own kernel",
            load_seconds=round(self._load_seconds, 3),
            bits_per_weight=round(_bits_per_weight(self.model), 2),
            disk_gb=_disk_gb(self.disk_path),
            adapters=str(self.adapter_path) if self.adapter_path is not None else None,
        )

    def __repr__(self) -> str:
        i = self.info
        return f"{type(self).__name__}({i.name!r}, {i.architecture}, {_human(i.parameters)} params, {i.dtype}, vocab {i.vocab_size})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in asdict(self.info).items()
        )
        return f"<table class='nbllm-info'><caption style='text-align:left'><b>nbllm model</b></caption>{rows}</table>"

    # -- changing the model (nbllm.adapt) ----------------------------------------
    def with_adapters(self, adapter_path: str | os.PathLike[str]) -> LM:
        """A new handle with the LoRA/DoRA adapters in ``adapter_path`` applied; this one is unchanged."""
        from .adapt import with_adapters

        return cast(LM, with_adapters(self, adapter_path))

    def fuse(self, *, dequantize: bool = False) -> LM:
        """A new handle with its adapters merged into the weights; see ``nbllm.adapt.fuse``."""
        from .adapt import fuse

        return cast(LM, fuse(self, dequantize=dequantize))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write a standard MLX model folder (``mlx_lm.load`` and ``nbllm.load`` read it); returns its path."""
        from .adapt import save_folder

        return save_folder(self, folder)

    # -- prompts -----------------------------------------------------------
    def encode(self, prompt: Any, *, system: str | None = None, raw: bool = False, images: Any = None) -> Prompt:
        """Turn a prompt into the ``Prompt`` record the model sees.

        Args:
            prompt: Text, a list of chat messages (``{"role", "content"}``), token
                ids, or a ``Prompt`` (returned as is).
            system: System message, placed first when the chat template is used.
            raw: Plain completion: no chat template even when the tokenizer has one.
            images: Image(s) for a vision model (path, URL, PIL image, array, bytes).

        Returns:
            A ``Prompt`` (never empty). Text goes through the chat template when
            the tokenizer has one, unless ``raw``; ids are taken as they are.
        """
        if isinstance(prompt, Prompt):
            if system is not None or raw or images is not None:
                raise ValueError("prompt: an encoded Prompt takes no system=, raw= or images=")
            return prompt
        pictures = as_list(images)
        template = bool(getattr(self.tokenizer, "has_chat_template", False))
        if _is_ids(prompt):
            return self._from_ids(list(prompt), pictures)
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            if raw or not template:
                if system is not None:
                    raise ValueError(
                        "system: expected no system message with raw=True or a model without a chat template"
                    )
                return self._from_text(prompt, pictures)
            messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        elif is_messages(prompt):
            if not template:
                raise ValueError("prompt: chat messages need a model with a chat template; pass text with raw=True")
            messages = checked_messages(prompt)
        else:
            raise TypeError(
                f"prompt: expected str, list of token ids or list of chat messages, got {type(prompt).__name__}"
            )
        return self._from_messages(with_system(messages, system), pictures)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))

    # The image steps (``VisionLM`` overrides these three).
    def _from_ids(self, ids: list[int], images: list[Any]) -> Prompt:
        _no_images(self, images)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt: expected token ids in [0, {self.vocab_size}), got {bad[:3]}")
        return Prompt.of(_non_empty(ids))

    def _from_text(self, text: str, images: list[Any]) -> Prompt:
        _no_images(self, images)
        bos = self.tokenizer.bos_token
        ids = self.tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
        return Prompt.of(_non_empty(ids))

    def _from_messages(self, messages: list[dict[str, Any]], images: list[Any]) -> Prompt:
        _no_images(self, images)
        if any(not isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"images: {self.name} is a text-only model; message content must be text")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return Prompt.of(_non_empty(list(ids)), continuation=False)


def as_list(images: Any) -> list[Any]:
    """``None`` -> ``[]``, one image -> ``[image]``, a list or tuple -> a list."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def is_messages(prompt: Any) -> bool:
    """Whether ``prompt`` is a non-empty list of ``{"role": ...}`` dicts."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(m, dict) and "role" in m for m in prompt)
    )


def _is_ids(prompt: Any) -> bool:
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )


def checked_messages(prompt: Any) -> list[dict[str, Any]]:
    """Copies of chat messages whose text the tokenizer can encode."""
    messages = [dict(m) for m in prompt]
    for i, m in enumerate(messages):
        _check_content(m.get("content"), f"prompt[{i}]")
    return messages


def with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """``messages`` with ``system`` as the first (and only) system message, when given."""
    if system is None:
        return messages
    check_text(system, "system")
    return [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        check_text(content, where)
    elif isinstance(content, (list, tuple)):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                check_text(part["text"], where)


def _no_images(lm: LM, images: list[Any]) -> None:
    if images:
        raise ValueError(f"images: {lm.name} is a text-only model; load a vision model to use images")


def _non_empty(ids: list[int]) -> list[int]:
    if not ids:
        raise ValueError("prompt: expected at least one token, got an empty prompt")
    return ids


def _blas_summary(status: dict[str, Any]) -> str:
    if status.get("summary"):
        return str(status["summary"])
    return f"OpenBLAS ({status['path']})" if status.get("loaded") else f"built-in ({status.get('reason', '')})"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("mlx.core.", "")


def _count_parameters(model: Any) -> int:
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model))


def _bits_per_weight(model: Any) -> float:
    from mlx_lm.utils import compute_bits_per_weight

    return float(compute_bits_per_weight(model))


def _disk_gb(path: Path | None) -> float | None:
    files = list(path.glob("*.safetensors")) if path is not None and path.is_dir() else []
    return round(sum(f.stat().st_size for f in files) / 1e9, 4) if files else None


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
