"""A remote server behind the engine seam: the same ``Run`` the token loop and the stepper drive.

``generate`` streams one request and turns each chunk's token entries into
``Step`` records (a chunk's text is one step when the server streams no
logprobs); when the server gives alternatives only without streaming (mlx_lm
.server) and they were asked for, it makes one non-streamed request instead
and yields its tokens at the end. The stepper's moves are one ``max_tokens=1``
request per position on the text so far; the distributions of the positions
already visited are kept, so ``back`` costs nothing and ``branch`` copies lists.

A server ends a reply with ``finish_reason`` rather than an end-of-sequence
token; ``stop`` becomes a last record with the local key ``END`` (no text,
logprob unknown), as an in-process stream ends with its EOS record.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from typing import Any

from ..distribution import Distribution
from ..engine import Cancelled, Request, Step
from .caps import Capabilities
from .http import Client, EventStream
from .vocab import RemoteTokenizer
from .wire import Entry, entries_of, logprob_fields, sampling_fields, text_of, usage_of

__all__ = ["RemoteEngine", "RemoteRun"]


class RemoteEngine:
    """Starts runs on one server for one model."""

    def __init__(self, client: Client, caps: Callable[[], Capabilities], vocab: RemoteTokenizer):
        self.client, self._caps, self.vocab = client, caps, vocab

    @property
    def caps(self) -> Capabilities:
        return self._caps()

    def start(self, request: Request, cache: Any = None, owner: Any = None) -> RemoteRun:
        if cache is not None:
            raise ValueError("prompt_cache: a remote model keeps its cache on the server; expected None")
        caps = self.caps
        if request.logits_processors:
            raise ValueError(caps.lacks("logits_processors run in this process; they need a local model"))
        if request.top_logprobs > caps.max_top_logprobs:
            most = caps.max_top_logprobs
            raise ValueError(
                caps.lacks(f"top_logprobs: expected at most {most} (what it returns), got {request.top_logprobs}")
            )
        if request.draft_model is not None:
            raise ValueError(caps.lacks("speculative decoding with draft_model= needs a local model"))
        return RemoteRun(self, request)


class RemoteRun:
    """One position over a remote prompt: the ids taken so far and each visited position's distribution."""

    def __init__(self, engine: RemoteEngine, request: Request):
        self._engine, self.request = engine, request
        self.constraint = request.constraint
        self.cached_tokens = 0
        self.prompt_tokens: int | None = None
        self.ended: str | None = None
        self.ids: list[int] = list(request.prompt.ids)
        self._positions: list[tuple[Distribution, int]] = []  # per visited position: (dist, server's draw)
        self._server_prompt: list[int] | None = None  # the prompt's ids as the server tokenized it
        self._stream: EventStream | None = None

    # -- the fast loop -------------------------------------------------------------
    def generate(self, cancelled: Callable[[], bool]) -> Generator[Step, None, None]:
        caps, k = self._engine.caps, self.request.top_logprobs
        path, body = self._path, self._body(self.request.max_tokens, k if caps.max_top_logprobs else None)
        if k and not caps.streamed_logprobs:  # alternatives only without streaming (mlx_lm.server)
            reply = self._engine.client.post(path, body)
            self._note_usage(reply)
            for step in self._steps(reply):
                if cancelled():
                    raise Cancelled
                yield step
            return
        body["stream_options"] = {"include_usage": True}
        if caps.kind in ("nbllm", "vllm"):  # usage in every chunk: a stream cut short still knows its prompt
            body["stream_options"]["continuous_usage_stats"] = True
        held: Step | None = None
        vocab = self._engine.vocab
        self._stream = self._engine.client.stream(path, body)
        try:
            for event in self._stream:
                self._note_usage(event)
                for step in self._steps(event):
                    if step.token == vocab.END and held is not None and vocab.bytes_of(held.token) == b"":
                        vocab.mark_end(held.token)  # llama.cpp streams the end token (no text) before its finish
                        continue
                    if held is not None:
                        yield held
                    held = step
                if cancelled() and held is not None and held.finish is None:
                    break
        finally:
            self._stream.close()
            self._stream = None
        if held is not None:
            yield held

    def interrupt(self) -> None:
        """Close the HTTP stream now (a Stop button); the loop then ends with what has arrived."""
        stream = self._stream
        if stream is not None:
            stream.close()

    def _steps(self, reply: dict[str, Any]) -> list[Step]:
        """The steps one event (or a whole reply) carries; a finish marks the last one, or adds ``END``."""
        choices = reply.get("choices") or []
        if not choices:
            return []
        choice, vocab, caps = choices[0], self._engine.vocab, self._engine.caps
        entries = entries_of(choice, caps.raw_pieces)
        text = text_of(choice)
        if caps.kind == "mlx_lm" and any(e.top for e in entries):
            entries = self._mlx_lm_entries(entries, text)
        if not entries and text:
            entries = [Entry(text, None, None)]
        texts = _texts(entries, text)
        steps = []
        for e, t in zip(entries, texts):
            steps.append(Step(vocab.key(e.piece, e.id, e.raw), _dist(e, vocab), text=t))
            if e.special:
                vocab.mark_end(steps[-1].token)
        finish = choice.get("finish_reason")
        if finish == "stop" and entries and not entries[-1].piece and not entries[-1].raw and steps:
            vocab.mark_end(steps[-1].token)  # llama.cpp reports the end token, with no text, when not streaming
        if finish == "stop":
            if not steps or steps[-1].token not in vocab.eos_token_ids:
                steps.append(Step(vocab.END, Distribution(top=[], vocab_size=None)))
        elif finish:
            if steps:
                steps[-1] = replace(steps[-1], finish=str(finish))
            else:
                self.ended = str(finish)
        return steps

    def _mlx_lm_entries(self, entries: list[Entry], text: str) -> list[Entry]:
        """mlx_lm.server (0.32) names an arbitrary one of the top alternatives as each position's token.

        Greedy decoding took the most likely one; one sampled token is the one
        whose text is the reply's. Several sampled tokens cannot be told apart.
        """
        if self.request.params.greedy:
            return [Entry(*max(e.top, key=lambda t: t[2]), e.top) for e in entries]
        if len(entries) == 1:
            match = [t for t in entries[0].top if t[0] == text]
            piece, sid, lp = match[0] if match else (text, None, None)
            return [Entry(piece, sid, lp, entries[0].top)]
        raise ValueError(
            self._engine.caps.lacks(
                "with sampling it reports alternatives but not which token was taken; "
                "use temperature=0, or top_logprobs=0"
            )
        )

    # -- the stepper's moves ---------------------------------------------------------
    def prefill(self, cancelled: Callable[[], bool] | None = None) -> None:
        if not self._positions:
            self._positions.append(self._fetch())

    def distribution(self) -> Distribution:
        return self._positions[len(self.ids) - len(self.request.prompt)][0]

    def sample(self) -> int:
        return self._positions[len(self.ids) - len(self.request.prompt)][1]

    def advance(self, token: int) -> Step:
        dist = self.distribution()
        self.ids.append(token)
        try:
            if token not in self._engine.vocab.eos_token_ids:
                self._positions.append(self._fetch())
        except BaseException:
            self.ids.pop()
            raise
        return Step(token, dist)

    def trim(self, n: int) -> None:
        if n:
            del self.ids[len(self.ids) - n :]
            del self._positions[len(self.ids) - len(self.request.prompt) + 1 :]

    def fork(self) -> RemoteRun:
        twin = copy.copy(self)
        twin.ids, twin._positions, twin._stream = list(self.ids), list(self._positions), None
        twin._server_prompt = None if self._server_prompt is None else list(self._server_prompt)
        return twin

    def close(self) -> None:
        self.interrupt()

    def _fetch(self) -> tuple[Distribution, int]:
        """The next position's distribution and the server's draw from it: one ``max_tokens=1`` request."""
        caps = self._engine.caps
        k = min(max(self.request.top_logprobs, 1), caps.max_top_logprobs)
        if caps.max_top_logprobs == 0:
            raise ValueError(caps.lacks("it returns no logprobs, so its distributions cannot be shown"))
        # mlx_lm.server 0.32 fails ("empty prompt", and its generation thread dies) when a prompt is
        # exactly a sequence it cached, which one max_tokens=1 request after another makes: ask for 2.
        if self.constraint is not None and len(self.ids) > len(self.request.prompt):
            raise ValueError(caps.lacks("it applies a constraint to a whole reply, so a stepper cannot continue one"))
        path, body = self._request(2 if caps.kind == "mlx_lm" else 1, k)
        if self._server_prompt is None and caps.kind in ("nbllm", "vllm"):
            body["return_token_ids"] = True
        reply = self._engine.client.post(path, body)
        ids = reply.get("prompt_token_ids") or next(iter(reply.get("choices") or [{}])).get("prompt_token_ids")
        if self._server_prompt is None and isinstance(ids, list) and all(isinstance(t, int) for t in ids):
            self._server_prompt = ids  # from now on the stepper sends ids: exact, whatever the text
        self._note_usage(reply)
        steps = self._steps(reply)[:1]
        return steps[0].dist, steps[0].token  # the first token, or END when the server ended the reply here

    # -- requests --------------------------------------------------------------------
    @property
    def _path(self) -> str:
        return "/completions" if self.request.prompt.continuation else "/chat/completions"

    def _request(self, max_tokens: int, k: int | None) -> tuple[str, dict[str, Any]]:
        """Where to send the next position's request, and its body: ids when the server gave them, else text."""
        caps, prompt = self._engine.caps, self.request.prompt
        taken = self.ids[len(prompt) :]
        base = self._server_prompt if self._server_prompt is not None else (list(prompt.ids) or None)
        if base is None or not caps.completions or any(t < 0 for t in taken):
            return self._path, self._body(max_tokens, k)
        body = self._body(max_tokens, None, text_prompt=False)
        body["prompt"] = base + taken
        if k is not None:
            body.update(logprob_fields(False, k, legacy_int=caps.kind not in ("mlx_lm", "nbllm")))
        return "/completions", body

    def _body(self, max_tokens: int, k: int | None, text_prompt: bool = True) -> dict[str, Any]:
        caps, prompt, request = self._engine.caps, self.request.prompt, self.request
        body: dict[str, Any] = {"model": caps.model, "max_tokens": max_tokens}
        body.update(sampling_fields(request.params, request.logit_bias))
        if request.stop:
            body["stop"] = list(request.stop)
        if self.constraint is not None:
            body.update(self.constraint.fields(caps))
        if not text_prompt:
            return body
        taken = self._engine.vocab.decode(self.ids[len(prompt) :])
        if prompt.continuation:
            if not caps.completions:
                raise ValueError(caps.lacks("no raw completions (/v1/completions); use a chat prompt (raw=False)"))
            text = getattr(prompt, "text", None)
            body["prompt"] = (text + taken) if text is not None else list(prompt.ids)
            if text is None and taken:
                raise ValueError(caps.lacks("a token-id prompt can be stepped only before its first token"))
        else:
            messages = list(getattr(prompt, "messages", ()) or ())
            if taken:
                if not caps.prefill:
                    raise ValueError(
                        caps.lacks("it cannot continue a partial reply; step through a raw prompt (raw=True)")
                    )
                messages.append({"role": "assistant", "content": taken})
                body.update(continue_final_message=True, add_generation_prompt=False)
            body["messages"] = messages
        if k is not None:
            body.update(logprob_fields(not prompt.continuation, k, legacy_int=caps.kind not in ("mlx_lm", "nbllm")))
        return body

    def _note_usage(self, event: dict[str, Any]) -> None:
        usage = usage_of(event)
        if usage is not None:
            self.prompt_tokens, self.cached_tokens = usage


def _texts(entries: list[Entry], text: str) -> Sequence[str | None]:
    """The text each entry adds: the chunk's content is the truth (a piece may be a partial character)."""
    if len(entries) == 1:
        return [text]
    if "".join(e.piece for e in entries if not e.special) == text:
        return [None] * len(entries)
    return [""] * (len(entries) - 1) + [text]  # cannot be split: all of it with the last token


def _dist(entry: Entry, vocab: RemoteTokenizer) -> Distribution:
    """The position's known entries: the alternatives, and the taken token when it is not among them."""
    top = [(vocab.key(p, i), lp) for p, i, lp in entry.top]
    own = vocab.key(entry.piece, entry.id)
    if entry.logprob is not None and all(t != own for t, _ in top):
        top.append((own, entry.logprob))
    return Distribution(top=top, vocab_size=None)
