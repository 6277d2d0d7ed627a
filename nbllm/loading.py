"""``load()``: a model from a local folder, a hub id, or the models shipped inside nbllm.

Text models load through mlx-lm, vision-language models through mlx-vlm (see
``nbllm.vision``). Every way a model can be unreachable or unusable (no such
folder, not a model, damaged weights, a broken tokenizer file, an
architecture neither library has, a hub that cannot be reached) ends in one
line that names the problem.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, cast

from .folder import cast_weights, load_tokenizer, read_config
from .model import LM

__all__ = ["load", "DEFAULT_MODEL_PATH", "DEFAULT_VISION_PATH"]

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL_PATH = ASSETS / "default-model"
DEFAULT_VISION_PATH = ASSETS / "default-vision"
DEFAULT_DRAFT_PATH = ASSETS / "default-draft"
_SHIPPED = {
    "nbllm/default-model": DEFAULT_MODEL_PATH,
    "nbllm/default-vision": DEFAULT_VISION_PATH,
    "nbllm/default-draft": DEFAULT_DRAFT_PATH,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = (None, "auto", "float32", "float16", "bfloat16")


def load(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    adapter_path: str | os.PathLike[str] | None = None,
) -> LM:
    """Load a model from a local folder, a hub id, or the models shipped with nbllm.

    Args:
        name_or_path: A local MLX / Hugging Face model folder, a hub id such as
            ``"mlx-community/SmolLM2-135M-Instruct"``, ``None`` (or
            ``"nbllm/default-model"``) for the small text model shipped inside
            nbllm, ``"nbllm/default-vision"`` for its small vision model, or
            ``"nbllm/default-draft"`` for the draft model that speeds up the text
            model by speculative decoding.
        dtype: ``"auto"`` casts half-precision weights to float32 on the CPU
            backend when they fit in 4 GB (fp32 uses BLAS, fp16/bf16 do not; the
            weights then take twice the memory, see ``lm.info.weights_gb``);
            ``None`` keeps the stored dtype; or ``"float32"``/``"float16"``/``"bfloat16"``.
        trust_remote_code: Allow a config's custom ``model_file`` code to run.
        revision: Hub branch, tag or commit.
        adapter_path: A LoRA/DoRA adapter folder (``nbllm.finetune``'s or ``mlx_lm.lora``'s) to apply.

    Returns:
        An ``LM`` (a ``VisionLM`` for vision-language models).
    """
    from . import blas

    status = blas.enable_fast_blas()
    if str(status.get("reason", "")).startswith("mlx.core was imported"):
        import warnings

        warnings.warn(
            "nbllm: mlx.core was imported before nbllm, so the fast BLAS is off (CPU matmuls up to 20x "
            "slower); import nbllm first",
            RuntimeWarning,
            stacklevel=2,
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected 'auto', None, 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    start = time.perf_counter()
    name, path = _resolve(name_or_path, revision)
    config = read_config(path)
    if "vision_config" in config:
        if adapter_path is not None:
            raise ValueError("adapter_path: adapters apply to text models; this is a vision model")
        from .vision import load_vision

        return load_vision(name, path, config, dtype=dtype, trust_remote_code=trust_remote_code, loader=load)
    model, config = _load_text(path, config, trust_remote_code)
    tokenizer = load_tokenizer(path, config.get("eos_token_id"))
    stored = cast_weights(model, config, dtype)
    lm = LM(model, tokenizer, config, name, path, time.perf_counter() - start, stored_dtype=stored, loader=load)
    return lm if adapter_path is None else lm.with_adapters(adapter_path)


def _resolve(name_or_path: str | os.PathLike[str] | None, revision: str | None) -> tuple[str, Path]:
    """Find the local folder for a path, a hub id, or a shipped model."""
    if name_or_path is None:
        name_or_path = "nbllm/default-model"
    name = os.fspath(name_or_path)
    if name in _SHIPPED and not Path(name).exists():
        folder = _SHIPPED[name]
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"the model {name!r} shipped with nbllm is missing from {folder}; reinstall nbllm")
        return name, folder
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"expected a model folder, got a file: {name}")
        return path.name, path
    if isinstance(name_or_path, Path) or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"no model folder at {name!r} (expected a local folder or a hub id like 'mlx-community/SmolLM2-135M-Instruct')"
        )
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
            raise ConnectionError(
                f"could not download {repo!r} from the Hugging Face hub (offline? pass a local path): {first}"
            ) from None


def _load_text(path: Path, config: dict[str, Any], trust_remote_code: bool) -> tuple[Any, dict[str, Any]]:
    from mlx_lm.utils import load_model

    try:
        return cast(tuple[Any, dict[str, Any]], load_model(path, trust_remote_code=trust_remote_code))
    except ValueError as err:
        if str(err).startswith("Model type"):
            raise ValueError(
                f"unsupported architecture {config['model_type']!r}: mlx-lm has no model class for it"
            ) from None
        raise
    except Exception as err:  # mx.load raises RuntimeError/OSError on damaged files
        raise ValueError(
            f"could not read the weights in {path} (corrupt or incomplete?): {str(err).splitlines()[0][:200]}"
        ) from None
