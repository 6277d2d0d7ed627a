"""The views and magics on a remote model (nbllm serve on a fixture model, on a thread, on loopback)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import nbllm
from nbllm.filters import shape_distribution, shape_known
from nbllm.remote import RemoteLM
from nbllm.sampling import SamplingParams
from nbllm.serve import start
from nbllm.widgets import ChatWidget, DistributionView, StepperWidget, StreamView


@pytest.fixture(scope="module")
def remote(lm: nbllm.LM) -> Iterator[RemoteLM]:
    with start(lm) as server:
        there = nbllm.connect(server.url)
        yield there
        there.close()


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_p=0.3), dict(temperature=0.8, min_p=0.2), dict()],
)
def test_a_top_k_only_distribution_is_exact_where_the_filters_cut_the_rest(lm: nbllm.LM, settings: dict) -> None:
    full = np.asarray(lm.stepper("Hello there", raw=True).distribution.numpy(), dtype=np.float32)
    top = [(int(i), float(full[i])) for i in np.argsort(-full)[:20]]
    params = SamplingParams(**settings)
    known = shape_known(top, params, k=10)
    exact = shape_distribution(full, params, k=10)
    assert known.ids == exact.ids and known.known == 20
    assert known.model_probs == pytest.approx(exact.model_probs, abs=1e-6)
    assert known.rest_model == pytest.approx(exact.rest_model, abs=1e-5)  # the rest's model mass is exact
    cut_inside = exact.survivors <= 20
    if cut_inside:  # every survivor is known: the sampler's probabilities are exact too
        assert known.sampled_probs == pytest.approx(exact.sampled_probs, abs=1e-5)
        assert known.survivors == exact.survivors
    else:  # the worst case for the unknown rest: at least as many survivors as known ones
        assert known.survivors >= sum(1 for c in known.cut_by if not c)


def test_distribution_and_stepper_widgets_on_a_server(remote: RemoteLM, lm: nbllm.LM) -> None:
    stepper = remote.stepper("Hello there", raw=True, top_logprobs=8)
    view = DistributionView(stepper.distribution, label=remote, k=8)
    assert view.shaped is not None and view.shaped.known == 8 and view.logprobs is None
    assert "only its top 8 tokens" in view._note.value and "only the server's top 8" in view._chart.value
    view.top_k = 2
    assert view.survivors == 2 and sum(1 for c in view.shaped.cut_by if not c) == 2
    widget = StepperWidget(stepper, k=8)
    local = lm.stepper("Hello there", raw=True, top_logprobs=8)
    widget.next_button.click()
    widget.next_button.click()
    local.step(), local.step()
    assert [t.id for t in stepper.tokens] == [t.id for t in local.tokens] and widget.stepper.text == local.text
    widget.back_button.click()
    assert len(stepper.tokens) == 1 and widget.distribution.shaped.known == 8


def test_stream_and_chat_widgets_on_a_server(remote: RemoteLM, lm: nbllm.LM) -> None:
    view = StreamView(colored=True)
    done = view.consume(remote.stream("Hello there", raw=True, max_tokens=20, top_logprobs=4, temperature=0))
    assert done.text == lm.generate("Hello there", raw=True, max_tokens=20, temperature=0).text == view.text
    assert view.n_tokens == 20 and view._html.value.count("data-a=") == 20
    eos = next(iter(lm.tokenizer.eos_token_ids))
    chat = ChatWidget(remote, max_tokens=100_000, logit_bias={eos: -1e9})
    chat.send("Tell me a very long story")
    deadline = time.monotonic() + 30
    while not chat.reply and time.monotonic() < deadline:
        time.sleep(0.005)
    chat.stop_button.click()
    assert chat.wait(30) and chat.finish_reason == "cancelled"
    assert chat.chat.history[-1] == {"role": "assistant", "content": chat.reply} and chat.reply
    # the server stopped too: a short request is answered at once, not after 100,000 tokens
    tic = time.perf_counter()
    assert remote.generate("Hi", max_tokens=3).text and time.perf_counter() - tic < 10


@pytest.fixture()
def shell() -> Iterator[InteractiveShell]:
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbllm")
    yield sh
    sh.run_line_magic("unload_ext", "nbllm")


def test_magics_connect_and_run_cells_on_a_server(
    shell: InteractiveShell, remote: RemoteLM, lm: nbllm.LM, capsys: pytest.CaptureFixture
) -> None:
    url = remote.client.base_url
    got = shell.run_line_magic("llm", f"connect {url}")
    assert isinstance(got, RemoteLM) and got.caps.kind == "nbllm"
    capsys.readouterr()
    shell.run_cell_magic("llm", "--raw -n 12 -t 0 -o out", "Hello there")
    printed = capsys.readouterr().out
    expected = lm.generate("Hello there", raw=True, max_tokens=12, temperature=0).text
    assert shell.user_ns["out"].text == expected and expected in printed
    shell.run_cell_magic("llm", f"-m {url} --raw -n 5 -t 0 -o again", "Hello there")
    assert shell.user_ns["again"].text == lm.generate("Hello there", raw=True, max_tokens=5, temperature=0).text
    capsys.readouterr()
    shell.run_cell_magic("llm", "--step -n 3", "The capital of France is")
    assert "StepperWidget" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--lens needs a local MLX model"):
        shell.run_cell_magic("llm", "--lens", "The capital of France is")
    with pytest.raises(UsageError, match="cannot connect"):
        shell.run_line_magic("llm", "connect http://127.0.0.1:9")
    with pytest.raises(UsageError, match="expected a server URL"):
        shell.run_line_magic("llm", "connect somewhere")


def test_a_stream_iterated_on_a_worker_thread_right_after_load(model_dir) -> None:
    # the embedded model's weights are cast at load; a first generation on another thread must work
    fresh = nbllm.load()
    out: list[str] = []
    worker = threading.Thread(target=lambda: out.append(fresh.generate("Hi", max_tokens=3, temperature=0).text))
    worker.start()
    worker.join(60)
    assert out and out[0] == fresh.generate("Hi", max_tokens=3, temperature=0).text
    assert math.isfinite(len(out[0]))


@pytest.mark.parametrize("raw", [True, False])
def test_the_remote_stepper_sends_ids_and_each_step_is_one_decode_step(
    remote: RemoteLM, lm: nbllm.LM, raw: bool
) -> None:
    # random weights: many tokens are partial UTF-8 characters, which text could not carry back
    there, here = remote.stepper("Hello there", raw=raw), lm.stepper("Hello there", raw=raw)
    for _ in range(12):
        if here.done:
            break
        assert there.step().id == here.step().id
    assert there.text == here.text and len(there.tokens) >= 6
    run = there._run
    prompt = len(run._server_prompt)
    assert prompt == len(here.prompt)  # the server's own tokenization, sent back as ids
    assert run.prompt_tokens == prompt + len(there.tokens) and run.cached_tokens >= run.prompt_tokens - 1
