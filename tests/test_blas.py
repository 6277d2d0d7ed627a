"""The GEMV shim (nbllm/_gemv_shim.c) and how nbllm.blas loads it.

The shim's cblas_sgemm is called directly through ctypes on strided buffers
and checked against numpy; then real MLX matmuls and a greedy decode run in
fresh processes with the shim on and off (loading is process-wide).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nbllm import blas

ROW, COL = 101, 102
N_, T_, C_ = 111, 112, 113  # NoTrans, Trans, ConjTrans
ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = blas._find() if sys.platform.startswith("linux") else None

pytestmark = pytest.mark.skipif(
    OPENBLAS is None or platform.machine() != "x86_64",
    reason="the GEMV shim applies to Linux x86-64 with OpenBLAS installed",
)


@pytest.fixture(scope="module")
def shim() -> ctypes.CDLL:
    """The built shim, pointed at OpenBLAS (the same library object nbllm loaded, if it did)."""
    path = blas._shim_file()
    assert path is not None, f"GEMV shim missing: {blas._shim_missing_reason()}"
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    assert lib.nbllm_gemv_init(str(OPENBLAS).encode()) == 0
    f, p, i = ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    lib.cblas_sgemm.restype = None
    return lib


def _counts(lib: ctypes.CDLL) -> tuple[int, int]:
    return (
        ctypes.c_ulonglong.in_dll(lib, "nbllm_gemv_forwarded").value,
        ctypes.c_ulonglong.in_dll(lib, "nbllm_gemm_passed").value,
    )


def _strides(order: int, trans: int, ld: int) -> tuple[int, int]:
    """Element strides (row, column) of op(X) stored with leading dimension ld."""
    row_major_plain = (order == ROW) == (trans == N_)
    return (ld, 1) if row_major_plain else (1, ld)


def _view(buf: np.ndarray, shape: tuple[int, int], strides: tuple[int, int]) -> np.ndarray:
    item = buf.itemsize
    return np.lib.stride_tricks.as_strided(buf, shape, (strides[0] * item, strides[1] * item), writeable=False)


def _size(shape: tuple[int, int], strides: tuple[int, int]) -> int:
    # 3 spare floats past the last element catch writes beyond it
    return (shape[0] - 1) * strides[0] + (shape[1] - 1) * strides[1] + 4 if min(shape) > 0 else 4


def run_case(
    lib: ctypes.CDLL,
    rng: np.random.Generator,
    order: int,
    ta: int,
    tb: int,
    M: int,
    N: int,
    K: int,
    alpha: float,
    beta: float,
    pad: tuple[int, int, int] = (0, 0, 0),
) -> str:
    """Call the shim once and compare with numpy (float64); return which path it took."""
    lda = (K if ta == N_ else M) if order == ROW else (M if ta == N_ else K)
    ldb = (N if tb == N_ else K) if order == ROW else (K if tb == N_ else N)
    ldc = N if order == ROW else M
    lda, ldb, ldc = max(1, lda) + pad[0], max(1, ldb) + pad[1], max(1, ldc) + pad[2]
    sa, sb, sc = _strides(order, ta, lda), _strides(order, tb, ldb), _strides(order, N_, ldc)
    A = rng.standard_normal(_size((M, K), sa)).astype(np.float32)
    B = rng.standard_normal(_size((K, N), sb)).astype(np.float32)
    C = np.full(_size((M, N), sc), 7.0, np.float32)  # 7.0 marks "must stay untouched"
    c_in = rng.standard_normal((M, N)).astype(np.float32)
    if beta == 0.0:
        c_in[:] = np.nan  # BLAS: C is not read when beta == 0
    cview = np.lib.stride_tricks.as_strided(C, (M, N), (sc[0] * 4, sc[1] * 4))
    cview[...] = c_in
    expected = alpha * (_view(A, (M, K), sa).astype(np.float64) @ _view(B, (K, N), sb).astype(np.float64))
    if beta != 0.0:
        expected = expected + beta * c_in
    mask = np.ones(C.shape, bool)
    np.lib.stride_tricks.as_strided(mask, (M, N), (sc[0], sc[1]))[...] = False
    a_copy, b_copy = A.copy(), B.copy()
    before = _counts(lib)
    lib.cblas_sgemm(order, ta, tb, M, N, K, alpha, A.ctypes.data, lda, B.ctypes.data, ldb, beta, C.ctypes.data, ldc)
    after = _counts(lib)
    case = f"order={order} ta={ta} tb={tb} M={M} N={N} K={K} alpha={alpha} beta={beta} ld={lda},{ldb},{ldc}"
    got = _view(C, (M, N), sc)
    assert np.all(np.isfinite(got)), f"non-finite result for {case}"
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * max(1.0, K**0.5), err_msg=case)
    assert np.all(C[mask] == 7.0), f"wrote outside C for {case}"
    assert np.array_equal(A, a_copy) and np.array_equal(B, b_copy), f"inputs changed for {case}"
    assert after[0] + after[1] == before[0] + before[1] + 1, case
    return "gemv" if after[0] > before[0] else "gemm"


TRANS = [(a, b) for a in (N_, T_) for b in (N_, T_)]


@pytest.mark.parametrize("ta,tb", TRANS)
def test_one_row_and_one_column_products_go_to_gemv_and_match_numpy(shim: ctypes.CDLL, ta: int, tb: int) -> None:
    rng = np.random.default_rng(ta * 1000 + tb)
    for _ in range(40):
        K = int(rng.integers(1, 300))
        other = int(rng.integers(1, 200))
        M, N = (1, other) if rng.random() < 0.5 else (other, 1)
        pad = tuple(int(x) for x in rng.integers(0, 6, 3))
        alpha = float(rng.choice([1.0, -0.75, 2.5, 0.0]))
        beta = float(rng.choice([0.0, 1.0, 0.5, -1.25]))
        assert run_case(shim, rng, ROW, ta, tb, M, N, K, alpha, beta, pad) == "gemv"  # type: ignore[arg-type]


@pytest.mark.parametrize("ta,tb", TRANS)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 1, 37), (1, 1, 1000), (1, 50, 1), (50, 1, 1), (1, 4096, 3)])
def test_edge_shapes_go_to_gemv(shim: ctypes.CDLL, ta: int, tb: int, M: int, N: int, K: int) -> None:
    rng = np.random.default_rng(M * 7 + N * 13 + K)
    for alpha, beta in [(1.0, 0.0), (0.5, 2.0), (0.0, 0.0), (0.0, 1.0), (-1.0, 1.0)]:
        assert run_case(shim, rng, ROW, ta, tb, M, N, K, alpha, beta, (3, 2, 5)) == "gemv"


def test_conjugate_transpose_is_a_transpose_for_real_matrices(shim: ctypes.CDLL) -> None:
    rng = np.random.default_rng(5)
    assert run_case(shim, rng, ROW, C_, C_, 1, 33, 20, 1.0, 0.0, (1, 2, 0)) == "gemv"
    assert run_case(shim, rng, ROW, C_, N_, 40, 1, 21, 0.5, 1.0, (0, 3, 4)) == "gemv"


@pytest.mark.parametrize("ta,tb", TRANS)
def test_everything_else_goes_to_the_real_sgemm(shim: ctypes.CDLL, ta: int, tb: int) -> None:
    rng = np.random.default_rng(ta + 3 * tb)
    cases = [
        (ROW, 2, 3, 5),
        (ROW, 17, 33, 9),
        (ROW, 64, 2, 128),  # more than one row and column
        (COL, 1, 30, 12),
        (COL, 30, 1, 12),
        (COL, 1, 1, 5),  # column-major, even when one-row
        (ROW, 1, 30, 0),
        (ROW, 30, 1, 0),  # K == 0: C = beta * C, which sgemv would skip
    ]
    for order, M, N, K in cases:
        for alpha, beta in [(1.0, 0.0), (0.5, 1.5)]:
            assert run_case(shim, rng, order, ta, tb, M, N, K, alpha, beta, (2, 1, 3)) == "gemm"


@pytest.mark.parametrize("ta,lda,ldb,ldc", [(N_, 4, 8, 8), (N_, 8, 4, 8), (N_, 8, 8, 4), (999, 8, 8, 8)])
def test_invalid_arguments_go_to_the_real_sgemm(shim: ctypes.CDLL, ta: int, lda: int, ldb: int, ldc: int) -> None:
    # sgemm rejects these (leading dimension too small, unknown transpose); the shim must not
    # guess, so OpenBLAS sees the call and reports the error as it always does
    c = np.zeros(8, np.float32)
    a, b = np.ones(64, np.float32), np.ones(64, np.float32)
    before = _counts(shim)
    shim.cblas_sgemm(ROW, ta, N_, 1, 8, 8, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb, 0.0, c.ctypes.data, ldc)
    assert _counts(shim) == (before[0], before[1] + 1)


def _run(code: str, *args: str, **env: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (BLAS loading is process-wide); return its last line as JSON."""
    full = {k: v for k, v in os.environ.items() if k not in ("NBLLM_GEMV", "NBLLM_BLAS")}
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=dict(full, **env),
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


