"""The prompt cache file: mlx-lm's safetensors layout plus what makes it safe to load.

``mlx_lm.models.cache.save_prompt_cache``/``load_prompt_cache`` write and read
the KV arrays (no pickle). This module adds the metadata nbllm checks before
trusting a file: the model fingerprint, the token ids, the cache settings, the
nbllm version and a checksum over every array and metadata entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import mlx.core as mx

__all__ = ["FORMAT", "model_fingerprint", "write", "read"]

FORMAT = "nbllm-prompt-cache/1"
# Cache classes a file may name; load_prompt_cache looks classes up by name.
_CLASSES = {"KVCache", "RotatingKVCache", "QuantizedKVCache", "ConcatenateKVCache", "ChunkedKVCache"}


def write(lm: Any, layers: list[Any], ids: list[int], settings: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save ``layers`` covering ``ids`` to a ``.safetensors`` file (suffix added if missing).

    Returns:
        The path written. The file is replaced only once it is complete.
    """
    from mlx_lm.models.cache import save_prompt_cache

    from .version import __version__

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or path, got {type(path).__name__}")
    target = Path(path).expanduser()
    if target.suffix != ".safetensors":
        target = target.with_name(target.name + ".safetensors")
    meta = {
        "nbllm_format": FORMAT,
        "nbllm_version": __version__,
        "model_name": lm.name,
        "model_fingerprint": model_fingerprint(lm),
        "token_ids": json.dumps(ids),
        "settings": json.dumps(settings),
    }
    # mlx-lm writes the layout, a second pass adds the checksum.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        raw, final = os.path.join(tmp, "raw.safetensors"), os.path.join(tmp, "final.safetensors")
        save_prompt_cache(raw, layers, meta)
        arrays, flat = _read(raw)
        flat["0.checksum"] = _checksum(arrays, flat)
        mx.save_safetensors(final, arrays, flat)
        os.replace(final, target)
    return target


def read(lm: Any, path: str | os.PathLike[str]) -> tuple[list[Any], list[int], dict[str, Any]]:
    """Load a file written by ``write`` for ``lm``.

    Returns:
        ``(layers, ids, settings)``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not an nbllm prompt cache, damaged, or made with another model.
    """
    from mlx_lm.models.cache import load_prompt_cache

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no prompt cache file at {str(path)!r}")
    try:
        arrays, flat = _read(str(path))
    except Exception as err:
        raise ValueError(
            f"{path.name} is not a readable safetensors file (corrupt or truncated?): {str(err)[:120]}"
        ) from None
    if flat.get("0.nbllm_format") != FORMAT:
        raise ValueError(
            f"{path.name}: expected an nbllm prompt cache ({FORMAT}), got format {flat.get('0.nbllm_format')!r}"
        )
    if flat.get("0.checksum") != _checksum(arrays, flat):
        raise ValueError(f"{path.name}: checksum mismatch, the file was modified or damaged; refusing to load it")
    fingerprint = model_fingerprint(lm)
    if flat.get("0.model_fingerprint") != fingerprint:
        raise ValueError(
            f"{path.name} was made with another model ({flat.get('0.model_name')!r}, fingerprint "
            f"{str(flat.get('0.model_fingerprint'))[:12]}); expected {lm.name!r} (fingerprint {fingerprint[:12]})"
        )
    classes = {v for k, v in flat.items() if k.startswith("1.")}
    if not classes <= _CLASSES:
        raise ValueError(f"{path.name}: expected KV cache layers, got classes {sorted(classes - _CLASSES)}")
    layers, meta = load_prompt_cache(str(path), return_metadata=True)
    ids, settings, offsets = json.loads(meta["token_ids"]), json.loads(meta["settings"]), {c.offset for c in layers}
    if len(layers) != len(lm.model.layers) or offsets != {len(ids)}:
        raise ValueError(
            f"{path.name}: expected {len(lm.model.layers)} layers covering {len(ids)} tokens, "
            f"got {len(layers)} covering {sorted(offsets)}"
        )
    return layers, [int(t) for t in ids], settings


_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def model_fingerprint(lm: Any) -> str:
    """A SHA-256 digest of the model's config and every weight (names, shapes, dtypes, bytes).

    Computed once per loaded model (tensors hashed on two threads: hashlib
    releases the GIL), then remembered for as long as the model lives.
    """
    cached = _FINGERPRINTS.get(lm)
    if cached is not None:
        return cached
    from concurrent.futures import ThreadPoolExecutor

    from mlx.utils import tree_flatten

    params: list[tuple[str, Any]] = sorted(tree_flatten(lm.model.parameters()), key=lambda kv: kv[0])  # type: ignore[arg-type]
    mx.eval([v for _, v in params])

    def digest(item: tuple[str, Any]) -> bytes:
        name, value = item
        h = hashlib.sha256(f"{name}:{value.shape}:{value.dtype};".encode())
        h.update(_raw(value))
        return h.digest()

    h = hashlib.sha256(json.dumps(lm.config, sort_keys=True, default=str).encode())
    with ThreadPoolExecutor(max_workers=2) as pool:
        for part in pool.map(digest, params):
            h.update(part)
    _FINGERPRINTS[lm] = h.hexdigest()
    return _FINGERPRINTS[lm]


def _read(path: str) -> tuple[dict[str, mx.array], dict[str, str]]:
    return mx.load(path, return_metadata=True)  # type: ignore[return-value]


def _checksum(arrays: dict[str, mx.array], meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(meta):
        if key != "0.checksum":
            h.update(f"{key}={meta[key]};".encode())
    for key in sorted(arrays):
        h.update(f"{key}:{arrays[key].shape}:{arrays[key].dtype};".encode())
        h.update(_raw(arrays[key]))
    return h.hexdigest()


def _raw(a: mx.array) -> Any:
    """The array's bytes as a contiguous numpy array (no copy when it already is one)."""
    import numpy as np

    if a.dtype == mx.bfloat16:  # numpy has no bfloat16; hash the bit pattern
        a = a.view(mx.uint16)
    return np.ascontiguousarray(a).reshape(-1)
