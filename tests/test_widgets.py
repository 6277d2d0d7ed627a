"""Render functions and widgets, driven like a user would (``.click()``, sliders), on the real stack."""

from __future__ import annotations

import html
import re
import time

import numpy as np
import pytest
from oracle import mlx_lm_distribution

import nbllm
from nbllm import render
from nbllm.filters import shape_distribution
from nbllm.sampling import SamplingParams
from nbllm.tokens import Alternative, Token
from nbllm.widgets import ChatWidget, DistributionView, StepperWidget, StreamView, _live


# -- render -------------------------------------------------------------------
def _logprobs(n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32) * 2.0
    return x - np.log(np.exp(x.astype(np.float64)).sum()).astype(np.float32)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.8),
        dict(temperature=1.3, min_p=0.1),
        dict(temperature=0.5, top_k=5),
        dict(temperature=1.0, top_p=0.9, min_p=0.05, top_k=7),
        dict(temperature=0.0, top_k=3),
    ],
)
def test_shape_distribution_matches_the_sampler(settings: dict) -> None:
    lp = _logprobs()
    shaped = shape_distribution(lp, SamplingParams(**settings), k=lp.shape[0])
    expected = mlx_lm_distribution(lp, SamplingParams(**settings))
    got = np.zeros_like(expected)
    got[list(shaped.ids)] = shaped.sampled_probs
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert shaped.survivors == int((expected > 0).sum())
    for p, cut in zip(shaped.sampled_probs, shaped.cut_by):
        assert (p == 0) == (cut != "")


def test_shape_distribution_names_the_filter_that_cut_each_token() -> None:
    lp = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04], dtype=np.float32))
    shaped = shape_distribution(lp, SamplingParams(temperature=1.0, top_p=0.75), k=5)
    assert shaped.cut_by == ("", "", "top-p", "top-p", "top-p")
    shaped = shape_distribution(lp, SamplingParams(temperature=1.0, min_p=0.15, top_k=1), k=5)
    assert shaped.cut_by == ("", "top-k", "top-k", "min-p", "min-p")
    rest = shape_distribution(lp, SamplingParams(temperature=1.0), k=2)
    assert rest.rest_model == pytest.approx(0.2, abs=1e-6) and rest.survivors == 5


def test_token_span_colours_marks_and_lists_alternatives() -> None:
    alts = (Alternative(7, " the", float(np.log(0.6)), 0.7), Alternative(9, " a", float(np.log(0.3)), 0.3))
    tok = Token(id=9, text=" a", piece=" a", logprob=float(np.log(0.3)), top=alts, forced=True)
    span = render.token_span(tok)
    assert "background:hsl(36," in span and 'class="t f"' in span
    tip = html.unescape(re.search(r'data-a="([^"]*)"', span).group(1))
    assert "60.0% ' the'" in tip and "▸ 30.0% ' a'" in tip
    assert 'title="' in render.token_span(tok, tooltips="title")
    masked = Token(id=9, text=" a", piece=" a", logprob=0.0, forced=True, masked_prob=0.25)
    assert "constraint removed 25.0% of the model's probability" in render.alternatives_text(masked)
    plain = render.token_span(Token(id=1, text="x<y", piece="x<y", logprob=0.0), colored=False)
    assert plain == '<span class="t">x&lt;y</span>'


def test_distribution_figure_without_pyplot() -> None:
    import sys

    fig = render.distribution_figure(shape_distribution(_logprobs(), SamplingParams(top_k=3, temperature=1.0), k=5))
    assert type(fig).__name__ == "Figure" and len(fig.axes[0].patches) == 12  # 6 rows x (model, sampled)
    assert "matplotlib.pyplot" not in sys.modules or fig.canvas.manager is None


def test_throttle_coalesces_with_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(_live.time, "perf_counter", lambda: now[0])
    t = _live.Throttle(max_rate=30.0, budget=0.1)
    assert t.due()
    t.begin()
    t.end()
    now[0] += 0.01
    assert not t.due()
    now[0] += 0.03
    assert t.due()
    t.begin()
    now[0] += 0.02
    t.end()  # a 20 ms redraw: wait 200 ms, not 33 ms
    now[0] += 0.1
    assert not t.due()
    now[0] += 0.1
    assert t.due()
    t.begin()
    t.end(sent_bytes=200_000)  # shipping 200 KB is charged too: 10 ms -> wait 100 ms
    now[0] += 0.09
    assert not t.due()
    now[0] += 0.02
    assert t.due()


# -- stream view ----------------------------------------------------------------
def test_stream_view_consumes_a_real_stream(lm: nbllm.LM) -> None:
    view = StreamView(colored=True)
    ts = nbllm.stream(lm, "Hello", max_tokens=40, top_logprobs=4, temperature=0.9, seed=3)
    completion = view.consume(ts)
    reference = nbllm.generate(lm, "Hello", max_tokens=40, temperature=0.9, seed=3)
    assert completion.text == reference.text == view.text
    assert view.n_tokens == len(completion.tokens) == 40 and view.status == "done" and view.finish_reason == "length"
    assert view._html.value.count('class="t') == 40 and view._html.value.count("data-a=") == 40
    assert "40 tokens at" in view._foot.value
    view.colored = False
    assert "background:hsl" not in view._html.value
    bundle = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and 'title="' in bundle["text/html"]


