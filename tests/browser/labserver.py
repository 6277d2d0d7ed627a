"""Start and stop a real JupyterLab server for end-to-end tests (localhost, token auth, temp dirs)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KERNEL_NAME = "nbllm-test"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    """A running JupyterLab: ``url``, ``token``, the server process and its log file."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def wait_for_kernel(self, path: str, timeout: float = 90.0) -> None:
        """Wait until the session for notebook ``path`` has a connected, idle kernel."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for session in self.api("/api/sessions"):
                kernel = session.get("kernel") or {}
                if (
                    session.get("path") == path
                    and kernel.get("connections", 0) > 0
                    and kernel.get("execution_state") == "idle"
                ):
                    return
            time.sleep(0.3)
        raise TimeoutError(f"no connected idle kernel for {path} within {timeout} s")

    def page_url(self, notebook: str) -> str:
        return f"{self.url}/lab/tree/{notebook}?token={self.token}"

    def stop(self) -> None:
        """Shut down kernels and the server; kill whatever is left."""
        if self.process.poll() is None:
            try:
                for kernel in self.api("/api/kernels"):
                    self.api(f"/api/kernels/{kernel['id']}", method="DELETE")
                self.api("/api/shutdown", method="POST")
                self.process.wait(timeout=20)
            except Exception:
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def write_kernelspec(jupyter_path: Path) -> None:
    """A kernelspec running this interpreter (the venv's python with ipykernel)."""
    spec = jupyter_path / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nbllm test (venv)",
                "language": "python",
                "env": {"HF_HUB_OFFLINE": "1"},
            }
        )
    )


def write_settings(settings_dir: Path) -> None:
    """No news / update toasts over the notebook."""
    target = settings_dir / "@jupyterlab" / "apputils-extension"
    target.mkdir(parents=True, exist_ok=True)
    (target / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )


def write_notebook(path: Path, cells: list[str]) -> None:
    nb = {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": src}
            for i, src in enumerate(cells)
        ],
        "metadata": {"kernelspec": {"name": KERNEL_NAME, "display_name": "nbllm test (venv)", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1))


def start_lab(home: Path, root: Path, timeout: float = 90.0) -> Lab:
    """Start ``jupyter lab`` on a free localhost port with temp config/data/runtime dirs.

    Args:
        home: Scratch folder for Jupyter's own directories and the log.
        root: The folder the server serves.
        timeout: Seconds to wait for the server to answer.
    """
    token = secrets.token_hex(16)
    port = free_port()
    dirs = {name: home / name for name in ("config", "data", "runtime", "path", "settings", "workspaces")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    write_kernelspec(dirs["path"])
    write_settings(dirs["settings"])
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTER_PATH=str(dirs["path"]),
        HF_HUB_OFFLINE="1",
        JUPYTER_PLATFORM_DIRS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={dirs['settings']}",
        f"--LabApp.workspaces_dir={dirs['workspaces']}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=",
        "--KernelSpecManager.ensure_native_kernel=False",
        "--LabApp.extension_manager=readonly",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI often run as root
        cmd.append("--allow-root")
    log = home / "jupyterlab.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            lab.api("/api/status")
            return lab
        except OSError:
            time.sleep(0.3)
    lab.stop()
    raise TimeoutError(f"jupyter lab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
