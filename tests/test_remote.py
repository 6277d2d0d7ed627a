"""Remote engines: ``nbllm.connect`` against real servers on loopback (``nbllm serve`` and mlx_lm.server).

The embedded model is served by the real ``nbllm serve`` command in its own
process; fixture models by ``nbllm.serve.start`` on a thread. Every server
listens on 127.0.0.1, on a free port, and is stopped by the test that started it.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from servers import Faulty, nbllm_serve

import nbllm
from nbllm.remote import RemoteLM
from nbllm.serve import start

PROMPTS = ["What is the capital of France?", "What is the capital of Japan?", "Tell me a story about a fox."]


@pytest.fixture(scope="module")
def embedded() -> nbllm.LM:
    return nbllm.load()


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    server = nbllm_serve(None, tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote(cli: object) -> Iterator[RemoteLM]:
    lm = nbllm.connect(cli.url)  # type: ignore[attr-defined]
    yield lm
    lm.close()


def ids(tokens: list[nbllm.Token]) -> list[int]:
    return [t.id for t in tokens if not t.special]


def test_the_probe_finds_what_nbllm_serve_does(remote: RemoteLM) -> None:
    caps = remote.caps
    assert (caps.kind, caps.model) == ("nbllm", "nbllm/default-model")
    assert caps.streamed_logprobs and caps.max_top_logprobs == 20 and caps.token_ids
    assert caps.completions and caps.json_schema and caps.prefill and caps.images is False
    with pytest.raises(ValueError, match="text-only model"):
        remote.generate("Describe it.", images=b"not even an image")
    assert remote.name == "nbllm/default-model" and "nbllm" in repr(remote)


@pytest.mark.parametrize("raw", [False, True])
def test_greedy_tokens_through_the_server_equal_the_in_process_stream(
    remote: RemoteLM, embedded: nbllm.LM, raw: bool
) -> None:
    for prompt in PROMPTS:
        here = embedded.generate(prompt, raw=raw, max_tokens=40, temperature=0)
        there = remote.generate(prompt, raw=raw, max_tokens=40, temperature=0)
        # nbllm serve reports the end-of-sequence token too (marked special), so even it matches
        assert [(t.id, t.special) for t in there.tokens] == [(t.id, t.special) for t in here.tokens], prompt
        assert there.text == here.text and there.finish_reason == here.finish_reason
        assert there.stats.prompt_tokens == len(embedded.encode(prompt, raw=raw))


def test_streamed_alternatives_are_the_models_own(remote: RemoteLM, embedded: nbllm.LM) -> None:
    here = embedded.generate(PROMPTS[0], max_tokens=12, temperature=0, top_logprobs=5)
    there = remote.generate(PROMPTS[0], max_tokens=12, temperature=0, top_logprobs=5)
    for a, b in zip(here.tokens, there.tokens):
        if a.special:
            break
        assert (b.id, b.piece) == (a.id, a.piece) and math.isclose(b.logprob, a.logprob, abs_tol=1e-4)
        assert [(x.id, x.piece) for x in b.top] == [(x.id, x.piece) for x in a.top]
        assert all(math.isclose(x.logprob, y.logprob, abs_tol=1e-4) for x, y in zip(a.top, b.top))
        assert b.sampled_prob is None  # a server reports the model's distribution only: not invented here


def test_a_repeated_prompt_reuses_the_servers_cache(remote: RemoteLM) -> None:
    prompt = "Tell me a story about a brave little dragon who lived on a hill."
    remote.generate(prompt, max_tokens=4, temperature=0)
    again = remote.generate(prompt, max_tokens=4, temperature=0)
    assert again.stats.prompt_tokens > 10
    assert again.stats.cached_tokens >= again.stats.prompt_tokens - 1


def test_the_openai_client_works_unchanged(cli: object, embedded: nbllm.LM) -> None:
    client = openai.OpenAI(base_url=cli.url, api_key="unused", max_retries=0)  # type: ignore[attr-defined]
    assert [m.id for m in client.models.list()] == ["nbllm/default-model"]
    chunks = list(
        client.chat.completions.create(
            model="nbllm/default-model",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=20,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    here = embedded.generate(PROMPTS[0], max_tokens=20, temperature=0, top_logprobs=5)
    assert text == here.text
    assert [e.token for e in content] == [t.piece for t in here.tokens]  # the end-of-sequence token included
    assert all(len(e.top_logprobs) == 5 for e in content)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(embedded.encode(PROMPTS[0]))
    assert chunks[-1].usage.prompt_tokens_details is not None
    plain = client.completions.create(
        model="nbllm/default-model", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=3
    )
    assert plain.choices[0].text == embedded.generate("The capital of France is", raw=True, max_tokens=3).text
    assert plain.choices[0].logprobs is not None and len(plain.choices[0].logprobs.top_logprobs[0]) == 3
    schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}}}
    structured = client.chat.completions.create(
        model="nbllm/default-model",
        messages=[{"role": "user", "content": "Give the capital of Japan as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        max_tokens=40,
        temperature=0,
    )
    assert json.loads(structured.choices[0].message.content) == {"country": "Japan", "capital": "Tokyo"}
    stopped = client.completions.create(
        model="nbllm/default-model", prompt="The capital of France is", max_tokens=10, temperature=0, stop=["."]
    )
    assert stopped.choices[0].text == " Paris" and stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model="nbllm/default-model", messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=50
        )


def test_the_stepper_steps_over_http(remote: RemoteLM, embedded: nbllm.LM) -> None:
    for raw in (True, False):
        prompt = "The capital of France is" if raw else PROMPTS[1]
        here, there = embedded.stepper(prompt, raw=raw), remote.stepper(prompt, raw=raw)
        assert [(a.id, a.piece) for a in there.candidates()] == [(a.id, a.piece) for a in here.candidates()]
        for _ in range(6):
            if here.done:
                break
            assert there.step().id == here.step().id
        assert there.text == here.text and there.done == here.done and len(here.tokens) >= 3
        twin = there.branch()
        there.back(2)
        assert there.text == here.text[: len(there.text)] and len(there.tokens) == len(here.tokens) - 2
        assert [t.id for t in twin.tokens] == [t.id for t in here.tokens]  # the branch kept its tokens
        here.back(2)
        assert there.step().id == here.step().id  # after back, the same position again
        there.choose(" Rome")
        assert there.text.endswith(" Rome") and len(twin.tokens) == len(here.tokens) + 1
    dist = remote.stepper("The capital of France is", raw=True).distribution
    assert not dist.full and len(dist.top(100)) == 10  # the stepper's default alternatives, all the server sent


def test_a_chat_on_the_server_keeps_its_history_and_reuses_the_prefix(remote: RemoteLM) -> None:
    chat = nbllm.Chat(remote, max_tokens=30, temperature=0)
    assert type(chat).__name__ == "RemoteChat" and isinstance(chat, nbllm.Chat)
    first = chat.send(PROMPTS[1]).text
    assert "Tokyo" in first
    second = chat.send(PROMPTS[0])
    assert "Paris" in second.text
    stats = chat.last_stats
    assert stats is not None and stats.cached_tokens > 0 and stats.reuse_rate is not None
    assert [m["role"] for m in chat.history] == ["user", "assistant"] * 2
    restored = nbllm.Chat.from_json(remote, chat.to_json())
    assert restored.history == chat.history
    reply = chat.send("Tell me a long story about a fox.", max_tokens=200)
    taken = [next(reply) for _ in range(3)]
    reply.cancel()
    rest = list(reply)
    assert reply.finish_reason == "cancelled" and len(rest) <= 1
    assert reply.stats.prompt_tokens > 40  # usage in every chunk (vLLM's continuous_usage_stats): known when cut short
    assert chat.history[-1]["content"] == "".join(t.text for t in taken + rest) != ""
    chat.undo()
    assert len(chat.history) == 4


def test_structured_output_goes_to_the_servers_constraint(remote: RemoteLM, embedded: nbllm.LM) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    question = "What is the capital of Japan? Answer in JSON."
    here = embedded.generate(question, schema=schema, max_tokens=30, temperature=0)
    there = remote.generate(question, schema=schema, max_tokens=30, temperature=0)
    assert there.value == here.value and isinstance(there.value, dict)
    assert isinstance(remote.generate(question, json=True, max_tokens=30, temperature=0).value, dict)
    assert remote.generate("Is Paris in France?", choices=["yes", "no"], temperature=0).value in ("yes", "no")
    number = remote.generate("A number:", raw=True, regex="[0-9]{3}", temperature=0).value
    assert len(number) == 3 and number.isdigit()


def test_what_the_server_refuses_is_one_clear_line(cli: object, remote: RemoteLM) -> None:
    url = cli.url  # type: ignore[attr-defined]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [
        (dict(chat, logprobs=True, top_logprobs=50), 400, "top_logprobs"),
        (dict(chat, n=2), 400, "n:"),
        (dict(chat, model="another-model"), 404, "serves"),
        ({"messages": []}, 400, "messages"),
        (dict(chat, max_tokens=0), 400, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
            400,
            "server-side files are never read",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            400,
            "data URIs only",
        ),
    ]
    for body, status, words in cases:
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=10)
        assert reply.status_code == status, body
        assert words in reply.json()["error"]["message"]
    bad = httpx.post(f"{url}/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    with pytest.raises(ValueError, match=r"top_logprobs: expected at most 20"):
        remote.generate("Hi", top_logprobs=21)
    with pytest.raises(ValueError, match=r"logits_processors .* need a local model"):
        remote.generate("Hi", logits_processors=[lambda tokens, logits: logits])
    with pytest.raises(ValueError, match=r"needs a local MLX model"):
        nbllm.inside.logit_lens(remote, "Hi")


@pytest.fixture(scope="module")
def fixture_server(lm: nbllm.LM) -> Iterator[object]:
    server = start(lm, max_queue=1, api_key="sekret", max_body_mb=0.01)
    yield server
    server.stop()


def test_api_key_queue_and_body_limits(fixture_server: object, lm: nbllm.LM) -> None:
    url = fixture_server.url  # type: ignore[attr-defined]
    assert httpx.get(f"{url}/models", timeout=5).status_code == 401
    with pytest.raises(PermissionError, match="401"):
        nbllm.connect(url, api_key="wrong").caps  # noqa: B018  (the probe runs on first use)
    remote = nbllm.connect(url, api_key="sekret")
    here = lm.generate("Hello there", raw=True, max_tokens=16, temperature=0)
    assert ids(remote.generate("Hello there", raw=True, max_tokens=16, temperature=0).tokens) == ids(here.tokens)
    headers = {"Authorization": "Bearer sekret"}
    big = httpx.post(f"{url}/completions", json={"prompt": "x" * 20_000}, headers=headers, timeout=10)
    assert big.status_code == 413 and "at most" in big.json()["error"]["message"]
    # one request runs, one may wait; a third is refused with 503 at once
    streams = [remote.stream("Hello there", raw=True, max_tokens=4000, temperature=0) for _ in range(2)]
    firsts = []
    waiter = threading.Thread(target=lambda: firsts.append(next(streams[1])))
    next(streams[0])
    waiter.start()
    time.sleep(0.5)
    refused = httpx.post(f"{url}/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers, timeout=10)
    assert refused.status_code == 503 and "busy" in refused.json()["error"]["message"]
    for s in streams:
        s.close()
    waiter.join(timeout=60)
    assert firsts and not waiter.is_alive()


def test_a_client_that_goes_away_cancels_its_generation(lm: nbllm.LM) -> None:
    with start(lm) as server:
        remote = nbllm.connect(server.url)
        long = remote.stream("Hello there", raw=True, max_tokens=20_000, temperature=0)
        for _ in range(5):
            next(long)
        long.close()
        tic = time.perf_counter()
        short = remote.generate("Hello there", raw=True, max_tokens=8, temperature=0)
        waited = time.perf_counter() - tic
        assert ids(short.tokens) == ids(lm.generate("Hello there", raw=True, max_tokens=8, temperature=0).tokens)
        # 20,000 tokens would take minutes here; the server stopped it when the client went
        assert waited < 10, waited


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("slow", "no reply within the 1 s timeout"),
        ("malformed", "malformed event"),
        ("500", "server error 500: the model fell over"),
        ("drop", "dropped the connection"),
    ],
)
def test_server_faults_are_clear_errors_and_lose_nothing(mode: str, message: str) -> None:
    faulty = Faulty()
    try:
        remote = nbllm.connect(faulty.url, timeout=1)
        chat = nbllm.Chat(remote)
        assert chat.send("Hello").text == "One two three"
        before = chat.history
        faulty.mode = mode
        with pytest.raises(ConnectionError, match=message):
            chat.send("Again").text  # noqa: B018
        assert chat.history == before
        stepper = remote.stepper("Once", raw=True, top_logprobs=2)
        stepper.step()
        with pytest.raises(ConnectionError, match=message):
            list(remote.stream("Once", raw=True))
        faulty.mode = "ok"
        assert chat.send("Again").text == "One two three" and len(chat.history) == 4
        assert stepper.text == "One"
    finally:
        faulty.stop()


def test_a_server_killed_mid_stream(tmp_path: Path) -> None:
    server = nbllm_serve(None, tmp_path / "a.log")
    try:
        chat = nbllm.Chat(nbllm.connect(server.url, timeout=5), max_tokens=30, temperature=0)
        chat.send(PROMPTS[1]).text  # noqa: B018
        before = chat.history
        reply = chat.send("Tell me a long story about a fox.", max_tokens=4000, temperature=1.0)
        next(reply)
        server.kill()
        with pytest.raises(ConnectionError):
            for _ in range(4000):
                next(reply)
        assert chat.history == before
        server.stop()
        server = nbllm_serve(None, tmp_path / "b.log", server.port)
        assert "Paris" in chat.send(PROMPTS[0]).text and len(chat.history) == 4
    finally:
        server.stop()


def test_vision_through_the_server(qwen: nbllm.VisionLM, vision_dir: Path) -> None:
    image = vision_dir / "a.png"
    with start(qwen) as server:
        remote = nbllm.connect(server.url)
        assert remote.caps.images is True
        # images= becomes image_url parts before the text; the server keeps parts where they are
        parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
        here = qwen.generate(parts, images=[image], max_tokens=8, temperature=0)
        there = remote.generate("Describe the picture.", images=image, max_tokens=8, temperature=0)
        assert ids(there.tokens) == ids(here.tokens) and there.text == here.text
        chat = nbllm.Chat(remote, max_tokens=6, temperature=0)
        chat.send("What is this?", images=image).text  # noqa: B018
        assert chat.history[0]["images"] == 1 and chat.send("And now?").text
