"""State that survives every failure, and bad input that fails before anything changes.

Each failure class of the Core v2 issue has a test here, on the real stack
(tiny random-weight models, real tokenizer, real MLX, real threads): after a
failure at any stage, a ``PromptCache``, ``Chat``, ``Stepper``, widget or the
magics' registry is usable, and its next greedy output equals that of a freshly
made object.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

import nbllm
from nbllm import Chat, PromptCache
from nbllm.engine import InUseError

PROMPT = "The model cache prompt is the capital of France"
N = 24


def no_eos(lm: nbllm.LM) -> dict[int, float]:
    """A logit bias that keeps generation going to max_tokens (tests need token 20 to exist)."""
    return {int(e): -1e9 for e in lm.tokenizer.eos_token_ids}


def greedy(lm: nbllm.LM, prompt: Any = PROMPT, **kw: Any) -> list[int]:
    return [t.id for t in lm.stream(prompt, max_tokens=N, logit_bias=no_eos(lm), **kw)]


class Boom(Exception):
    """The failure injected into a call."""


def fail_at(n: int, exc: type[BaseException] = Boom) -> Any:
    """A logits processor raising ``exc`` on its n-th call (1 = prefill's first distribution)."""
    calls: list[int] = []

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        calls.append(1)
        if len(calls) == n:
            raise exc("injected")
        return logits

    return processor


# -- 1. an exception at any stage leaves the prompt cache usable ------------------------
@pytest.mark.parametrize("stage", ["validation", "encoding", "prefill", "decode", "constraint", "close"])
def test_prompt_cache_survives_an_exception_at_every_stage(any_lm: nbllm.LM, stage: str, monkeypatch: Any) -> None:
    lm = any_lm
    cache = PromptCache(lm)
    greedy(lm, prompt_cache=cache)  # the cache holds a conversation already
    held = cache.ids
    with pytest.raises((Boom, ValueError, TypeError)):
        if stage == "validation":
            lm.generate(PROMPT, prompt_cache=cache, top_k=10**9)
        elif stage == "encoding":
            lm.generate(PROMPT + "\ud800", prompt_cache=cache)
        elif stage == "prefill":
            lm.generate(PROMPT + " again", prompt_cache=cache, logits_processors=[fail_at(1)])
        elif stage == "decode":
            lm.generate(PROMPT + " again", prompt_cache=cache, logits_processors=[fail_at(6)], logit_bias=no_eos(lm))
        elif stage == "constraint":
            ts = lm.stream(PROMPT, prompt_cache=cache, regex="[a-z]{30}", max_tokens=N)
            monkeypatch.setattr(ts.constraint, "_consume", _raise_after(3, ts.constraint._consume))
            ts.completion()
        else:  # an error while the stream hands the cache back
            import nbllm.cache as cache_module

            monkeypatch.setattr(cache_module, "trim_ahead", _raise_after(0, cache_module.trim_ahead))
            ts = lm.stream(PROMPT + " again", prompt_cache=cache, max_tokens=5)
            next(ts)
            ts.close()
    monkeypatch.undo()
    assert not cache.busy
    if stage in ("validation", "encoding"):
        assert cache.ids == held  # nothing changed at all
    assert greedy(lm, prompt_cache=cache) == greedy(lm) == greedy(lm, prompt_cache=PromptCache(lm))


def _raise_after(n: int, real: Any, exc: type[BaseException] = Boom) -> Any:
    """``real``, failing with ``exc`` once it has been called ``n`` times."""
    calls: list[int] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > n:
            raise exc("injected")
        return real(*args, **kwargs)

    return call


@pytest.mark.parametrize("at", [1, 5, 20])
@pytest.mark.parametrize("where", ["inside a step", "in the consumer"])
def test_keyboard_interrupt_in_a_stream_leaves_the_cache_consistent(any_lm: nbllm.LM, at: int, where: str) -> None:
    lm = any_lm
    cache = PromptCache(lm)
    greedy(lm, "An earlier prompt", prompt_cache=cache)
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        procs = [fail_at(at, KeyboardInterrupt)] if where == "inside a step" else []
        for t in lm.stream(PROMPT, prompt_cache=cache, max_tokens=N, logit_bias=no_eos(lm), logits_processors=procs):
            seen.append(t.id)
            if where == "in the consumer" and len(seen) == at:
                raise KeyboardInterrupt
    # Inside a step, call n computes token n-1's distribution one step ahead (mlx-lm's loop): n-2 tokens came out.
    assert not cache.busy and len(seen) == (max(at - 2, 0) if where == "inside a step" else at)
    assert seen == greedy(lm)[: len(seen)]
    assert cache.ids[: len(lm.encode(PROMPT))] == list(lm.encode(PROMPT).ids)  # the prefix it kept is the prompt's
    assert greedy(lm, prompt_cache=cache) == greedy(lm)


# -- 2. chat turns ---------------------------------------------------------------------
@pytest.mark.parametrize("at", [1, 5, 20])
def test_keyboard_interrupt_in_a_chat_turn_leaves_the_chat_as_it_was(lm: nbllm.LM, at: int) -> None:
    chat = Chat(lm, "Be brief.", max_tokens=N, logit_bias=no_eos(lm))
    chat.send("Hello there").completion()
    before = chat.to_json()
    with pytest.raises(KeyboardInterrupt):
        chat.send("Tell me more", logits_processors=[fail_at(at, KeyboardInterrupt)]).completion()
    assert chat.to_json() == before and not chat.cache.busy
    twin = Chat.from_json(lm, before, max_tokens=N, logit_bias=no_eos(lm))
    assert [t.id for t in chat.send("Tell me more")] == [t.id for t in twin.send("Tell me more")]


@pytest.mark.parametrize("stage", ["validation", "prefill", "decode"])
def test_a_failed_chat_turn_changes_nothing(lm: nbllm.LM, stage: str) -> None:
    chat = Chat(lm, "Be brief.", max_tokens=8)
    chat.send("Hello there").completion()
    before = chat.to_json()
    with pytest.raises((Boom, ValueError)):
        if stage == "validation":
            chat.send("Hi", temperature=-1)
        else:
            chat.send(
                "Hi", logits_processors=[fail_at(1 if stage == "prefill" else 4)], logit_bias=no_eos(lm)
            ).completion()
    assert chat.to_json() == before
    twin = Chat.from_json(lm, before, max_tokens=8)
    assert [t.id for t in chat.send("Hi")] == [t.id for t in twin.send("Hi")]


# -- 3. the stepper --------------------------------------------------------------------
@pytest.mark.parametrize("at", [1, 5, 20])
def test_keyboard_interrupt_in_the_stepper_keeps_tokens_and_cache_together(any_lm: nbllm.LM, at: int) -> None:
    lm = any_lm
    st = lm.stepper(PROMPT, logit_bias=no_eos(lm), logits_processors=[fail_at(at + 1, KeyboardInterrupt)])
    taken = []
    with pytest.raises(KeyboardInterrupt):
        for _ in range(N):
            taken.append(st.step().id)
    assert [t.id for t in st.tokens] == taken and len(taken) == at - 1
    plain = lm.stepper(PROMPT, logit_bias=no_eos(lm))
    reference = [plain.step().id for _ in range(N)]
    # The processor failed once; the stepper goes on exactly where a fresh one would be.
    assert taken + [st.step().id for _ in range(N - len(taken))] == reference


def test_an_interrupt_between_advancing_the_cache_and_recording_the_token(lm: nbllm.LM, monkeypatch: Any) -> None:
    import nbllm.stepper as stepper_module

    st = lm.stepper(PROMPT, logit_bias=no_eos(lm))
    ref = lm.stepper(PROMPT, logit_bias=no_eos(lm))
    reference = [ref.step().id for _ in range(8)]
    for _ in range(3):
        st.step()
    real = stepper_module.describe
    monkeypatch.setattr(stepper_module, "describe", _raise_after(0, real, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        st.step()  # the run advanced; recording the token was interrupted
    monkeypatch.setattr(stepper_module, "describe", real)
    assert len(st.tokens) == 3
    assert [st.step().id for _ in range(5)] == reference[3:] and [t.id for t in st.tokens] == reference
    st.back(4)
    assert [st.step().id for _ in range(4)] == reference[4:]


def test_a_failed_choice_or_back_leaves_the_stepper_as_it_was(lm: nbllm.LM) -> None:
    st = lm.stepper(PROMPT, logit_bias=no_eos(lm))
    first = [st.step().id for _ in range(4)]
    for bad in (lambda: st.choose(10**9), lambda: st.back(99), lambda: st.choose(""), lambda: st.back(-1)):
        with pytest.raises(ValueError):
            bad()
        assert [t.id for t in st.tokens] == first
    fresh = lm.stepper(PROMPT, logit_bias=no_eos(lm))
    assert [fresh.step().id for _ in range(8)] == first + [st.step().id for _ in range(4)]


def test_stepper_on_a_shared_cache_survives_a_failed_prefill(lm: nbllm.LM) -> None:
    cache = PromptCache(lm)
    with pytest.raises(Boom):
        lm.stepper(PROMPT, prompt_cache=cache, logits_processors=[fail_at(1)])
    assert not cache.busy
    st = lm.stepper(PROMPT, prompt_cache=cache, logit_bias=no_eos(lm))
    assert [st.step().id for _ in range(6)] == greedy(lm)[:6]


# -- 4. other threads ------------------------------------------------------------------
def _slow(delay: float = 0.01) -> Any:
    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        time.sleep(delay)
        return logits

    return processor


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_a_stream_closed_or_cancelled_from_another_thread(lm: nbllm.LM, how: str) -> None:
    cache = PromptCache(lm)
    ts = lm.stream(PROMPT, prompt_cache=cache, max_tokens=500, logit_bias=no_eos(lm), logits_processors=[_slow()])
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.extend(ts), daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    getattr(ts, how)()
    worker.join(20)
    assert not worker.is_alive() and 3 <= len(got) < 500
    assert got[-1].finish_reason == "cancelled" and ts.finish_reason == "cancelled" and not cache.busy
    assert greedy(lm, prompt_cache=cache) == greedy(lm)


def test_a_cache_or_chat_used_from_two_threads_says_in_use_at_once(lm: nbllm.LM) -> None:
    cache = PromptCache(lm)
    chat = Chat(lm, prompt_cache=cache, max_tokens=200, logit_bias=no_eos(lm))
    reply = chat.send("Hello there", logits_processors=[_slow()])
    done = threading.Event()
    worker = threading.Thread(target=lambda: (reply.completion(), done.set()), daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    while not reply.tokens and time.monotonic() < deadline:
        time.sleep(0.005)
    for call in (lambda: chat.send("Hi"), chat.undo, chat.reset, lambda: next(lm.stream("x", prompt_cache=cache))):
        start = time.monotonic()
        with pytest.raises(InUseError, match="in use"):
            call()
        assert time.monotonic() - start < 0.5  # at once, not after the other thread
    worker.join(60)
    assert done.is_set() and reply.finish_reason == "length" and len(chat.history) == 2  # the reply was not disturbed
    assert not cache.busy
    chat.send("Thanks").completion()
    assert len(chat.history) == 4


def test_one_model_with_separate_caches_on_two_threads(any_lm: nbllm.LM) -> None:
    lm = any_lm
    expected = {p: greedy(lm, p) for p in (PROMPT, "Another prompt entirely")}
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def run(prompt: str) -> None:
        try:
            cache = PromptCache(lm)
            for _ in range(3):
                results[prompt] = greedy(lm, prompt, prompt_cache=cache)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(p,)) for p in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == expected


def test_every_model_call_runs_on_the_thread_local_generation_stream(lm: nbllm.LM, qwen: nbllm.LM) -> None:
    """MLX ties streams to threads: on Metal, a call on a worker thread outside a stream of that thread fails.

    On the CPU build the default stream works anyway, so this checks what makes
    Metal work: every nbllm path calls the model inside mlx-lm's thread-local
    generation stream, on whichever thread it runs.
    """
    seen: list[Any] = []

    def probe(model: Any) -> Any:
        import functools

        real = model.__call__

        class Probe(type(model)):  # type: ignore[misc]
            @functools.wraps(type(model).__call__)  # mlx-lm reads the signature (input_embeddings=)
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                seen.append(mx.default_stream(mx.default_device()))
                return real(*args, **kwargs)

        model.__class__ = Probe
        return type(model).__mro__[1]

    outside: list[Any] = []

    def work(target: nbllm.LM) -> None:
        outside.append(mx.default_stream(mx.default_device()))
        target.generate("Hi", max_tokens=3)
        st = target.stepper("Hi")
        st.step()
        st.back(1)
        PromptCache(target).prefill(list(target.encode("Hi there").ids))
        Chat(target, max_tokens=3).send("Hi").completion()

    for target in (lm, qwen):
        original = probe(target.model)
        try:
            seen.clear()
            outside.clear()
            thread = threading.Thread(target=work, args=(target,))
            thread.start()
            thread.join(120)
            assert seen and all(s != outside[0] for s in seen), (target.name, seen, outside)
        finally:
            target.model.__class__ = original


def test_a_failed_sampler_never_breaks_random_sampling_in_the_process(lm: nbllm.LM) -> None:
    from nbllm.sampling import SamplingParams, make_token_sampler

    with pytest.raises(ValueError, match="top_k: expected an integer in"):
        lm.generate("Hi", temperature=1.0, top_k=10**6)
    # A failure inside mlx-lm's compiled filter itself (here: top-k wider than the vector it gets).
    sampler = make_token_sampler(SamplingParams(temperature=1.0, top_k=8), vocab_size=10**6)
    with pytest.raises(ValueError):
        sampler(mx.zeros((1, 4)))
    mx.eval(mx.random.uniform())  # the global generator still works
    assert len(lm.generate("Hi", max_tokens=4, temperature=1.0, logit_bias=no_eos(lm)).tokens) == 4


# -- 5. bad input gets a clear error, before anything changes ------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 10**6}, "top_k: expected an integer in [0, "),
        ({"seed": 2**64}, "seed: expected an integer in [0, 18446744073709551615]"),
        ({"seed": True}, "seed: expected an integer in [0, "),
        ({"logit_bias": {0: math.inf}}, "logit_bias[0]: expected a finite float"),
        ({"logit_bias": {0: "x"}}, "logit_bias[0]: expected a finite float"),
        ({"presence_penalty": math.nan}, "presence_penalty: expected a finite float"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty: expected a finite float"),
        ({"repetition_penalty": math.inf}, "repetition_penalty: expected a finite float > 0"),
        ({"temperature": math.inf}, "temperature: expected a finite float >= 0"),
        ({"top_logprobs": 101}, "top_logprobs: expected an integer in [0, 100]"),
        ({"top_logprobs": True}, "top_logprobs: expected an integer in [0, 100]"),
        ({"max_tokens": 10**8}, "max_tokens: expected an integer in [1, 10000000]"),
        ({"penalty_context": 0}, "penalty_context: expected an integer >= 1"),
        ({"prefill_step_size": 0}, "prefill_step_size: expected an integer in [1, "),
        ({"max_kv_size": 4}, "max_kv_size: expected an integer in [8, "),
        ({"xtc_probability": 1.5}, "xtc_probability: expected a float in [0, 1]"),
        ({"logits_processors": [1]}, "logits_processors: expected callables"),
        ({"progress": 3}, "progress: expected a callable"),
    ],
)
def test_every_setting_has_bounds_that_name_the_range(lm: nbllm.LM, kwargs: dict, message: str) -> None:
    cache = PromptCache(lm)
    greedy(lm, prompt_cache=cache)
    held = cache.ids
    with pytest.raises((ValueError, TypeError)) as err:
        lm.stream(PROMPT, prompt_cache=cache, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert cache.ids == held and not cache.busy


def test_a_prompt_longer_than_the_context(lm: nbllm.LM) -> None:
    context = lm.context_length
    assert context is not None
    long = [5] * (context + 10)
    with pytest.raises(ValueError, match=f"expected at most {context} tokens .*got {context + 10}"):
        lm.stream(long)
    ts = lm.stream(long, truncate=True, max_tokens=2)
    assert len(ts.prompt) == context and ts.completion().tokens


def test_chat_drops_the_oldest_exchanges_to_fit_and_keeps_the_system_message(lm: nbllm.LM) -> None:
    chat = Chat(lm, "SYSTEM RULES", max_kv_size=200, max_tokens=8, logit_bias=no_eos(lm))
    for i in range(12):
        chat.send(f"Message number {i} with some words in it").completion()
        stats = chat.last_stats
        assert stats is not None and stats.prompt_tokens <= 200 - 8
    assert stats.dropped_messages > 0 and "oldest messages dropped" in stats.summary()
    assert len(chat.history) == 24  # the transcript keeps everything
    text = lm.decode(chat.send("Last one").prompt_ids)
    assert text.startswith("<|im_start|>system\nSYSTEM RULES") and "Message number 0 " not in text
    assert "Message number 11 " in text
    # Between drops the prompt's start stays put, so most turns reuse the whole previous context.
    reused = []
    for i in range(12, 36):
        chat.send(f"Message number {i} with some words in it").completion()
        reused.append(chat.last_stats.reuse_rate)
    assert sum(r == 1.0 for r in reused) >= len(reused) // 2, reused


def test_text_the_tokenizer_cannot_encode_names_the_position(lm: nbllm.LM) -> None:
    with pytest.raises(ValueError, match=r"prompt: character 6 \('\\ud800'\) cannot be encoded"):
        lm.encode("Hello \ud800 world")
    with pytest.raises(ValueError, match=r"prompt\[1\]: character 0"):
        lm.encode([{"role": "user", "content": "ok"}, {"role": "user", "content": "\udfff"}])
    with pytest.raises(ValueError, match="system: character 1"):
        lm.encode("Hi", system="x\ud800")
    with pytest.raises(ValueError, match="send: character 2"):
        Chat(lm).send("ab\ud800")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer: expected tokenizer.json"),
        (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json is not valid JSON"),
        (lambda d: (d / "tokenizer_config.json").write_text("[1, 2"), "tokenizer_config.json is not valid JSON"),
        (lambda d: (d / "tokenizer.json").write_text('{"model": 3}'), "could not read the tokenizer (tokenizer.json)"),
    ],
)
def test_a_broken_tokenizer_file_is_named_in_one_line(
    model_dir: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model_dir / "llama", folder)
    damage(folder)
    with pytest.raises(ValueError) as err:
        nbllm.load(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_degenerate_images_fail_before_the_processor(qwen: nbllm.LM) -> None:
    import numpy as np
    from PIL import Image

    cache = PromptCache(qwen)
    for bad in (Image.new("RGB", (0, 10)), Image.new("RGB", (10, 0)), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"image: expected (an image at least 1 pixel|an array of shape)"):
            qwen.stream("What is this?", images=bad, prompt_cache=cache)
    assert cache.ids == [] and not cache.busy


def test_chat_from_json_refuses_hostile_input(lm: nbllm.LM) -> None:
    bad = [
        "",
        "[" * 100_000 + "]" * 100_000,
        '{"format": "nbllm-chat/1", "messages": ' + "[" * 50_000 + "]" * 50_000 + "}",
        '{"format": "nbllm-chat/1", "system": 3}',
        '{"format": "nbllm-chat/1", "messages": {"a": 1}}',
        '{"format": "nbllm-chat/1", "messages": [{"role": "user", "content": 5}]}',
        '{"format": "nbllm-chat/1", "messages": [{"role": "user", "content": "x"}]}',
        '{"format": "nbllm-chat/1", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "token_ids": [-1]}]}',
        '{"format": "nbllm-chat/1", "messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}',
        '{"format": "other"}',
        "null",
        b"\xff\xfe",
    ]
    for text in bad:
        with pytest.raises(ValueError):
            Chat.from_json(lm, text)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Chat.from_json(lm, 12)  # type: ignore[arg-type]


def test_chat_from_json_fuzz(lm: nbllm.LM) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    values = st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=12,
    )
    messages = st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]), "content": values}), max_size=4
    )
    docs = st.fixed_dictionaries({"format": st.just("nbllm-chat/1"), "system": values, "messages": messages | values})

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(docs)
    def check(doc: Any) -> None:
        try:
            chat = Chat.from_json(lm, json.dumps(doc))
        except ValueError:
            return
        assert isinstance(chat.history, list)

    check()


