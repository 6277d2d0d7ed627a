"""``ChatWidget``: a chat over ``nbllm.chat.Chat`` with a Stop that works mid-reply.

A cell that is running cannot receive clicks, so generation must give
control back between tokens. In a kernel (an asyncio loop is running) the
reply is an asyncio task that yields after each token, which keeps MLX on the
main thread; elsewhere (plain Python, tests) it runs on a worker thread. Stop
sets the stream's cancel flag, which ends it after the current token.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as widgets
from traitlets import Bool, Int, Unicode

from .. import render
from ..chat import Chat
from ._live import Throttle
from .progress import PrefillBar

__all__ = ["ChatWidget"]


class ChatWidget(widgets.VBox):
    """Message list, input box, Send / Stop / Regenerate / Reset, system prompt, stats.

    Args:
        chat: An ``nbllm.chat.Chat``, or an ``LM`` to start a new one.
        system: System prompt for a new chat (editable in the widget).
        max_rate: Most redraws per second while a reply streams.
        **options: Sampling settings for a new chat (as for ``nbllm.stream``).
    """

    busy = Bool(False, help="a reply is streaming").tag(sync=True)
    status = Unicode("").tag(sync=True)
    reply = Unicode("", help="the reply streaming now, or the last one").tag(sync=True)
    n_messages = Int(0).tag(sync=True)
    finish_reason = Unicode(None, allow_none=True).tag(sync=True)

    def __init__(self, chat: Any, *, system: str | None = None, max_rate: float = 30.0, **options: Any):
        self.chat = chat if isinstance(chat, Chat) else Chat(chat, system=system, **options)
        self.lm = getattr(self.chat, "lm", chat)
        self._max_rate = max_rate
        self._stream: Any = None
        self._pending = ""
        self._shown: list[dict[str, Any]] = []
        self._stop = False
        self._done = threading.Event()
        self._done.set()
        self.task: Any = None
        self._stats_before: Any = None
        self.messages = widgets.HTML(layout=widgets.Layout(max_height="420px", overflow="auto"))
        self.input = widgets.Textarea(placeholder="Message", layout=widgets.Layout(width="100%"))
        self.system_box = widgets.Text(
            value=getattr(self.chat, "system", None) or system or "", description="system", placeholder="system prompt"
        )
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.regenerate_button = widgets.Button(description="Regenerate", icon="redo")
        self.reset_button = widgets.Button(description="Reset", icon="trash")
        self.attach = widgets.FileUpload(accept="image/*", multiple=True, description="Image")
        self.stats = widgets.HTML()
        self.prefill = PrefillBar(min_total=256, max_rate=max_rate)  # a long history being processed
        self._status = widgets.HTML()
        buttons = [self.send_button, self.stop_button, self.regenerate_button, self.reset_button]
        if getattr(self.lm, "is_vision", False):
            buttons.append(self.attach)
        self.controls = widgets.HBox([*buttons, self._status])
        super().__init__(
            children=[
                self.system_box,
                self.messages,
                self.prefill,
                self.input,
                self.controls,
                self.stats,
            ]
        )
        self.add_class("nbllm-chat-widget")
        self.observe(self._show_status, "status")
        self.send_button.on_click(lambda _: self._click(self.send))
        self.stop_button.on_click(lambda _: self.stop())
        self.regenerate_button.on_click(lambda _: self._click(self.regenerate))
        self.reset_button.on_click(lambda _: self._click(self.reset))
        self.system_box.observe(self._system_changed, "value")
        self.redraw()

    # -- actions (a bad request raises here and shows in the status line; a click only shows it) --
    def _click(self, action: Callable[[], Any]) -> None:
        with contextlib.suppress(ValueError, TypeError, RuntimeError, IndexError):  # already in the status line
            action()

    def send(self, text: str | None = None) -> None:
        """Send ``text`` (default: the input box) and stream the reply."""
        text = self.input.value if text is None else text
        if not text.strip():
            self.status = "type a message first"
            raise ValueError(f"send: expected a non-empty message, got {text!r}")
        images = self._images()
        kwargs: dict[str, Any] = {"progress": self.prefill, **({"images": images} if images else {})}
        shown = self._history() + [{"role": "user", "content": text}]
        if self._start(lambda: self.chat.send(text, **kwargs), shown):
            self.input.value = ""
            self.attach.value = ()

    def regenerate(self) -> None:
        """Replace the last reply with a new one."""
        self._start(lambda: self.chat.regenerate(progress=self.prefill), self._history()[:-1])

    def stop(self) -> None:
        """Stop the reply now streaming (it ends after the current token)."""
        if not self.busy:
            return
        # Status first: once cancelled, the reply may settle (and say "stopped") at once.
        self.status = "stopping…"
        self._stop = True
        cancel = getattr(self._stream, "cancel", None)
        if cancel is not None:
            cancel()

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt)."""
        if self.busy:
            self.status = "stop the reply first"
            raise RuntimeError("reset: a reply is streaming; stop() it first")
        try:
            self.chat.reset()
        except RuntimeError as err:
            self.status = str(err)
            raise
        self.reply, self.finish_reason, self.status = "", None, ""
        self.stats.value = ""
        self.redraw()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current reply ends (worker-thread mode); True if it did."""
        return self._done.wait(timeout)

    # -- streaming -------------------------------------------------------------
    def _start(self, make_stream: Callable[[], Iterator[Any]], shown: list[dict[str, Any]]) -> bool:
        if self.busy:
            self.status = "a reply is already streaming"
            raise RuntimeError("a reply is already streaming; stop() it or wait()")
        try:
            stream = make_stream()
        except (ValueError, TypeError, RuntimeError, IndexError) as err:
            self.status = str(err)
            raise
        self._stream, self._stop, self._pending, self._shown = stream, False, "", shown
        self._stats_before = getattr(self.chat, "last_stats", None)
        self.reply, self.status, self.finish_reason = "", "replying…", None
        self.busy = True
        self._done.clear()
        self.stop_button.disabled = False
        self.send_button.disabled = self.regenerate_button.disabled = self.reset_button.disabled = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self.task = loop.create_task(self._run_async(stream))
        else:
            self.task = threading.Thread(target=self._run_thread, args=(stream,), daemon=True, name="nbllm-chat")
            self.task.start()
        return True

    def _run_thread(self, stream: Iterator[Any]) -> None:
        asyncio.run(self._run_async(stream))  # the same loop, on the worker thread's own event loop

    async def _run_async(self, stream: Iterator[Any]) -> None:
        throttle, last = Throttle(self._max_rate), None
        try:
            for token in stream:
                last = self._on_token(token, throttle)
                if self._stop and not hasattr(stream, "cancel"):
                    break
                await asyncio.sleep(0)  # let button clicks (Stop) in
        except Exception as err:  # shown in the widget: no one is there to catch it
            self.status = f"{type(err).__name__}: {err}"
        finally:
            self._finish(stream, last)

    def _on_token(self, token: Any, throttle: Throttle) -> Any:
        self._pending += token.text
        if throttle.due():
            throttle.begin()
            self.redraw(pending=self._pending)
            self.reply = self._pending
            throttle.end()
        return token

    def _finish(self, stream: Any, last: Any) -> None:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        self.prefill.layout.display = "none"
        self.redraw()  # the settled history first, so the status below never runs ahead of it
        self.reply, self._pending = self._pending, ""
        self.finish_reason = getattr(last, "finish_reason", None) or ("cancelled" if self._stop else None)
        settled = getattr(self.chat, "last_stats", None)
        stats = settled if settled is not self._stats_before else getattr(stream, "stats", None)
        line = stats.summary(self.finish_reason) if stats is not None else ""
        self.stats.value = f"<span class='nbllm-foot'>{html.escape(line)}</span>"
        if self.finish_reason == "cancelled":
            self.status = "stopped"
        elif self.status in ("stopping…", "replying…"):
            self.status = ""
        self._stream = None
        self.busy = False
        self.stop_button.disabled = True
        self.send_button.disabled = self.regenerate_button.disabled = self.reset_button.disabled = False
        self._done.set()

    # -- drawing ---------------------------------------------------------------
    def _history(self) -> list[dict[str, Any]]:
        return list(getattr(self.chat, "history", []) or [])

    def redraw(self, pending: str | None = None) -> None:
        """Redraw the message list (``pending`` is a reply still streaming)."""
        # While a reply streams, show the messages it answers (the chat adds
        # the exchange to its history only when the reply ends).
        history = self._shown if pending is not None else self._history()
        self.n_messages = len(history)
        self.messages.value = render.messages_html(history, pending=pending)

    def _show_status(self, change: Any) -> None:
        self._status.value = (
            f"<span class='nbllm-status' style='color:#a33;padding-left:8px'>{html.escape(change['new'])}</span>"
        )

    def _system_changed(self, change: Any) -> None:
        value = change["new"] or None
        if hasattr(self.chat, "system"):
            try:
                self.chat.system = value
            except (AttributeError, ValueError, TypeError) as err:
                self.status = str(err)
        self.redraw()

    def _images(self) -> list[bytes]:
        return [bytes(f["content"]) for f in (self.attach.value or ())]

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = f"ChatWidget({len(self._history())} messages)"
        data["text/html"] = render.messages_html(self._history())
        return data
