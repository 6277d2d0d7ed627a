"""Adapter folders and derived handles: a model with adapters, fused, saved as a standard MLX folder.

The folder is mlx-lm's (``adapter_config.json`` + ``adapters.safetensors``, what
``mlx_lm.load(path, adapter_path=)`` reads), plus an ``nbllm_base`` entry that
names the model it was trained on, so an adapter for another model is refused
with a clear message. Every file is written beside its final name and moved
into place whole, so an interrupted save leaves the last complete one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_config",
    "apply_adapters",
    "base_signature",
    "copy_model",
    "derive",
    "fuse",
    "has_adapters",
    "save_folder",
    "with_adapters",
    "write_adapters",
    "write_config",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
_SIGNATURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def copy_model(model: Any) -> Any:
    """A new module tree over the same weight arrays (MLX arrays are never changed in place, so sharing is safe)."""
    memo: dict[int, Any] = {id(v): v for _, v in _params(model)}
    return copy.deepcopy(model, memo)


def derive(
    lm: Any, model: Any, suffix: str, *, config: dict[str, Any] | None = None, adapters: Path | None = None
) -> Any:
    """A new handle like ``lm`` (same tokenizer and loader) over ``model``; ``lm`` is not changed."""
    if getattr(lm, "is_vision", False) or not hasattr(lm, "_loader"):
        raise ValueError(f"expected a text model loaded with nbllm.load, got {type(lm).__name__}")
    new = type(lm)(
        model,
        lm.tokenizer,
        dict(config if config is not None else lm.config),
        f"{lm.name}+{suffix}",
        lm.path,
        stored_dtype=lm._stored_dtype,
        loader=lm._loader,
    )
    new.adapter_path = adapters
    new.disk_path = None  # its weights are in memory only, until saved
    return new


def base_signature(lm: Any) -> dict[str, Any]:
    """What an adapter records about its base model (checked when it is applied)."""
    return {"name": lm.name, **{k: lm.config.get(k) for k in _SIGNATURE_KEYS if k in lm.config}}


def has_adapters(model: Any) -> bool:
    return any(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k, _ in _params(model))


def adapter_config(path: Path) -> dict[str, Any]:
    """An adapter folder's config, or a one-line error saying what the folder lacks."""
    if not path.is_dir():
        raise FileNotFoundError(f"adapter_path: no adapter folder at {path}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise ValueError(
                f"adapter_path: {path} is not an adapter folder: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
            )
    from ..folder import read_json

    config = read_json(path / ADAPTER_CONFIG)
    if not isinstance(config, dict) or "lora_parameters" not in config or "num_layers" not in config:
        raise ValueError(f"adapter_path: {path / ADAPTER_CONFIG} is not an mlx-lm LoRA config (no lora_parameters)")
    return config


def apply_adapters(lm: Any, model: Any, path: Path) -> None:
    """Put the adapters in ``path`` onto ``model`` (a copy of ``lm.model``) with mlx-lm's ``load_adapters``."""
    from mlx_lm.tuner.utils import load_adapters

    config = adapter_config(path)
    base = config.get("nbllm_base") or {}
    mine = base_signature(lm)
    differ = [k for k in _SIGNATURE_KEYS if k in base and k in mine and base[k] != mine[k]]
    if differ:
        k = differ[0]
        raise ValueError(
            f"adapter_path: {path} was trained for another model ({base.get('name')!r}, {k}={base[k]}); "
            f"expected an adapter for {lm.name!r} ({k}={mine[k]})"
        )
    if config.get("num_layers", 0) > len(model.layers):
        raise ValueError(
            f"adapter_path: {path} adapts {config['num_layers']} layers; {lm.name!r} has {len(model.layers)}"
        )
    try:
        load_adapters(model, str(path))
    except ValueError as err:  # mlx-lm lists every tensor that does not fit
        detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"adapter_path: {path} does not fit {lm.name!r} (another model?): {detail}") from None
    model.eval()


def with_adapters(lm: Any, path: str | os.PathLike[str]) -> Any:
    """A new handle: ``lm`` with the adapters in folder ``path`` applied (``lm`` is unchanged)."""
    _local(lm, "with_adapters")
    if lm.adapter_path is not None or has_adapters(lm.model):
        raise ValueError(f"with_adapters: {lm.name!r} already has adapters; fuse() it first or start from its base")
    folder = Path(path).expanduser()
    model = copy_model(lm.model)
    apply_adapters(lm, model, folder)
    return derive(lm, model, "lora", adapters=folder)


def fuse(lm: Any, *, dequantize: bool = False) -> Any:
    """A new handle with the adapters merged into the weights (mlx-lm's ``fuse``); same outputs, plain layers.

    Args:
        lm: A handle with adapters (``finetune(...).lm``, ``with_adapters``, ``load(adapter_path=)``).
        dequantize: Also turn quantized layers back into full-precision ones.
    """
    from mlx.utils import tree_unflatten

    _local(lm, "fuse")
    if not has_adapters(lm.model):
        raise ValueError(f"fuse: {lm.name!r} has no adapters to fuse (expected finetune(...).lm or with_adapters(...))")
    model = copy_model(lm.model)
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    config = dict(lm.config)
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    mx.eval(model.parameters())
    name = lm.name[: -len("+lora")] if lm.name.endswith("+lora") else lm.name
    new = derive(lm, model, "fused", config=config)
    new.name = f"{name}+fused"
    return new


def save_folder(lm: Any, folder: str | os.PathLike[str]) -> Path:
    """Write ``lm`` as a standard MLX model folder (mlx-lm's ``save``) that ``mlx_lm.load`` and ``nbllm.load`` read.

    The folder must not exist or be empty; it appears only once complete.
    """
    from mlx_lm.utils import save

    _local(lm, "save")
    if has_adapters(lm.model):
        raise ValueError(
            f"save: {lm.name!r} has unfused adapters; save lm.fuse() instead (or keep the adapter folder itself)"
        )
    target = Path(folder).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"save: {target} exists and is not an empty folder; expected a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save(tmp, lm.path, lm.model, lm.tokenizer, dict(lm.config), donate_model=False)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lm.disk_path = target
    return target


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """Write ``adapter_config.json`` whole (written beside, then moved into place)."""
    _replace(folder / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2, default=str)))


def write_adapters(folder: Path, weights: dict[str, mx.array], step: int) -> None:
    """Write ``adapters.safetensors`` whole; ``step`` is recorded in its metadata."""
    _replace(folder / ADAPTER_WEIGHTS, lambda p: mx.save_safetensors(str(p), weights, {"step": str(step)}))


def _replace(target: Path, write: Any) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(Path(name))
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _params(model: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))


def _local(lm: Any, what: str) -> None:
    from ..inside.run import needs_local

    needs_local(lm, what)
    if getattr(lm, "is_vision", False):
        raise ValueError(f"{what}: expected a text model, got the vision model {lm.name!r}")