def test_the_cache_fingerprint_covers_every_weight(lm: nbllm.LM, tmp_path: Path) -> None:
    from mlx.utils import tree_flatten

    cache = PromptCache(lm)
    greedy(lm, prompt_cache=cache)
    path = cache.save(tmp_path / "kv")
    twin = nbllm.load(lm.path)
    assert PromptCache.load(twin, path).ids == cache.ids  # the same weights: accepted
    names = [name for name, _ in tree_flatten(twin.model.parameters())]
    assert len(names) > 10
    for name in names:
        value = dict(tree_flatten(twin.model.parameters()))[name]
        flat = mx.array(value).reshape(-1)
        flat[-1] = flat[-1] + 1.0  # one element of one tensor
        twin.model.load_weights([(name, flat.reshape(value.shape))], strict=False)
        other = nbllm.LM(twin.model, twin.tokenizer, twin.config, twin.name, twin.path)
        with pytest.raises(ValueError, match="made with another model"):
            PromptCache.load(other, path)
        twin.model.load_weights([(name, value)], strict=False)
    assert (
        PromptCache.load(nbllm.LM(twin.model, twin.tokenizer, twin.config, twin.name, twin.path), path).ids == cache.ids
    )


@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_a_long_prefill_stops_within_one_chunk(lm: nbllm.LM, how: str) -> None:
    cache = PromptCache(lm)
    prompt = list(lm.encode(" ".join(["the model cache prompt"] * 40), raw=True).ids)
    chunks: list[int] = []
    holder: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        chunks.append(done)
        if len(chunks) == 3:  # two chunks done
            if how == "cancel":
                holder["ts"].cancel()
            else:
                raise KeyboardInterrupt

    ts = lm.stream(prompt, prompt_cache=cache, prefill_step_size=16, progress=progress, max_tokens=4)
    holder["ts"] = ts
    if how == "cancel":
        assert list(ts) == [] and ts.finish_reason == "cancelled"
    else:
        with pytest.raises(KeyboardInterrupt):
            list(ts)
    assert chunks[-1] <= 32 + 16 and not cache.busy
    assert cache.ids == prompt[: len(cache.ids)] and len(cache.ids) in (32, 48)
    assert [t.id for t in lm.stream(prompt, prompt_cache=cache, max_tokens=4)] == [
        t.id for t in lm.stream(prompt, max_tokens=4)
    ]


