"""nbllm.connect against llama.cpp's own server (llama-server, C++) on a GGUF of the embedded model.

``scripts/llama_server`` builds the binary once per machine; ``scripts/test``
starts that build in the background when it is missing, and these tests wait
for it (bounded), failing if it failed. ``NBLLM_LLAMA_CPP=0`` skips them; run
alone without a binary, they are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import Process

import nbllm
from nbllm.remote import RemoteLM
from nbllm.serve import free_port
from nbllm.testing.gguf import write_gguf

ROOT = Path(__file__).resolve().parents[1]
BUILD_WAIT_S = 45 * 60  # a cold build on 2 busy cores took ~20 min


def llama_server() -> Path:
    if os.environ.get("NBLLM_LLAMA_CPP") == "0":
        pytest.skip("NBLLM_LLAMA_CPP=0")
    binary = Path(subprocess.check_output([str(ROOT / "scripts" / "llama_server"), "--path"], text=True).strip())
    marker = os.environ.get("NBLLM_LLAMA_CPP_BUILDING")  # a file scripts/test removes when its build ends
    deadline = time.monotonic() + BUILD_WAIT_S
    while marker and Path(marker).exists() and not binary.exists() and time.monotonic() < deadline:
        time.sleep(5)
    if binary.exists():
        return binary
    message = f"llama-server not built ({binary}); scripts/llama_server builds it (10-20 min once)"
    if os.environ.get("NBLLM_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def embedded() -> nbllm.LM:
    return nbllm.load()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteLM]:
    binary = llama_server()
    tmp = tmp_path_factory.mktemp("llama.cpp")
    model = write_gguf(ROOT / "nbllm" / "assets" / "default-model", tmp / "default-model.gguf")
    port = free_port()
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "256", "-t", "1"]
    server = Process(argv, port, tmp / "server.log")
    remote = nbllm.connect(server.url)
    yield remote
    remote.close()
    server.stop()


def test_the_probe_sees_a_llama_cpp_server(served: RemoteLM) -> None:
    caps = served.caps
    assert caps.kind == "llama.cpp" and caps.streamed_logprobs and caps.max_top_logprobs == 20
    assert caps.token_ids and caps.completions and caps.json_schema


@pytest.mark.parametrize("raw", [False, True])
def test_greedy_tokens_and_alternatives_match_in_process(served: RemoteLM, embedded: nbllm.LM, raw: bool) -> None:
    for prompt in ("What is the capital of France?", "Tell me a story about a fox."):
        here = embedded.generate(prompt, raw=raw, max_tokens=30, temperature=0, top_logprobs=5)
        there = served.generate(prompt, raw=raw, max_tokens=30, temperature=0, top_logprobs=5)
        assert [t.id for t in there.tokens if not t.special] == [t.id for t in here.tokens if not t.special]
        assert there.text == here.text and there.finish_reason == here.finish_reason
        assert there.tokens[-1].special == here.tokens[-1].special  # its end token, streamed without text, is marked
        for a, b in zip(here.tokens, there.tokens):
            if a.special:
                break
            assert abs(a.logprob - b.logprob) < 2e-3  # fp16 weights in the GGUF
            assert [x.id for x in b.top[:3]] == [x.id for x in a.top[:3]]


def test_stepper_chat_and_structured_output(served: RemoteLM, embedded: nbllm.LM) -> None:
    for raw in (True, False):
        here = embedded.stepper("The capital of France is" if raw else "What is the capital of Japan?", raw=raw)
        there = served.stepper("The capital of France is" if raw else "What is the capital of Japan?", raw=raw)
        for _ in range(5):
            if here.done:
                break
            assert there.step().id == here.step().id
        assert there.text == here.text
    chat = nbllm.Chat(served, max_tokens=30, temperature=0)
    assert "Tokyo" in chat.send("What is the capital of Japan?").text
    assert "Paris" in chat.send("What is the capital of France?").text
    assert chat.last_stats.cached_tokens > 0
    schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}}}
    value = served.generate("Give the capital of Japan as JSON.", schema=schema, max_tokens=40, temperature=0).value
    assert value == embedded.generate("Give the capital of Japan as JSON.", schema=schema, max_tokens=40).value
    assert served.generate("Is Paris in France?", choices=["yes", "no"], temperature=0).value in ("yes", "no")
    with pytest.raises(ValueError, match="no documented way to enforce regex"):
        served.generate("A number:", raw=True, regex="[0-9]+")


if __name__ == "__main__":  # a quick manual run
    sys.exit(pytest.main([__file__, "-q"]))
