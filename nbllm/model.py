"""Loading models: ``load()`` and the ``LM`` handle every other module uses."""

from __future__ import annotations

import html
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import mlx.core as mx

if TYPE_CHECKING:
    from .generate import TokenStream
    from .stepper import Stepper
    from .tokens import Completion

__all__ = ["LM", "ModelInfo", "load", "DEFAULT_MODEL_PATH"]

DEFAULT_MODEL_PATH = Path(__file__).parent / "assets" / "default-model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Cast half-precision weights to fp32 on CPU only while that stays small: fp32
# reaches BLAS (fast), bf16/fp16 matmuls do not on MLX's CPU backend.
_FP32_BUDGET_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is.

    Attributes:
        name: Hub id or folder name.
        path: Local folder the weights came from.
        architecture: mlx-lm / mlx-vlm ``model_type``.
        parameters: Parameter count.
        dtype: Dtype of the (unquantized) weights in memory.
        quantization_bits: Bits per weight when quantized, else ``None``.
        vocab_size: Output vocabulary size.
        context_length: Maximum positions from the config (``None`` if unknown).
        has_chat_template: Whether prompts are wrapped in a chat template by default.
        is_vision: Whether the model accepts images.
        load_seconds: Wall time of ``load``.
    """

    name: str
    path: str
    architecture: str
    parameters: int
    dtype: str
    quantization_bits: int | None
    vocab_size: int
    context_length: int | None
    has_chat_template: bool
    is_vision: bool
    load_seconds: float


class LM:
    """A loaded language model: the mlx module, its tokenizer and its config.

    Use ``lm.stream(prompt, ...)``, ``lm.generate(prompt, ...)`` and
    ``lm.stepper(prompt, ...)``; see ``nbllm.generate.stream`` for the options.
    """

    def __init__(self, model: Any, tokenizer: Any, config: dict[str, Any], name: str, path: Path, load_seconds: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.path = Path(path)
        self.pieces: dict[int, str] = {}
        text_cfg = config.get("text_config", {}) or {}
        self.vocab_size = int(config.get("vocab_size") or text_cfg.get("vocab_size") or len(tokenizer._tokenizer))
        self._load_seconds = load_seconds

    # -- description -------------------------------------------------------
    @property
    def is_vision(self) -> bool:
        return False

    @property
    def info(self) -> ModelInfo:
        from mlx.utils import tree_flatten

        params = cast(list[tuple[str, mx.array]], tree_flatten(self.model.parameters()))
        weights = [v for k, v in params if not k.endswith((".scales", ".biases"))]
        dtype = next((str(v.dtype).replace("mlx.core.", "") for v in weights if mx.issubdtype(v.dtype, mx.floating)), "?")
        quant = self.config.get("quantization") or {}
        text_cfg = self.config.get("text_config", {}) or {}
        ctx = self.config.get("max_position_embeddings") or text_cfg.get("max_position_embeddings")
        return ModelInfo(
            name=self.name,
            path=str(self.path),
            architecture=str(self.config.get("model_type", "?")),
            parameters=_count_parameters(self.model),
            dtype=dtype,
            quantization_bits=quant.get("bits"),
            vocab_size=self.vocab_size,
            context_length=int(ctx) if ctx else None,
            has_chat_template=bool(getattr(self.tokenizer, "has_chat_template", False)),
            is_vision=self.is_vision,
            load_seconds=round(self._load_seconds, 3),
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

    # -- prompts -----------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | Sequence[dict[str, Any]], *, system: str | None = None, raw: bool = False) -> list[int]:
        """Turn a prompt into token ids.

        Args:
            prompt: Text, a list of chat messages (``{"role", "content"}``), or token ids.
            system: System message, placed first when the chat template is used.
            raw: Plain completion: no chat template even when the tokenizer has one.

        Returns:
            Token ids (never empty).
        """
        tok = self.tokenizer
        if isinstance(prompt, str):
            use_chat = not raw and tok.has_chat_template
            if use_chat:
                messages = [{"role": "user", "content": prompt}]
            else:
                if system is not None:
                    raise ValueError("system: expected no system message with raw=True or a model without a chat template")
                bos = tok.bos_token
                ids = tok.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
        elif _is_messages(prompt):
            if not tok.has_chat_template:
                raise ValueError("prompt: chat messages need a model with a chat template; pass text with raw=True")
            messages = list(prompt)  # type: ignore[arg-type]
            use_chat = True
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt: expected token ids in [0, {self.vocab_size}), got {bad[:3]}")
            use_chat = False
        else:
            raise TypeError(f"prompt: expected str, list of token ids or list of chat messages, got {type(prompt).__name__}")
        if use_chat:
            if system is not None:
                messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True))
        if not ids:
            raise ValueError("prompt: expected at least one token, got an empty prompt")
        return ids

    def is_chat(self, prompt: Any, raw: bool = False) -> bool:
        """Whether ``encode`` wraps ``prompt`` in the chat template (a reply starts fresh)."""
        return not raw and bool(self.tokenizer.has_chat_template) and (isinstance(prompt, str) or _is_messages(prompt))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))

    def prepare_inputs(self, ids: list[int], images: Sequence[Any] | None) -> mx.array | None:
        """Input embeddings for a prompt with images (vision models); ``None`` for text."""
        if images:
            raise ValueError(f"images: {self.name} is a text-only model; load a vision model to use images")
        return None

    def media_key(self, ids: Sequence[int]) -> tuple[str, ...]:
        """Content hashes of the images behind prompt ``ids`` (none for a text model)."""
        return ()

    # -- generation (thin wrappers, so `lm.stream(...)` reads naturally) ----
    def stream(self, prompt: Any, **kwargs: Any) -> "TokenStream":
        """Stream ``Token`` records; see ``nbllm.stream``."""
        from .generate import stream

        return stream(self, prompt, **kwargs)

    def generate(self, prompt: Any, **kwargs: Any) -> "Completion":
        """Generate to the end and return a ``Completion``; see ``nbllm.generate``."""
        from .generate import generate

        return generate(self, prompt, **kwargs)

    def stepper(self, prompt: Any, **kwargs: Any) -> "Stepper":
        """A token-at-a-time ``Stepper``; see ``nbllm.Stepper``."""
        from .stepper import Stepper

        return Stepper(self, prompt, **kwargs)


def _is_messages(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) and "role" in m for m in prompt)


def _count_parameters(model: Any) -> int:
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model))


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _resolve(name_or_path: str | os.PathLike[str] | None, revision: str | None) -> tuple[str, Path]:
    """Find the local folder for a path, a hub id, or the embedded default."""
    if name_or_path is None:
        if not (DEFAULT_MODEL_PATH / "config.json").exists():
            raise FileNotFoundError(f"the embedded default model is missing from {DEFAULT_MODEL_PATH}; reinstall nbllm")
        return "nbllm/default-model", DEFAULT_MODEL_PATH
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"expected a model folder, got a file: {name}")
        return path.name, path
    if isinstance(name_or_path, Path) or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise FileNotFoundError(f"no model folder at {name!r} (expected a local folder or a hub id like 'mlx-community/SmolLM2-135M-Instruct')")
    return name, _download(name, revision)


def _download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jsonl"]
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise ValueError(f"no model {repo!r} on the Hugging Face hub (or it is private)") from None
    except Exception as err:  # network errors come in many types; try the local cache
        try:
            return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True))
        except Exception:
            first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise ConnectionError(f"could not download {repo!r} from the Hugging Face hub (offline? pass a local path): {first}") from None


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{path} is not a model folder: expected config.json and *.safetensors weights")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{cfg_file} has no model_type: expected a Hugging Face / MLX model config")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"{path} is not a model folder: no *.safetensors weights")
    return config


def load(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LM:
    """Load a model from a local folder, a hub id, or the embedded default.

    Args:
        name_or_path: A local MLX / Hugging Face model folder, a hub id such as
            ``"mlx-community/SmolLM2-135M-Instruct"``, or ``None`` for the small
            model shipped inside nbllm.
        dtype: ``"auto"`` casts half-precision weights to float32 on the CPU
            backend when they fit in 4 GB (fp32 uses BLAS, fp16/bf16 do not);
            ``None`` keeps the stored dtype; or ``"float32"``/``"float16"``/``"bfloat16"``.
        trust_remote_code: Allow a config's custom ``model_file`` code to run.
        revision: Hub branch, tag or commit.

    Returns:
        An ``LM`` (a ``VisionLM`` for vision-language models).
    """
    from . import blas

    status = blas.enable_fast_blas()
    if str(status["reason"]).startswith("mlx.core was imported"):
        import warnings

        warnings.warn("nbllm: mlx.core was imported before nbllm, so the fast BLAS is off (CPU matmuls up to 20x "
                      "slower); import nbllm first", RuntimeWarning, stacklevel=2)
    if dtype not in (None, "auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"dtype: expected 'auto', None, 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    start = time.perf_counter()
    name, path = _resolve(name_or_path, revision)
    config = _read_config(path)
    if "vision_config" in config:
        from .vision import load_vision

        return load_vision(name, path, config, dtype=dtype, trust_remote_code=trust_remote_code)
    model, tokenizer, config = _load_text(path, config, trust_remote_code)
    _cast(model, config, dtype)
    return LM(model, tokenizer, config, name, path, time.perf_counter() - start)


def _load_text(path: Path, config: dict[str, Any], trust_remote_code: bool) -> tuple[Any, Any, dict[str, Any]]:
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        model, config = load_model(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if str(err).startswith("Model type"):
            raise ValueError(f"unsupported architecture {config['model_type']!r}: mlx-lm has no model class for it") from None
        raise
    except Exception as err:  # mx.load raises RuntimeError/OSError on damaged files
        raise ValueError(f"could not read the weights in {path} (corrupt or incomplete?): {str(err).splitlines()[0][:200]}") from None
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def _cast(model: Any, config: dict[str, Any], dtype: str | None) -> None:
    from mlx.utils import tree_flatten

    if dtype is None:
        return
    if dtype == "auto":
        if mx.default_device() != mx.cpu or config.get("quantization"):
            return
        weights = [v for _, v in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))]
        if not any(v.dtype in (mx.float16, mx.bfloat16) for v in weights):
            return
        if sum(v.size for v in weights) * 4 > _FP32_BUDGET_BYTES:
            return
        dtype = "float32"
    model.set_dtype(getattr(mx, dtype))
