"""``quantize``: a new handle with fewer bits per weight, by mlx-lm's ``quantize_model`` (``mlx_lm.convert``'s step).

Layers whose input size is not a multiple of ``group_size`` stay in full
precision, as mlx-lm leaves them. On Metal quantized matmuls are fast; MLX's CPU
build runs them without BLAS, so on Linux a quantized model is smaller but
slower than fp32 (``bench/bench_adapt.py`` measures by how much).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

__all__ = ["quantize", "MODES"]

# mlx-lm's modes and the bits / group sizes each takes (mlx.core.quantize).
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,)),
}


def quantize(lm: Any, bits: int = 4, group_size: int | None = None, *, mode: str = "affine") -> Any:
    """Quantize a model's weights; returns a new handle (``lm`` is unchanged).

    Args:
        lm: A local text model without unfused adapters (``fuse()`` them first).
        bits: Bits per weight: 4 or 8 (affine also takes 2, 3, 5, 6).
        group_size: Weights sharing one scale and bias: 32, 64 or 128 (default: 64 for
            affine, the mode's own for the others).
        mode: ``"affine"`` (mlx-lm's default), ``"mxfp4"``, ``"mxfp8"`` or ``"nvfp4"``.

    Returns:
        An ``LM`` whose ``info`` shows ``quantization_bits`` and the smaller ``weights_gb``;
        ``save(folder)`` writes a folder ``mlx_lm.load`` reads.
    """
    from mlx_lm.utils import quantize_model

    from .adapters import copy_model, derive, has_adapters

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {sorted(MODES)}, got {mode!r}")
    allowed_bits, allowed_groups = MODES[mode]
    if isinstance(bits, bool) or bits not in allowed_bits:
        raise ValueError(f"bits: expected one of {list(allowed_bits)} for {mode}, got {bits!r}")
    group = allowed_groups[0] if group_size is None and mode != "affine" else (group_size or 64)
    if isinstance(group, bool) or group not in allowed_groups:
        raise ValueError(f"group_size: expected one of {list(allowed_groups)} for {mode}, got {group_size!r}")
    from ..inside.run import needs_local

    needs_local(lm, "quantize")
    if getattr(lm, "is_vision", False):
        raise ValueError(f"quantize: expected a text model, got the vision model {lm.name!r}")
    if lm.config.get("quantization"):
        raise ValueError(f"quantize: {lm.name!r} is already quantized ({lm.config['quantization'].get('bits')} bits)")
    if has_adapters(lm.model):
        raise ValueError(f"quantize: {lm.name!r} has unfused adapters; quantize lm.fuse() instead")
    model = copy_model(lm.model)
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits per weight
        model, config = quantize_model(model, dict(lm.config), group, bits, mode=mode)
    import mlx.core as mx

    mx.eval(model.parameters())
    return derive(lm, model, f"q{bits}", config=config)
