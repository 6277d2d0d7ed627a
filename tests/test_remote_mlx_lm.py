"""nbllm.connect against mlx-lm's own server (a real third-party implementation) on a fixture model.

mlx_lm.server 0.32 streams text only (no logprobs), gives at most 10
alternatives and only without streaming, names an arbitrary top alternative as
each position's token, has no structured output and cannot continue a partial
reply. These tests check that nbllm uses what it does give and says, in one
line, what it does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import mlx_lm_server

import nbllm
from nbllm.remote import RemoteLM


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteLM]:
    server = mlx_lm_server(model_dir / "llama", tmp_path_factory.mktemp("mlx_lm") / "server.log")
    remote = nbllm.connect(server.url)
    yield remote
    remote.close()
    server.stop()


def test_the_probe_sees_what_mlx_lm_server_gives(served: RemoteLM) -> None:
    caps = served.caps
    assert caps.kind == "mlx_lm" and not caps.streamed_logprobs and caps.max_top_logprobs == 10
    assert caps.completions and not caps.json_schema and not caps.prefill


@pytest.mark.parametrize("raw", [False, True])
def test_streamed_text_is_the_in_process_greedy_text(served: RemoteLM, lm: nbllm.LM, raw: bool) -> None:
    here = lm.generate("Hello there", raw=raw, max_tokens=12, temperature=0)
    stream = served.stream("Hello there", raw=raw, max_tokens=12, temperature=0)
    tokens = list(stream)
    assert stream.text == here.text and stream.finish_reason == "length"
    assert all(t.top == () and t.logprob != t.logprob for t in tokens)  # text only: logprob unknown (NaN)


def test_alternatives_come_from_a_non_streamed_request(served: RemoteLM, lm: nbllm.LM) -> None:
    here = lm.generate("Hello there", raw=True, max_tokens=6, temperature=0, top_logprobs=5)
    there = served.generate("Hello there", raw=True, max_tokens=6, temperature=0, top_logprobs=5)
    assert [t.id for t in there.tokens] == [t.id for t in here.tokens]
    for a, b in zip(here.tokens, there.tokens):
        assert {x.id for x in b.top} == {x.id for x in a.top}
        assert abs(a.logprob - b.logprob) < 1e-3
    assert there.text == here.text


def test_the_stepper_on_a_raw_prompt(served: RemoteLM, lm: nbllm.LM) -> None:
    here, there = lm.stepper("Hello there", raw=True), served.stepper("Hello there", raw=True)
    for _ in range(4):
        assert there.step().id == here.step().id
    there.back(1)
    here.back(1)
    assert there.text == here.text and there.step().id == here.step().id
    assert {a.id for a in there.candidates()} == {a.id for a in here.candidates()}


def test_what_mlx_lm_server_lacks_is_one_line(served: RemoteLM) -> None:
    with pytest.raises(ValueError, match="no structured output"):
        served.generate("Hi", schema={"type": "object"})
    with pytest.raises(ValueError, match="top_logprobs: expected at most 10"):
        served.generate("Hi", top_logprobs=20)
    with pytest.raises(ValueError, match="not which token was taken"):
        served.generate("Hi", top_logprobs=3, temperature=1.0, max_tokens=4)
    stepper = served.stepper("Hello there")  # a chat prompt: the first distribution works, continuing does not
    assert len(stepper.candidates()) == 10
    with pytest.raises(ValueError, match="cannot continue a partial reply"):
        stepper.step()
    assert stepper.tokens == []


def test_a_chat_on_mlx_lm_server(served: RemoteLM) -> None:
    chat = nbllm.Chat(served, max_tokens=5, temperature=0)
    first = chat.send("Hi")
    assert first.text and first.finish_reason in ("length", "stop")
    chat.send("Again").text  # noqa: B018
    stats = chat.last_stats
    assert stats is not None and stats.cached_tokens > 0 and len(chat.history) == 4