MLX_PRODUCTS = """
import json, nbllm, numpy as np, mlx.core as mx
from nbllm.blas import blas_status, shim_calls
rng = np.random.default_rng(0)
def arr(*shape): return mx.array(rng.standard_normal(shape).astype(np.float32))
x, W, v, c = arr(1, 96), arr(160, 96), arr(96, 1), arr(1, 160)
Wt = arr(96, 160)
products = {
    "x @ W.T": lambda: x @ W.T,
    "x @ Wt": lambda: x @ Wt,
    "W @ v": lambda: W @ v,
    "v.T @ Wt": lambda: v.T @ Wt,
    "x @ W.T[:, ::3]": lambda: x @ W.T[:, ::3],
    "Wt.T[::2] @ v": lambda: Wt.T[::2] @ v,
    "x @ v": lambda: x @ v,
    "addmm": lambda: mx.addmm(c, x, W.T, alpha=0.5, beta=-2.0),
    "4-row": lambda: arr(4, 96) @ W.T,
}
blas_status()  # runs its own 1-row check first, so the counts below are ours
out = {"status": blas_status(), "results": {}, "counts": {}}
for name, fn in products.items():
    before = shim_calls()
    y = fn(); mx.eval(y)
    after = shim_calls()
    out["results"][name] = np.array(y).tolist()
    out["counts"][name] = None if before is None else after["forwarded"] - before["forwarded"]
print(json.dumps(out))
"""


