"""Open the teaching notebooks in JupyterLab, or execute them headless."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["notebooks_dir", "list_notebooks", "execute_notebook", "open_lab", "NotebookRun"]


def notebooks_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The teaching notebooks folder: ``path``, or ``notebooks/`` beside the package (a source checkout)."""
    found = Path(path) if path is not None else Path(__file__).resolve().parent.parent / "notebooks"
    if not found.is_dir():
        raise FileNotFoundError(
            f"no notebooks folder at {found}: expected a source checkout of nbllm, or pass a folder"
        )
    return found


def list_notebooks(folder: Path) -> list[Path]:
    """Notebooks in ``folder``, in teaching order (by file name)."""
    return sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))


@dataclass
class NotebookRun:
    """Result of executing one notebook."""

    path: Path
    seconds: float
    cells: int
    error: str | None = None


def execute_notebook(
    path: Path, timeout: int = 300, output: Path | None = None, probes: Sequence[str] = ()
) -> NotebookRun:
    """Run every cell of a notebook in a fresh kernel of this Python.

    Args:
        path: The notebook.
        timeout: Seconds allowed per cell.
        output: Where to write the executed copy (default: nowhere; the source is never modified).
        probes: Code cells to run after the notebook's own, in the same kernel (tests use them to
            read the notebook's results); their outputs are in the written copy, ``cells`` omits them.

    Returns:
        A ``NotebookRun``; ``error`` holds the failing cell's error name and message.
    """
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    cells = sum(1 for c in nb.cells if c.cell_type == "code")
    nb.cells.extend(nbformat.v4.new_code_cell(source) for source in probes)
    sockets = tempfile.mkdtemp(prefix="nbllm-kernel-")
    # IPC sockets (an absolute path: the kernel runs in the notebook's folder), not TCP on localhost:
    # no port to reach from outside, and no "running over TCP without encryption" warning in the notebook.
    km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
    client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except CellExecutionError as err:
        error = f"{err.ename}: {err.evalue}"
    finally:
        if km.has_kernel:  # a kernel manager we made is ours to stop
            km.shutdown_kernel(now=True)
        shutil.rmtree(sockets, ignore_errors=True)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, output / path.name)
    return NotebookRun(path, time.perf_counter() - start, cells, error)


def open_lab(folder: Path, extra: list[str]) -> None:
    """Replace this process with JupyterLab on ``folder`` (same Python, so the same nbllm)."""
    args = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={folder}", *extra]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in extra:
        args.append("--allow-root")  # containers (CI, Docker) often run as root
    os.execv(sys.executable, args)
