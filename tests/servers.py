"""Real servers on loopback for the remote-engine tests: nbllm serve, mlx_lm.server, and a faulty one.

Every server listens on 127.0.0.1 on a free port and is stopped by the test
that started it, by its own handle. Waiting loops are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from nbllm.serve import Server, free_port

HOST = "127.0.0.1"


class Process:
    """A server in its own process (``nbllm serve`` or ``mlx_lm.server``)."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.port, self.log = port, log
        self._out = open(log, "wb")  # noqa: SIM115  (closed by stop())
        environ = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, env=environ)
        self.wait_ready()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def wait_ready(self, seconds: float = 90.0) -> None:
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds / 0.1)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://{HOST}:{self.port}/health", timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server on port {self.port} not ready after {seconds} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


def nbllm_serve(model: str | Path | None, log: Path, port: int | None = None, *extra: str) -> Process:
    port = port or free_port()
    argv = (
        [sys.executable, "-m", "nbllm.cli", "serve"] + ([str(model)] if model else []) + ["--port", str(port), *extra]
    )
    return Process(argv, port, log)


def mlx_lm_server(model: Path, log: Path) -> Process:
    """mlx-lm's own server. Its /v1/models scans the hub cache and fails when there is none, so it gets an empty one."""
    port = free_port()
    cache = log.parent / "hub-cache"
    cache.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", HOST, "--port", str(port)]
    return Process(argv, port, log, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})


# -- a server that misbehaves on demand --------------------------------------------------------
class Faulty:
    """An OpenAI-shaped server whose completions do what ``mode`` says: ok, slow, malformed, 500, drop.

    It answers the capability probe (one-token requests) properly in every mode.
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests = 0
        app = Starlette(
            routes=[
                Route("/health", lambda r: JSONResponse({"status": "ok"})),
                Route("/v1/models", self._models),
                Route("/v1/chat/completions", self._complete, methods=["POST"]),
                Route("/v1/completions", self._complete, methods=["POST"]),
            ]
        )
        self.server = Server(app, HOST, free_port())

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "faulty", "object": "model", "owned_by": "nbllm"}]})

    async def _complete(self, request: Request) -> Response:
        body = await request.json()
        probe = body.get("max_tokens") == 1
        mode = "ok" if probe else self.mode
        self.requests += not probe
        if mode == "500":
            return JSONResponse({"error": {"message": "the model fell over"}}, status_code=500)
        if mode == "slow":
            await asyncio.sleep(3.0)
        words = ["One", " two", " three"][: body.get("max_tokens", 3)]
        if not body.get("stream"):
            return JSONResponse(_reply(words))
        return StreamingResponse(_events(words, mode), media_type="text/event-stream")


def _entry(word: str) -> dict[str, Any]:
    alts = [{"token": word, "logprob": -0.1}, {"token": " other", "logprob": -2.5}]
    return {"token": word, "logprob": -0.1, "top_logprobs": alts}


def _reply(words: list[str]) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}
    choice["logprobs"] = {"content": [_entry(w) for w in words]}
    return {"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": len(words)}}


async def _events(words: list[str], mode: str) -> Any:
    for n, word in enumerate(words):
        if mode == "malformed" and n == 1:
            yield "data: {this is not json\n\n"
            return
        if mode == "drop" and n == 2:
            raise RuntimeError("connection dropped on purpose")
        choice = {
            "index": 0,
            "delta": {"content": word},
            "logprobs": {"content": [_entry(word)]},
            "finish_reason": None,
        }
        yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        await asyncio.sleep(0.01)
    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
    yield "data: [DONE]\n\n"