def test_a_stepper_prefill_can_be_interrupted(lm: nbllm.LM) -> None:
    cache = PromptCache(lm)
    prompt = list(lm.encode(" ".join(["the model cache prompt"] * 40), raw=True).ids)

    def progress(done: int, total: int) -> None:
        if done >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nbllm.Stepper(lm, prompt, prompt_cache=cache, prefill_step_size=16, progress=progress)
    assert not cache.busy and len(cache.ids) == 32
    st = nbllm.Stepper(lm, prompt, prompt_cache=cache)
    assert [st.step().id for _ in range(3)] == [t.id for t in lm.stream(prompt, max_tokens=3)]


# -- 6. long use ----------------------------------------------------------------------------
def test_a_200_turn_chat_keeps_memory_bounded(lm: nbllm.LM) -> None:
    import gc
    import tracemalloc

    chat = Chat(lm, "Be brief.", max_kv_size=128, max_tokens=4, logit_bias=no_eos(lm))
    tracemalloc.start()
    marks = {}
    try:
        for turn in range(200):
            chat.send(f"Turn {turn}: tell me something").completion()
            if turn in (49, 199):
                gc.collect()
                marks[turn] = (tracemalloc.get_traced_memory()[0], chat.cache.stats.bytes_held, mx.get_active_memory())
    finally:
        tracemalloc.stop()
    (py50, kv50, mx50), (py200, kv200, mx200) = marks[49], marks[199]
    assert kv200 <= kv50 * 1.05 + 1  # the KV cache is bounded by max_kv_size
    assert mx200 <= mx50 + 8e6  # no MLX buffers pile up
    # Python memory grows only with the transcript itself (600 short messages), not with the turns' machinery.
    assert py200 - py50 < 3e6, (py50, py200)
    assert len(chat.history) == 400 and chat.last_stats is not None and chat.last_stats.dropped_messages > 0