def test_stream_view_shows_prefill_progress() -> None:
    view = StreamView()
    view.progress(10, 100)
    assert view.status == "prefill" and view._progress.value == 10 and view._progress.layout.display is None
    view.progress(100, 100)
    assert view._progress.layout.display == "none"


# -- distribution view -------------------------------------------------------------
def test_distribution_sliders_reshape_from_the_stored_vector() -> None:
    lp = _logprobs(128)
    view = DistributionView(lp, temperature=1.0, k=8)
    assert view.survivors == 128
    view.sliders["top_k"].value = 5
    assert view.top_k == 5 and view.survivors == 5 and "cut by top-k" in view._chart.value
    view.sliders["top_p"].value = 0.05
    expected = mlx_lm_distribution(lp, SamplingParams(temperature=1.0, top_p=0.05, top_k=5))
    assert view.survivors == int((expected > 0).sum()) < 5
    view.top_k, view.top_p, view.min_p = 0, 1.0, 0.5
    assert view.sliders["min_p"].value == 0.5 and view.survivors == int((lp >= lp.max() + np.log(0.5)).sum())
    view.temperature = 0.0
    assert view.survivors == 1 and "cut by greedy" in view._chart.value


def test_distribution_view_labels_with_the_model(lm: nbllm.LM) -> None:
    stepper = nbllm.Stepper(lm, "Hello")
    view = DistributionView(stepper.logprobs, label=lm, k=4)
    top = stepper.candidates(4)
    assert view.shaped.ids == tuple(a.id for a in top)
    assert html.escape(repr(top[0].piece)) in view._chart.value


# -- stepper widget -------------------------------------------------------------------
def test_stepper_widget_buttons_drive_the_real_model(lm: nbllm.LM) -> None:
    w = StepperWidget(nbllm.Stepper(lm, "Hello", top_logprobs=5), k=5)
    before = w.distribution.logprobs.copy()
    w.next_button.click()
    assert w.n_tokens == 1 and len(w.stepper.tokens) == 1 and w.text == w.stepper.text
    assert not np.array_equal(before, w.distribution.logprobs)  # the next position's distribution
    alt = w.alternatives[2]
    chosen = alt.token_id
    assert chosen == w.stepper.candidates(5)[2].id
    alt.click()
    assert w.stepper.tokens[-1].id == chosen and w.n_tokens == 2
    w.n_box.value = 6
    w.next_n_button.click()
    assert w.n_tokens == 8 or w.done
    greedy = [t.id for t in w.stepper.tokens]
    w.back_button.click()
    assert w.n_tokens == len(greedy) - 1
    w.next_button.click()
    assert [t.id for t in w.stepper.tokens] == greedy  # greedy replay after Back
    w.reset_button.click()
    assert w.n_tokens == 0 and w.text == "" and w.back_button.disabled
    assert w._text.value.count('class="t') == 0


def test_stepper_widget_shows_errors_in_its_status(lm: nbllm.LM) -> None:
    eos = next(iter(lm.tokenizer.eos_token_ids))
    w = StepperWidget(nbllm.Stepper(lm, "Hello"))
    w.choose(eos)
    assert w.done and w.next_button.disabled and all(b.layout.display == "none" for b in w.alternatives)
    with pytest.raises(RuntimeError, match="generation has finished"):  # a call from a cell fails in the cell...
        w.next()
    assert "generation has finished" in w.status and w.n_tokens == 1  # ...and in the widget
    w.status = ""
    w.next_button.click()  # a click has no cell: the widget alone shows it
    assert "generation has finished" in w.status
    assert "StepperWidget(1 tokens" in w._repr_mimebundle_()["text/plain"]


# -- chat widget ----------------------------------------------------------------------
def test_chat_widget_send_replies_and_stop_cancels(lm: nbllm.LM) -> None:
    eos = next(iter(lm.tokenizer.eos_token_ids))
    w = ChatWidget(lm, system="Be brief.", max_tokens=12, logit_bias={eos: -1e9})
    w.input.value = "Hello there"
    w.send_button.click()
    assert w.wait(30) and not w.busy
    assert [m["role"] for m in w.chat.history] == ["user", "assistant"] and w.n_messages == 2
    assert w.reply == w.chat.history[-1]["content"] and w.finish_reason == "length"
    assert "35 prompt tokens" in w.stats.value and "finish: length" in w.stats.value and w.input.value == ""
    assert w.reply and html.escape(w.reply) in w.messages.value


