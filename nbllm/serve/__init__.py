"""``nbllm serve``: nbllm's engine as an OpenAI-compatible HTTP server.

``create_app(lm)`` is the ASGI app; ``start(lm)`` runs it on a background
thread of this process (a notebook, a test) and returns a handle with
``url`` and ``stop()``; the ``nbllm serve`` command runs it in its own process.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from .app import create_app

__all__ = ["create_app", "start", "Server", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Server:
    """A running server on a background thread: ``url`` (its ``/v1`` root) and ``stop()``."""

    def __init__(self, app: Any, host: str, port: int):
        import uvicorn

        self.host, self.port = host, port
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="nbllm-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"nbllm serve: the server did not start on {host}:{port}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Server({self.url})"


def start(lm: Any, *, host: str = "127.0.0.1", port: int | None = None, **options: Any) -> Server:
    """Serve ``lm`` from a background thread of this process (``options`` as for ``create_app``)."""
    return Server(create_app(lm, **options), host, port or free_port(host))