def test_real_mlx_matmuls_reach_the_shim_and_agree_with_the_plain_path() -> None:
    on = _run(MLX_PRODUCTS, NBLLM_GEMV="1")
    off = _run(MLX_PRODUCTS, NBLLM_GEMV="0")
    assert on["status"]["active"] == "shim + OpenBLAS", on["status"]
    assert off["status"]["active"] == "OpenBLAS" and off["status"]["shim_reason"] == "turned off by NBLLM_GEMV"
    for name, got in on["results"].items():
        np.testing.assert_allclose(np.array(got), np.array(off["results"][name]), rtol=1e-5, atol=1e-4, err_msg=name)
        assert on["counts"][name] == (0 if name == "4-row" else 1), (name, on["counts"])
        assert off["counts"][name] is None
    # and against numpy, so both paths cannot be wrong together
    rng = np.random.default_rng(0)
    x, W = (rng.standard_normal(s).astype(np.float32) for s in [(1, 96), (160, 96)])
    np.testing.assert_allclose(np.array(on["results"]["x @ W.T"]), x @ W.T, rtol=1e-4, atol=1e-4)


GREEDY = """
import json, sys, nbllm, mlx.core as mx
from mlx_lm.generate import generate_step
from nbllm.blas import blas_status, shim_calls
lm = nbllm.load(sys.argv[1])
prompt = mx.array(lm.encode("The capital of France is Paris. The capital of Italy is", raw=True).ids)
tokens, logprobs = [], []
for (tok, lp), _ in zip(generate_step(prompt, lm.model, max_tokens=24), range(24)):
    tokens.append(int(tok)); logprobs.append(float(lp[tok]))
print(json.dumps({"tokens": tokens, "logprobs": logprobs, "active": blas_status()["active"], "calls": shim_calls()}))
"""


