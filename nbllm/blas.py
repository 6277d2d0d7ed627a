"""Load a fast BLAS for MLX's Linux CPU build, before ``mlx.core`` is imported.

The ``mlx-cpu`` wheel links a slow reference BLAS. If OpenBLAS is loaded into
the process first with ``RTLD_GLOBAL``, MLX's ``cblas_*`` calls bind to it
instead (an fp32 1024x1024 matmul goes from ~2.5 to ~50-70 GFLOP/s on a
2-core x86 machine). bf16/fp16 and quantized matmuls never reach BLAS on CPU.

Set ``NBLLM_BLAS=0`` to turn this off, or ``NBLLM_BLAS=/path/libopenblas.so``
to choose the library. Never done on macOS (MLX uses Accelerate/Metal there).
Install OpenBLAS on Debian/Ubuntu with ``apt-get install libopenblas0-pthread``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

__all__ = ["enable_fast_blas", "blas_status"]

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_status: dict[str, str | bool | None] = {"loaded": False, "path": None, "reason": "not attempted"}


def _find() -> str | None:
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    conda = os.environ.get("CONDA_PREFIX")
    if conda:
        hits = sorted(glob.glob(os.path.join(conda, "lib", "libopenblas*.so*")))
        if hits:
            return hits[0]
    return ctypes.util.find_library("openblas")


def enable_fast_blas() -> dict[str, str | bool | None]:
    """Load OpenBLAS globally if possible; return what happened.

    Returns:
        ``{"loaded": bool, "path": str | None, "reason": str}``.
    """
    if _status["loaded"]:
        return dict(_status)
    setting = os.environ.get("NBLLM_BLAS", "1").strip()
    if not sys.platform.startswith("linux"):
        _status.update(reason="not Linux: MLX uses Accelerate/Metal")
    elif setting.lower() in {"0", "off", "false", "no"}:
        _status.update(reason="turned off by NBLLM_BLAS")
    elif "mlx.core" in sys.modules:
        _status.update(reason="mlx.core was imported before nbllm; import nbllm first")
    else:
        path = setting if os.path.sep in setting else _find()
        if path is None:
            _status.update(reason="no OpenBLAS found (apt-get install libopenblas0-pthread)")
        else:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                _status.update(loaded=True, path=path, reason="loaded")
            except OSError as err:
                _status.update(reason=f"could not load {path}: {err}")
    return dict(_status)


def blas_status() -> dict[str, str | bool | None]:
    """What ``enable_fast_blas`` did in this process."""
    return dict(_status)
