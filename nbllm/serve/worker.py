"""One model, one thread: requests run one at a time, in order, from a bounded queue.

MLX work stays on the worker thread (its thread-local generation stream, see
``nbllm.mlx_engine``), and one ``PromptCache`` serves every request, so a
prompt that shares a prefix with the previous one (the next chat turn, the
stepper's next position) reuses it. Each job streams its ``Token`` records to
the event loop that asked; cancelling a job (the client went away) ends its
stream after the current token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..cache import PromptCache
from ..tokens import Stats, Token

__all__ = ["Worker", "Job", "Busy"]

_DONE = object()


class Busy(Exception):
    """The queue is full: the server answers 503."""


class Job:
    """One request on the worker: ``build(lm, cache)`` returns the stream to run."""

    def __init__(self, build: Callable[[Any, PromptCache], Any], loop: asyncio.AbstractEventLoop):
        self.build, self._loop = build, loop
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self.stream: Any = None
        self.stats: Stats | None = None
        self.prompt_ids: tuple[int, ...] | None = None
        self.cancelled = threading.Event()

    def put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._items.put_nowait, item)

    def cancel(self) -> None:
        """End after the current token (the client disconnected)."""
        self.cancelled.set()
        stream = self.stream
        if stream is not None:
            stream.cancel()

    async def tokens(self) -> AsyncIterator[Token]:
        """The records as they come; raises what the generation raised."""
        while True:
            item = await self._items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    """The thread that runs one model's requests.

    Args:
        lm: The loaded model.
        max_queue: Requests that may wait while one runs (more get ``Busy``).
    """

    def __init__(self, lm: Any, max_queue: int = 16):
        self.lm = lm
        self.cache = PromptCache(lm)
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name=f"nbllm-serve-{lm.name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"the server is busy: {self._jobs.maxsize} requests are waiting; try again later") from None

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.put(_DONE)
                continue
            try:
                job.stream = job.build(self.lm, self.cache)
                job.prompt_ids = job.stream.prompt.ids
                if job.cancelled.is_set():
                    job.stream.cancel()
                for token in job.stream:
                    job.put(token)
                job.stats = job.stream.stats
                job.put(_DONE)
            except BaseException as err:  # handed to the request: a 400 or 500 there
                job.put(err)
            finally:
                if job.stream is not None:
                    job.stream.close()
                job.stream = None
