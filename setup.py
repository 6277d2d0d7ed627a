"""Build step for nbllm's one compiled part: the Linux GEMM->GEMV shim.

Everything else about the package lives in pyproject.toml. The shim
(nbllm/_gemv_shim.c, loaded by nbllm/blas.py) is optional: where it cannot be
built (no C compiler, say) installation still succeeds, a note saying why is
left beside the package, and nbllm uses plain OpenBLAS. Never built on macOS,
where MLX uses Accelerate and Metal.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Read by nbllm.blas to say why the shim is missing; the name must match there.
BUILD_NOTE = "_gemv_shim.build-error.txt"


class OptionalBuildExt(build_ext):
    """build_ext that records a failed build instead of failing the install."""

    def build_extension(self, ext: Extension) -> None:
        note = Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_NOTE)
        try:
            super().build_extension(ext)
        except Exception as err:  # no compiler, missing headers, link errors: all mean "no shim"
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(f"{type(err).__name__}: {err}\n")
            print(f"nbllm: GEMV shim not built ({err}); nbllm will use plain OpenBLAS", file=sys.stderr)
        else:
            note.unlink(missing_ok=True)


shim = Extension(
    "nbllm._gemv_shim",
    sources=["nbllm/_gemv_shim.c"],
    libraries=["dl"],  # dlopen/dlsym live in libdl before glibc 2.34
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import the class above
    setup(
        ext_modules=[shim] if sys.platform.startswith("linux") else [],
        cmdclass={"build_ext": OptionalBuildExt},
    )
