"""``nbllm serve``: a loaded model as an OpenAI-compatible server (Starlette + uvicorn, SSE streams).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (see ``nbllm.serve.protocol`` for the fields).
Requests run one at a time per model (``nbllm.serve.worker``); past
``max_queue`` waiting ones the server answers 503. Defaults are the safe
ones: it binds to 127.0.0.1, bodies over ``max_body_mb`` are refused (413),
images are data URIs unless ``allow_image_urls``, nothing is read from the
server's files, and with ``api_key`` every request needs
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..decode import token_bytes
from .protocol import BadRequest, Call, encode_prompt, parse_call
from .replies import chunk, final_reply, finish_of, usage
from .worker import Busy, Job, Worker

__all__ = ["create_app"]


def error(
    message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"
) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
    )


def create_app(
    lm: Any,
    *,
    api_key: str | None = None,
    max_queue: int = 16,
    max_body_mb: float = 20.0,
    allow_image_urls: bool = False,
) -> Starlette:
    """The ASGI app serving ``lm`` (run it with uvicorn, or ``nbllm serve``)."""
    worker = Worker(lm, max_queue=max_queue)
    limit = int(max_body_mb * 1e6)
    known: dict[int, bytes] = {}

    def bytes_of(token_id: int) -> bytes:
        if token_id not in known:
            known[token_id] = token_bytes(lm.tokenizer, token_id)
        return known[token_id]

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def health(request: Request) -> Response:
        if not authorized(request):
            return error("missing or wrong bearer token", 401, kind="authentication_error")
        return JSONResponse({"status": "ok", "model": lm.name})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return error("missing or wrong bearer token", 401, kind="authentication_error")
        kinds = ["completion", "vision"] if lm.is_vision else ["completion"]  # Ollama's word for it
        entry = {"id": lm.name, "object": "model", "created": 0, "owned_by": "nbllm", "capabilities": kinds}
        return JSONResponse({"object": "list", "data": [entry]})

    async def complete(request: Request, chat: bool) -> Response:
        if not authorized(request):
            return error("missing or wrong bearer token", 401, kind="authentication_error")
        try:
            body = await _read_json(request, limit)
            call = parse_call(body, chat, allow_image_urls)
            call.bytes_of = bytes_of
            if body.get("model") not in (None, "", "default", lm.name):
                return error(f"model: this server serves {lm.name!r}, not {body['model']!r}", 404, "model")
        except BadRequest as err:
            return error(str(err), err.status, err.param)
        job = Job(lambda model, cache: _stream(model, cache, call), asyncio.get_running_loop())
        try:
            worker.submit(job)
        except Busy as err:
            return error(str(err), 503, kind="server_busy")
        tokens = job.tokens()
        try:
            first = await tokens.__anext__()
        except StopAsyncIteration:
            first = None
        except (ValueError, TypeError) as err:  # nbllm's argument checks: the request was wrong
            return error(str(err).splitlines()[0], 400)
        except Exception as err:
            return error(f"{type(err).__name__}: {err}", 500, kind="server_error")
        except asyncio.CancelledError:
            job.cancel()
            raise
        if call.stream:
            return StreamingResponse(_events(call, lm.name, first, tokens, job), media_type="text/event-stream")
        got = [] if first is None else [first]
        try:
            async for token in tokens:
                got.append(token)
        except Exception as err:
            return error(f"{type(err).__name__}: {err}", 500, kind="server_error")
        except asyncio.CancelledError:
            job.cancel()
            raise
        assert job.stats is not None
        return JSONResponse(final_reply(call, lm.name, got, job.stats, job.prompt_ids))

    async def chat_route(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions_route(request: Request) -> Response:
        return await complete(request, chat=False)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat_route, methods=["POST"]),
            Route("/v1/completions", completions_route, methods=["POST"]),
        ],
        lifespan=_lifespan(worker),
    )
    app.state.worker = worker
    return app


def _lifespan(worker: Worker) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        worker.stop()

    return lifespan


def _stream(lm: Any, cache: Any, call: Call) -> Any:
    """Runs on the worker thread: the token stream for one request."""
    prompt = encode_prompt(lm, call)
    raw = not call.chat and isinstance(prompt, str)
    return lm.stream(prompt, prompt_cache=cache, raw=raw, images=call.images or None, **call.kwargs)


async def _read_json(request: Request, limit: int) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise BadRequest(f"request body: expected at most {limit // 1_000_000} MB", status=413)
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise BadRequest(f"request body: expected at most {limit // 1_000_000} MB", status=413)
    try:
        return json.loads(data)
    except ValueError:
        raise BadRequest("request body: expected JSON") from None


async def _events(call: Call, model: str, first: Any, tokens: AsyncIterator[Any], job: Job) -> AsyncIterator[str]:
    """The SSE stream: one event per token, the finish, usage when asked, ``[DONE]``."""
    try:
        pending = [] if first is None else [first]
        started = False
        last = None
        while True:
            for token in pending:
                last = token
                finish = finish_of(token) if token.finish_reason else None
                event = chunk(call, model, [token], token.text, finish, not started, job.prompt_ids)
                stream = job.stream
                if call.continuous_usage and stream is not None:
                    event["usage"] = usage(stream.stats)
                yield _sse(event)
                started = True
            try:
                pending = [await tokens.__anext__()]
            except StopAsyncIteration:
                break
        if last is None or last.finish_reason is None:
            yield _sse(chunk(call, model, [], "", "stop", not started))
        if call.include_usage and job.stats is not None:
            yield _sse(
                {
                    "id": "usage",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [],
                    "usage": usage(job.stats),
                }
            )
        yield "data: [DONE]\n\n"
    except Exception as err:  # mid-stream: the status is already sent, so the error goes in an event
        yield _sse({"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error", "code": 500}})
    finally:
        job.cancel()  # a client that went away: the worker ends this generation after the current token


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