def test_greedy_tokens_are_identical_with_the_shim_on_and_off(tmp_path_factory: pytest.TempPathFactory) -> None:
    from nbllm.testing import make_model

    path = make_model(tmp_path_factory.mktemp("gemv") / "llama", "llama")
    a = _run(GREEDY, str(path), NBLLM_GEMV="1")
    b = _run(GREEDY, str(path), NBLLM_GEMV="0")
    assert (a["active"], b["active"]) == ("shim + OpenBLAS", "OpenBLAS")
    assert a["calls"]["forwarded"] > 24 * 2, a["calls"]  # every decode step's layers went through sgemv
    assert a["tokens"] == b["tokens"]
    np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-3)


def test_status_in_this_process_says_shim_and_openblas() -> None:
    status = blas.blas_status()
    if os.environ.get("NBLLM_GEMV", "").lower() in blas._OFF or os.environ.get("NBLLM_BLAS", "1").lower() in blas._OFF:
        pytest.skip("the test run itself turned the shim off")
    assert status["active"] == "shim + OpenBLAS", status
    assert status["shim_reason"].startswith("loaded"), status  # type: ignore[union-attr]
    assert "sgemv" in str(status["summary"])


def test_reference_blas_and_bad_switch_values() -> None:
    code = "import json, nbllm; print(json.dumps(nbllm.blas.blas_status()))"
    off = _run(code, NBLLM_BLAS="0")
    assert off["active"] == "reference BLAS" and off["shim"] is False
    assert "NBLLM_BLAS" in off["summary"]
    bad = subprocess.run(
        [sys.executable, "-c", "import nbllm"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, NBLLM_GEMV="maybe"),
    )
    assert bad.returncode != 0
    assert "NBLLM_GEMV: expected 0 or 1, got 'maybe'" in bad.stderr


BUILD = """
import importlib.util, sys
from setuptools import Distribution
spec = importlib.util.spec_from_file_location("nbllm_setup", "setup.py")
setup_py = importlib.util.module_from_spec(spec); spec.loader.exec_module(setup_py)
dist = Distribution({"name": "nbllm", "ext_modules": [setup_py.shim], "cmdclass": {"build_ext": setup_py.OptionalBuildExt}})
cmd = dist.get_command_obj("build_ext")
cmd.build_lib, cmd.build_temp = sys.argv[1], sys.argv[2]
dist.run_command("build_ext")
"""


def _build(tmp_path: Path, **env: str) -> Path:
    """Run setup.py's build_ext (the step pip runs) into tmp_path; return the package folder it fills."""
    out = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path / "lib"), str(tmp_path / "tmp")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp_path / "lib" / "nbllm"


def test_install_without_a_compiler_falls_back_to_plain_openblas(tmp_path: Path) -> None:
    # the build step with a compiler that does not exist succeeds and leaves a note...
    built = _build(tmp_path, CC=str(tmp_path / "no-such-cc"))
    note = built / "_gemv_shim.build-error.txt"
    assert note.exists() and "no-such-cc" in note.read_text()
    assert not list(built.glob("*.so"))
    # ...and an nbllm installed that way runs on OpenBLAS alone and says why
    pkg = tmp_path / "site" / "nbllm"
    shutil.copytree(ROOT / "nbllm", pkg, ignore=shutil.ignore_patterns("*.so", "assets", "__pycache__"))
    shutil.copy(note, pkg / note.name)
    code = "import json, nbllm.blas as b; print(json.dumps([b.__file__, b.blas_status()]))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    where, status = json.loads(out.stdout.splitlines()[-1])
    assert Path(where).parent == pkg
    assert status["active"] == "OpenBLAS", status
    assert status["shim_reason"].startswith("shim not built at install time (no C compiler?)"), status


def test_build_with_a_compiler_makes_the_shim(tmp_path: Path) -> None:
    built = _build(tmp_path)
    shims = list(built.glob("_gemv_shim*.so"))
    assert len(shims) == 1 and not (built / "_gemv_shim.build-error.txt").exists()
    lib = ctypes.CDLL(str(shims[0]), mode=ctypes.RTLD_LOCAL)
    assert lib.nbllm_gemv_init(b"/nonexistent/libopenblas.so") == 1
    assert lib.nbllm_gemv_init(b"libc.so.6") == 2  # opens, but has no cblas_sgemm
