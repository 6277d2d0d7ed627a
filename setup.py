"""Build step for nbllm's compiled parts, both for MLX's Linux CPU backend.

Everything else about the package lives in pyproject.toml. The GEMM->GEMV
shim (nbllm/_gemv_shim.c, loaded by nbllm/blas.py) and the attention softmax
(nbllm/_cpu_softmax.c, used by nbllm/sdpa.py) are optional: where one cannot
be built (no C compiler, say) installation still succeeds, a note saying why
is left beside the package, and nbllm uses plain OpenBLAS / MLX's own
attention. Never built on macOS, where MLX uses Accelerate and Metal.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Read by nbllm.blas / nbllm.sdpa to say why a part is missing; the names must match there.
BUILD_NOTES = {"nbllm._gemv_shim": "_gemv_shim.build-error.txt", "nbllm._cpu_softmax": "_cpu_softmax.build-error.txt"}
BUILD_NOTE = BUILD_NOTES["nbllm._gemv_shim"]


class OptionalBuildExt(build_ext):
    """build_ext that records a failed build instead of failing the install."""

    def build_extension(self, ext: Extension) -> None:
        note = Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_NOTES[ext.name])
        try:
            super().build_extension(ext)
        except Exception as err:  # no compiler, missing headers, link errors: all mean "no shim"
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(f"{type(err).__name__}: {err}\n")
            print(f"nbllm: {ext.name} not built ({err}); nbllm goes on without it", file=sys.stderr)
        else:
            note.unlink(missing_ok=True)


shim = Extension(
    "nbllm._gemv_shim",
    sources=["nbllm/_gemv_shim.c"],
    libraries=["dl"],  # dlopen/dlsym live in libdl before glibc 2.34
    extra_compile_args=["-O2", "-Wall"],
)
softmax = Extension(
    "nbllm._cpu_softmax",
    sources=["nbllm/_cpu_softmax.c"],
    libraries=["m"],  # expf, and glibc's vector expf (libmvec) behind it
    extra_compile_args=["-O3", "-ffast-math", "-Wall"],
)

if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import the class above
    setup(
        ext_modules=[shim, softmax] if sys.platform.startswith("linux") else [],
        cmdclass={"build_ext": OptionalBuildExt},
    )