# -- 7. the notebook layer ----------------------------------------------------------------
@pytest.fixture(scope="module")
def shell(model_dir: Path) -> Any:
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbllm")
    sh.run_line_magic("llm", f"load {model_dir / 'llama'}")
    sh.run_line_magic("config", "LLMMagics.max_tokens = 3")
    yield sh
    sh.run_line_magic("unload_ext", "nbllm")


def test_magic_flags_fuzz_gives_only_usage_errors(shell: Any, capsys: pytest.CaptureFixture) -> None:
    """Random %%llm / %llm argument strings: each one works or is a one-line UsageError, nothing else."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    from IPython.core.error import UsageError

    words = st.text(alphabet=st.characters(blacklist_characters="{}$\x00", blacklist_categories=("Cs",)), max_size=8)
    numbers = st.sampled_from(
        ["0", "-1", "1", "2", "3", "0.5", "1.5", "nan", "inf", "-inf", "1e309", "x", "", str(2**70)]
    )
    flags = st.sampled_from(
        [
            "-t",
            "--top-k",
            "--top-p",
            "--min-p",
            "-n",
            "--seed",
            "-s",
            "--stop",
            "--schema",
            "--regex",
            "--choices",
            "--image",
            "-o",
            "-m",
            "--raw",
            "--json",
            "--chat",
            "--probs",
            "--step",
            "-h",
            "--bogus",
            "--",
            "'",
            '"',
        ]
    )
    parts = st.lists(st.one_of(flags, numbers, words), max_size=6)
    bodies = st.sampled_from(["Hello there", "", "   ", "x" * 50, "ünïcode ☃", "a\nb"])
    actions = st.sampled_from(["", "info", "load", "use", "list", "unload", "chat", "reset", "help", "dance", "--help"])
    llm = next(c for c in shell.configurables if type(c).__name__ == "LLMMagics")

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
    @hypothesis.given(parts, bodies, actions, parts)
    def check(cell_parts: list[str], body: str, action: str, line_parts: list[str]) -> None:
        models = dict(llm.registry.models)
        for run in (
            lambda: shell.run_cell_magic("llm", " ".join(cell_parts), body),
            lambda: shell.run_line_magic("llm", " ".join([action, *line_parts])),
        ):
            try:
                run()
            except UsageError as err:
                assert "\n" not in str(err).strip()
            finally:
                capsys.readouterr()
            # A failed load or unload leaves the registry of loaded models as it was (or one model more, loaded).
            assert set(models) <= set(llm.registry.models) or action == "unload"
        llm.registry.models.update({k: v for k, v in models.items() if k not in llm.registry.models})
        llm.registry.current = next(iter(models))

    check()


def test_a_failed_load_leaves_the_magics_registry_as_it_was(shell: Any) -> None:
    from IPython.core.error import UsageError

    llm = next(c for c in shell.configurables if type(c).__name__ == "LLMMagics")
    before, current = dict(llm.registry.models), llm.registry.current
    for target in ("/no/such/model", "nobody/nothing-offline", str(Path(__file__))):
        with pytest.raises(UsageError):
            shell.run_line_magic("llm", f"load {target}")
        with pytest.raises(UsageError):
            shell.run_cell_magic("llm", f"-m {target}", "Hi")
        assert llm.registry.models == before and llm.registry.current == current


def test_chat_widget_survives_an_error_while_generating(lm: nbllm.LM) -> None:
    from nbllm.widgets import ChatWidget

    w = ChatWidget(lm, max_tokens=6, logit_bias=no_eos(lm))
    w.send("Hello there")
    assert w.wait(30)
    before = w.chat.to_json()
    w.chat.settings["logits_processors"] = [fail_at(3)]
    w.send("Tell me more")
    assert w.wait(30) and not w.busy and "Boom" in w.status and not w.chat.cache.busy
    assert w.chat.to_json() == before  # the failed turn left no trace
    del w.chat.settings["logits_processors"]
    w.send("Tell me more")
    assert w.wait(30) and len(w.chat.history) == 4
    twin = Chat.from_json(lm, before, max_tokens=6, logit_bias=no_eos(lm))
    assert w.chat.history[-1]["content"] == twin.send("Tell me more").text


def test_stepper_widget_survives_an_error_in_a_move(lm: nbllm.LM) -> None:
    from nbllm.widgets import StepperWidget

    st = lm.stepper(PROMPT, logit_bias=no_eos(lm), logits_processors=[fail_at(4)])
    w = StepperWidget(st)
    w.next_n_button.click()  # the third token's step fails: the click shows it, the stepper keeps two tokens
    assert "injected" in w.status and w.n_tokens == 2
    w.next_n(5)
    ref = lm.stepper(PROMPT, logit_bias=no_eos(lm))
    assert [t.id for t in st.tokens] == [ref.step().id for _ in range(7)]
