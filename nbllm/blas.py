"""Load a fast BLAS for MLX's Linux CPU build, before ``mlx.core`` is imported.

The ``mlx-cpu`` wheel links a slow reference BLAS. If OpenBLAS is loaded into
the process first with ``RTLD_GLOBAL``, MLX's ``cblas_*`` calls bind to it
instead (an fp32 1024x1024 matmul goes from ~2.5 to ~50-70 GFLOP/s on a
2-core x86 machine). bf16/fp16 and quantized matmuls never reach BLAS on CPU.

MLX also issues each decode step's one-row products as ``cblas_sgemm``, which
OpenBLAS runs at about half the speed of ``cblas_sgemv``. nbllm's GEMV shim
(``nbllm/_gemv_shim.c``, compiled at install time where a C compiler exists)
is loaded globally just before OpenBLAS: its ``cblas_sgemm`` sends one-row and
one-column products to OpenBLAS's ``cblas_sgemv`` and everything else to
OpenBLAS's ``cblas_sgemm``.

Environment switches (read once, when nbllm is imported):
    ``NBLLM_BLAS=0`` turns all of this off (MLX's reference BLAS);
    ``NBLLM_BLAS=/path/libopenblas.so`` chooses the library;
    ``NBLLM_GEMV=0`` keeps OpenBLAS but leaves the shim out; ``NBLLM_GEMV=1``
    uses it on architectures where it is off by default (measured on x86-64 only).
Never done on macOS (MLX uses Accelerate/Metal there). Install OpenBLAS on
Debian/Ubuntu with ``apt-get install libopenblas0-pthread``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.machinery
import os
import platform
import sys
from pathlib import Path

__all__ = ["enable_fast_blas", "blas_status", "shim_calls"]

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_OFF = {"0", "off", "false", "no"}
_ON = {"1", "on", "true", "yes"}
_HERE = Path(__file__).parent
_SHIM_SOURCE = _HERE / "_gemv_shim.c"
_BUILD_NOTE = _HERE / "_gemv_shim.build-error.txt"  # written by setup.py when the build fails

Status = dict[str, str | bool | None]
_status: Status = {
    "active": "reference BLAS",  # "shim + OpenBLAS", "OpenBLAS" or "reference BLAS"
    "loaded": False,
    "path": None,
    "reason": "not attempted",  # OpenBLAS
    "shim": False,
    "shim_path": None,
    "shim_reason": "not attempted",
}
_shim: ctypes.CDLL | None = None
_verified: bool | None = None  # did a real MLX matmul reach the shim? (None: not checked yet)


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


def _shim_file() -> Path | None:
    # this interpreter's build first; any other works too (the shim does not use Python's ABI)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (_HERE / f"_gemv_shim{suffix}").exists():
            return _HERE / f"_gemv_shim{suffix}"
    hits = sorted(_HERE.glob("_gemv_shim*.so"))
    return hits[0] if hits else None


def _shim_missing_reason() -> str:
    if _BUILD_NOTE.exists():
        first = (_BUILD_NOTE.read_text().strip().splitlines() or ["unknown error"])[0]
        return f"shim not built at install time (no C compiler?): {first}"
    if _SHIM_SOURCE.exists():
        return "shim not built: reinstall nbllm with a C compiler present (pip install -e . or scripts/setup)"
    return "shim not part of this installation"


def _load_shim(blas_path: str) -> tuple[ctypes.CDLL | None, Path | None, str]:
    """Load the shim pointing at ``blas_path``; global only once it has found the real BLAS."""
    setting = os.environ.get("NBLLM_GEMV", "").strip().lower()
    if setting and setting not in _OFF | _ON:
        raise ValueError(f"NBLLM_GEMV: expected 0 or 1, got {setting!r}")
    if setting in _OFF:
        return None, None, "turned off by NBLLM_GEMV"
    if platform.machine() not in ("x86_64", "AMD64") and setting not in _ON:
        return None, None, f"off by default on {platform.machine()} (measured on x86-64 only); NBLLM_GEMV=1 turns it on"
    path = _shim_file()
    if path is None:
        return None, None, _shim_missing_reason()
    try:
        # Local first: if the real BLAS lacks a symbol, nothing may bind to this cblas_sgemm.
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        code = lib.nbllm_gemv_init(blas_path.encode())
    except (OSError, AttributeError) as err:
        return None, path, f"could not load {path.name}: {err}"
    if code != 0:
        why = "cannot open it" if code == 1 else "it has no cblas_sgemm/cblas_sgemv"
        return None, path, f"shim not used: {why} ({blas_path})"
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # promote: now ahead of OpenBLAS in the global scope
    stale = _SHIM_SOURCE.exists() and _SHIM_SOURCE.stat().st_mtime > path.stat().st_mtime
    return lib, path, "loaded" + (" (older than _gemv_shim.c: rerun scripts/setup)" if stale else "")


def enable_fast_blas() -> Status:
    """Load the GEMV shim and OpenBLAS globally if possible; return what happened.

    Returns:
        The same dict as ``blas_status()``.

    Raises:
        ValueError: ``NBLLM_GEMV`` is set to something other than 0 or 1.
    """
    global _shim
    if _status["loaded"]:
        return blas_status()
    setting = os.environ.get("NBLLM_BLAS", "1").strip()
    if not sys.platform.startswith("linux"):
        _status.update(reason="not Linux: MLX uses Accelerate/Metal", shim_reason="not Linux")
    elif setting.lower() in _OFF:
        _status.update(reason="turned off by NBLLM_BLAS", shim_reason="turned off by NBLLM_BLAS")
    elif "mlx.core" in sys.modules:
        _status.update(
            reason="mlx.core was imported before nbllm; import nbllm first",
            shim_reason="mlx.core was imported before nbllm",
        )
    else:
        path = setting if os.path.sep in setting else _find()
        if path is None:
            _status.update(
                reason="no OpenBLAS found (apt-get install libopenblas0-pthread)", shim_reason="needs OpenBLAS"
            )
        else:
            # The shim must become global before OpenBLAS so MLX's cblas_sgemm binds to it.
            _shim, shim_path, shim_reason = _load_shim(path)
            _status.update(
                shim=_shim is not None, shim_path=str(shim_path) if shim_path else None, shim_reason=shim_reason
            )
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                _status.update(loaded=True, path=path, reason="loaded")
            except OSError as err:
                _status.update(reason=f"could not load {path}: {err}")
    _status["active"] = (
        "shim + OpenBLAS" if _shim is not None else "OpenBLAS" if _status["loaded"] else "reference BLAS"
    )
    return blas_status()


def shim_calls() -> dict[str, int] | None:
    """How many ``cblas_sgemm`` calls the shim forwarded to sgemv or passed to sgemm.

    Returns:
        ``{"forwarded": int, "passed": int}``, or ``None`` when the shim is not loaded.
    """
    if _shim is None:
        return None
    return {
        "forwarded": ctypes.c_ulonglong.in_dll(_shim, "nbllm_gemv_forwarded").value,
        "passed": ctypes.c_ulonglong.in_dll(_shim, "nbllm_gemm_passed").value,
    }


def _verify() -> bool | None:
    """Run one 1-row MLX matmul and check that it reached the shim (once mlx.core is loaded)."""
    global _verified
    if _verified is None and _shim is not None and "mlx.core" in sys.modules:
        import mlx.core as mx

        before = shim_calls()
        with mx.stream(mx.cpu):
            mx.eval(mx.ones((1, 2)) @ mx.ones((2, 3)))
        after = shim_calls()
        _verified = bool(before and after and after["forwarded"] > before["forwarded"])
    return _verified


def blas_status() -> Status:
    """What ``enable_fast_blas`` did in this process, and why.

    Returns:
        ``active`` ("shim + OpenBLAS", "OpenBLAS" or "reference BLAS"); ``loaded``,
        ``path`` and ``reason`` for OpenBLAS; ``shim``, ``shim_path`` and
        ``shim_reason`` for the GEMV shim; ``summary``, one line saying all that.
        Once ``mlx.core`` is imported, a loaded shim is checked with a real
        1-row matmul; if MLX does not reach it, ``shim_reason`` says so.
    """
    status = dict(_status)
    if _verify() is False:
        status.update(
            active="OpenBLAS" if status["loaded"] else "reference BLAS",
            shim=False,
            shim_reason="loaded, but MLX's matmuls do not reach it (its cblas_sgemm is bound elsewhere)",
        )
    if status["active"] == "shim + OpenBLAS":
        status["summary"] = f"GEMV shim + OpenBLAS ({status['path']}): one-row matmuls run as sgemv"
    elif status["active"] == "OpenBLAS":
        status["summary"] = f"OpenBLAS only ({status['path']}); GEMV shim: {status['shim_reason']}"
    else:
        status["summary"] = f"MLX's reference BLAS (slow fp32 matmuls): {status['reason']}"
    return status