def test_chat_widget_stop_really_stops_mid_reply(lm: nbllm.LM) -> None:
    eos = next(iter(lm.tokenizer.eos_token_ids))
    w = ChatWidget(lm, max_tokens=100_000, logit_bias={eos: -1e9})
    w.send("Tell me a very long story")
    assert w.busy and not w.stop_button.disabled and w.send_button.disabled
    deadline = time.monotonic() + 30
    while not w.reply and time.monotonic() < deadline:  # the first tokens have streamed
        time.sleep(0.002)
    assert "Tell me a very long story" in w.messages.value and "pending" in w.messages.value
    w.stop_button.click()
    assert w.wait(30) and not w.busy
    assert w.finish_reason == "cancelled" and w.status == "stopped"
    stats = w.chat.last_stats
    assert 0 < stats.generated_tokens < 100_000 and stats.finish_reason == "cancelled"
    assert w.chat.history[-1] == {"role": "assistant", "content": w.reply}
    first_reply = w.reply
    w.send("And then?")  # the conversation goes on, reusing the cache
    deadline = time.monotonic() + 30
    while not w.reply and time.monotonic() < deadline:
        time.sleep(0.002)
    assert html.escape(first_reply) in w.messages.value and "And then?" in w.messages.value
    w.stop()
    assert w.wait(30) and w.chat.last_stats.cached_tokens > 0 and len(w.chat.history) == 4


def test_chat_widget_regenerate_reset_and_errors(lm: nbllm.LM) -> None:
    w = ChatWidget(lm, max_tokens=5, temperature=1.0, seed=1)
    w.regenerate_button.click()
    assert "history is empty" in w.status and not w.busy
    with pytest.raises(ValueError, match="expected a non-empty message"):
        w.send("   ")
    assert w.status == "type a message first"
    w.send("Hi")
    assert w.wait(30)
    first = w.chat.history[-1]["content"]
    w.regenerate_button.click()
    assert w.wait(30) and len(w.chat.history) == 2
    w.system_box.value = "New rules."
    assert w.chat.system == "New rules."
    w.reset_button.click()
    assert w.chat.history == [] and w.n_messages == 0 and first is not None


def test_chat_widget_image_attach_for_vision_models(lm: nbllm.LM, tmp_path) -> None:
    import datetime

    from nbllm.testing import make_image, make_vision_model

    text_widget = ChatWidget(lm)
    assert text_widget.attach not in text_widget.controls.children  # text model: no attach button
    vlm = nbllm.load(make_vision_model(tmp_path / "qwen2_vl", "qwen2_vl"))
    w = ChatWidget(vlm, max_tokens=3)
    assert w.attach in w.controls.children
    make_image().save(tmp_path / "a.png")
    w.attach.value = (
        {
            "name": "a.png",
            "type": "image/png",
            "size": 1,
            "content": memoryview((tmp_path / "a.png").read_bytes()),
            "last_modified": datetime.datetime.now(),
        },
    )
    w.send("What is in this picture?")
    assert w.wait(60) and [m["role"] for m in w.chat.history] == ["user", "assistant"]
    assert w.chat.history[0]["images"] == 1 and w.attach.value == ()
    assert w.chat.last_stats.prompt_tokens > len(list(vlm.encode("What is in this picture?").ids))


def test_stepper_and_distribution_views_show_how_the_prompt_reached_the_model(lm: nbllm.LM) -> None:
    w = StepperWidget(nbllm.Stepper(lm, "The capital of France is"))
    assert w.stepper.prompt_kind == "chat template" and w.mode.value == "chat template"
    assert "prompt: chat template" in w._prompt.value and html.escape("<|im_start|>user") in w._prompt.value
    w.next()
    w.mode.value = "raw continuation"  # the user switches: the stepper starts again on the same text
    assert w.stepper.prompt_kind == "raw continuation" and w.n_tokens == 0
    assert "prompt: raw continuation" in w._prompt.value and "im_start" not in w._prompt.value
    raw = nbllm.Stepper(lm, "The capital of France is", raw=True)
    assert [t.id for t in w.stepper.candidates(5)] == [t.id for t in raw.candidates(5)]
    assert "prompt: raw continuation" in w._repr_mimebundle_()["text/html"]
    from_ids = StepperWidget(nbllm.Stepper(lm, list(lm.encode("Hi").ids)))
    assert from_ids.mode.layout.display == "none"  # no text to re-encode: no switch
    view = DistributionView(raw.logprobs, label=lm, prompt=raw.prompt)
    assert "prompt: raw continuation" in view.children[0].value


def test_chat_widget_shows_prefill_progress_for_a_long_history(lm: nbllm.LM) -> None:
    w = ChatWidget(lm, system="the model cache prompt " * 120, max_tokens=2, prefill_step_size=64, max_rate=10_000)
    seen: list[int] = []
    w.prefill.observe(lambda change: seen.append(change["new"]), "value")
    w.send("Hi")
    assert w.wait(30)
    assert len(seen) >= 3 and seen == sorted(seen) and w.prefill.max >= 500  # it moved, chunk by chunk
    assert w.prefill.layout.display == "none"  # and is gone once the reply streams
