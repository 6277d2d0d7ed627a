"""The token stream: records, sampling settings, stop strings, EOS, parity with mlx-lm."""

from __future__ import annotations

import math
import threading

import mlx.core as mx
import mlx_lm
import pytest

import nbllm
from nbllm import Token


def test_greedy_parity_with_mlx_lm(any_lm: nbllm.LM) -> None:
    for prompt in ["Hello world", "The capital of France is", "café 東京 🙂"]:
        ids = list(any_lm.encode(prompt).ids)
        ref = [r.token for r in mlx_lm.stream_generate(any_lm.model, any_lm.tokenizer, ids, max_tokens=24)]
        ours = [t.id for t in any_lm.stream(prompt, max_tokens=24)]
        eos = any_lm.tokenizer.eos_token_ids
        # mlx-lm stops at EOS too (and reports it in its last record)
        assert ours == ref or (ours[-1] in eos and ours == ref[: len(ours)])


def test_greedy_parity_raw_completion(any_lm: nbllm.LM) -> None:
    ids = list(any_lm.encode("Once upon a time", raw=True).ids)
    ref = mlx_lm.generate(any_lm.model, any_lm.tokenizer, ids, max_tokens=16)
    assert any_lm.generate(ids, max_tokens=16).text == ref


def test_token_records(lm: nbllm.LM) -> None:
    toks = list(lm.stream("Hello", max_tokens=8, top_logprobs=5, temperature=0.8, top_p=0.9, seed=1))
    assert len(toks) == 8
    assert [t.index for t in toks] == list(range(8))
    assert all(isinstance(t, Token) for t in toks)
    assert [t.finish_reason for t in toks] == [None] * 7 + ["length"]
    for t in toks:
        assert len(t.top) == 5
        probs = [a.prob for a in t.top]
        assert probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-5
        sampled = [a.sampled_prob for a in t.top]
        assert all(s is not None and 0 <= s <= 1 for s in sampled)
        # temperature < 1 sharpens and top-p removes the tail: the sampler
        # puts more mass on the top token than the model does
        assert t.top[0].sampled_prob >= t.top[0].prob - 1e-6
        assert t.piece == lm.decode([t.id]) or t.piece.startswith("\\x")
        assert math.isclose(t.prob, math.exp(t.logprob))
        assert t.sampled_prob is not None and t.sampled_prob > 0  # it was sampled, so it was allowed


def test_logprob_matches_model(lm: nbllm.LM) -> None:
    ids = list(lm.encode("Hello").ids)
    tok = next(iter(lm.stream(ids, max_tokens=1, top_logprobs=1)))
    logits = lm.model(mx.array(ids)[None])[0, -1]
    ref = (logits - mx.logsumexp(logits))[tok.id].item()
    assert tok.logprob == pytest.approx(ref, abs=1e-4)
    assert tok.id == int(mx.argmax(logits).item())


def test_greedy_sampled_prob_is_one_hot(lm: nbllm.LM) -> None:
    tok = next(iter(lm.stream("Hello", max_tokens=1, top_logprobs=3)))
    assert tok.sampled_prob == 1.0
    assert [a.sampled_prob for a in tok.top] == [1.0, 0.0, 0.0]


def test_text_is_multibyte_safe(any_lm: nbllm.LM) -> None:
    toks = list(any_lm.stream("café 東京 🙂", max_tokens=40, temperature=1.0, seed=3))
    ids = [t.id for t in toks if not t.special]
    text = "".join(t.text for t in toks)
    assert text == any_lm.decode(ids)


def test_same_seed_same_output(lm: nbllm.LM) -> None:
    a = lm.generate("Hi", max_tokens=20, temperature=1.0, seed=7)
    b = lm.generate("Hi", max_tokens=20, temperature=1.0, seed=7)
    c = lm.generate("Hi", max_tokens=20, temperature=1.0, seed=8)
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
    assert [t.id for t in a.tokens] != [t.id for t in c.tokens]


def test_eos_ends_the_stream_and_is_not_text(lm: nbllm.LM) -> None:
    eos = next(iter(lm.tokenizer.eos_token_ids))
    toks = list(lm.stream("Hello", max_tokens=20, logit_bias={eos: 100.0}))
    assert len(toks) == 1
    last = toks[-1]
    assert last.id == eos and last.special and last.finish_reason == "stop" and last.text == ""
    c = lm.generate("Hello", max_tokens=20, logit_bias={"<|im_end|>": 100.0})
    assert c.text == "" and c.finish_reason == "stop"


def test_stop_strings_are_held_back_and_trimmed(lm: nbllm.LM) -> None:
    full = lm.generate("Hello", max_tokens=30).text
    assert len(full) > 12
    stop = full[6:9]  # very likely to straddle token boundaries
    toks = list(lm.stream("Hello", max_tokens=30, stop=stop))
    text = "".join(t.text for t in toks)
    assert text == full[: full.index(stop)]
    assert toks[-1].finish_reason == "stop_string"
    # nothing of the stop string was ever shown, not even a prefix of it
    shown = ""
    for t in toks:
        shown += t.text
        assert stop not in shown
        assert full.startswith(shown)


def test_stop_string_not_found_releases_held_text(lm: nbllm.LM) -> None:
    full = lm.generate("Hello", max_tokens=10).text
    c = lm.generate("Hello", max_tokens=10, stop=[full[-1] + "\u2603"])
    assert c.text == full and c.finish_reason == "length"


def test_cancel_ends_after_current_token(lm: nbllm.LM) -> None:
    ts = lm.stream("Hello", max_tokens=50)
    got = []
    for tok in ts:
        got.append(tok)
        if len(got) == 3:
            threading.Thread(target=ts.cancel).start()
            threading.Event().wait(0.05)
    assert 4 <= len(got) < 50
    assert got[-1].finish_reason == "cancelled"


def test_system_prompt_and_raw(lm: nbllm.LM) -> None:
    with_sys = lm.tokenizer.decode(list(lm.encode("Hi", system="Be brief.").ids))
    assert with_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert with_sys.endswith("<|im_start|>assistant\n")
    assert lm.decode(list(lm.encode("Hi", raw=True).ids)) == "Hi"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert lm.decode(list(lm.encode(msgs).ids)).count("<|im_start|>") == 4


def test_presence_penalty_sees_the_prompt(lm: nbllm.LM) -> None:
    base = list(lm.encode("Hello world", raw=True).ids)
    out = [t.id for t in lm.stream(base, max_tokens=40)]
    # cut the prompt just before greedy decoding first repeats a token it has seen
    j = next(j for j in range(len(out)) if out[j] in base + out[:j])
    prompt = base + out[:j]
    plain = next(iter(lm.stream(prompt, max_tokens=1))).id
    assert plain in prompt, "precondition: without penalty the model repeats a prompt token"
    penalised = next(iter(lm.stream(prompt, max_tokens=1, presence_penalty=1e4))).id
    assert penalised not in prompt


def test_repetition_and_frequency_penalties_change_output(lm: nbllm.LM) -> None:
    plain = [t.id for t in lm.stream("Hello", max_tokens=30)]
    assert len(set(plain)) < len(plain), "precondition: greedy output repeats"
    rep = [t.id for t in lm.stream("Hello", max_tokens=30, repetition_penalty=50.0, penalty_context=256)]
    freq = [t.id for t in lm.stream("Hello", max_tokens=30, frequency_penalty=1e4, penalty_context=256)]
    assert len(set(freq)) == len(freq)
    assert rep != plain


def test_logit_bias_by_text_and_id(lm: nbllm.LM) -> None:
    target = lm.tokenizer.encode(" Paris", add_special_tokens=False)
    if len(target) != 1:
        target = lm.tokenizer.encode("the", add_special_tokens=False)
    tid = target[0]
    piece = lm.decode([tid])
    assert [t.id for t in lm.stream("Hi", max_tokens=3, logit_bias={piece: 50.0})] == [tid] * 3
    assert [t.id for t in lm.stream("Hi", max_tokens=3, logit_bias={tid: 50.0})] == [tid] * 3
    with pytest.raises(ValueError, match="expected 'hello there friend' to be a single token"):
        lm.generate("Hi", logit_bias={"hello there friend": 1.0})


def test_custom_logits_processor(lm: nbllm.LM) -> None:
    seen = []

    def only_token_5(tokens: mx.array, logits: mx.array) -> mx.array:
        seen.append(tokens.size)
        mask = mx.arange(logits.shape[-1]) == 5
        return mx.where(mask, logits, -mx.inf)

    toks = list(lm.stream("Hi", max_tokens=4, logits_processors=[only_token_5], top_logprobs=2))
    assert [t.id for t in toks] == [5] * 4
    assert toks[0].logprob == 0.0
    assert seen and seen[0] >= len(list(lm.encode("Hi").ids))


def test_top_k_min_p_and_xtc_run(lm: nbllm.LM) -> None:
    for opts in ({"top_k": 1, "temperature": 1.5}, {"min_p": 0.999, "temperature": 1.5}):
        greedy = [t.id for t in lm.stream("Hi", max_tokens=8)]
        assert [t.id for t in lm.stream("Hi", max_tokens=8, seed=0, **opts)] == greedy
    toks = list(lm.stream("Hi", max_tokens=8, temperature=1.0, xtc_probability=1.0, xtc_threshold=0.01, seed=0))
    assert 1 <= len(toks) <= 8 and toks[-1].finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature: expected a finite float >= 0, got -1"),
        ({"top_p": 0}, r"top_p: expected a float in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p: expected a float in \(0, 1\]"),
        ({"min_p": 2}, r"min_p: expected a float in \[0, 1\]"),
        ({"top_k": -3}, "top_k: expected an integer >= 0"),
        ({"top_k": 2.5}, "top_k: expected an integer >= 0"),
        ({"xtc_threshold": 0.9}, r"xtc_threshold: expected a float in \[0, 0.5\]"),
        ({"repetition_penalty": 0}, "repetition_penalty: expected a finite float > 0"),
        ({"seed": -1}, r"seed: expected an integer in \[0, 18446744073709551615\] or None"),
        ({"max_tokens": 0}, r"max_tokens: expected an integer in \[1, 10000000\]"),
        ({"top_logprobs": -1}, "top_logprobs: expected an integer in"),
        ({"stop": [""]}, "stop: expected a non-empty string or a list of them"),
        ({"logit_bias": {10**9: 1.0}}, r"logit_bias: expected token ids in \[0, "),
    ],
)
def test_invalid_values_raise_with_allowed_range(lm: nbllm.LM, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lm.generate("Hi", **kwargs)


def test_unknown_argument_and_bad_prompt(lm: nbllm.LM) -> None:
    with pytest.raises(TypeError, match="unexpected argument"):
        lm.generate("Hi", temprature=0.5)
    with pytest.raises(ValueError, match="empty prompt"):
        lm.generate("", raw=True)
    with pytest.raises(ValueError, match="expected token ids in"):
        lm.generate([1, 2, 10**7])
    with pytest.raises(TypeError, match="expected str, list of token ids"):
        lm.generate(3.14)
    with pytest.raises(ValueError, match="text-only model"):
        lm.generate("Hi", images=["cat.png"])


def test_stats(lm: nbllm.LM) -> None:
    c = lm.generate("Hello there", max_tokens=10)
    s = c.stats
    assert s.prompt_tokens == len(list(lm.encode("Hello there").ids))
    assert s.generated_tokens == len(c.tokens)
    assert s.time_to_first_token > 0 and s.prompt_tps > 0 and s.generation_tps > 0
    assert s.peak_memory_gb > 0
    assert "prompt tokens" in s.summary()
    assert "finish: length" in c._repr_html_()


def test_caller_supplied_mlx_cache_continues(lm: nbllm.LM) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(lm.model)
    ids = list(lm.encode("Hello", raw=True).ids)
    first = [t.id for t in lm.stream(ids, max_tokens=5, prompt_cache=cache)]
    assert cache[0].offset == len(ids) + 5
    ref = [t.id for t in lm.stream(ids, max_tokens=5)]
    assert first == ref


def test_completion_keeps_the_leading_space_a_chat_reply_drops_it(lm: nbllm.LM) -> None:
    (space_id,) = lm.tokenizer.encode(" How", add_special_tokens=False)
    bias = {space_id: 100.0}
    raw = list(lm.stream("Hello world", raw=True, max_tokens=2, logit_bias=bias))
    assert raw[0].text == " How" and raw[0].piece == " How"
    assert "".join(t.text for t in raw) == lm.decode([t.id for t in raw])
    chat = list(lm.stream("Hello world", max_tokens=2, logit_bias=bias))
    assert chat[0].text == "How"
    st = lm.stepper("Hello world", raw=True, logit_bias=bias)
    st.step()
    assert st.text == " How"


@pytest.mark.parametrize(
    "opts",
    [
        {"temperature": 0.0},
        {"temperature": 0.7},
        {"temperature": 1.3, "top_p": 0.5},
        {"temperature": 1.0, "top_p": 0.999},
        {"temperature": 0.9, "min_p": 0.2},
        {"temperature": 1.0, "top_k": 7},
        {"temperature": 0.5, "top_p": 0.8, "min_p": 0.05, "top_k": 20},
    ],
)
def test_sampled_probs_match_mlx_lms_filters(opts: dict) -> None:
    import numpy as np
    from oracle import mlx_lm_distribution

    from nbllm.filters import sampled_probs
    from nbllm.sampling import SamplingParams

    mx.random.seed(0)
    for scale in (0.5, 3.0, 8.0):  # flat to peaked distributions
        logits = mx.random.normal((5000,)) * scale
        lp = logits - mx.logsumexp(logits)
        params = SamplingParams(**opts)
        ref = mlx_lm_distribution(np.asarray(lp), params)
        ids = np.arange(5000)
        ours = sampled_probs(np.asarray(lp), params, ids)
        assert np.allclose(ours, ref, atol=1e-5), (opts, scale)
        assert ours.sum() == pytest.approx(1.0, abs=1e-4)


def test_prefill_chunks_are_chosen_per_backend_and_a_user_setting_wins(lm: nbllm.LM) -> None:
    import mlx.core as mx

    assert lm.engine.prefill_step_size == (512 if mx.default_device() == mx.cpu else 2048)
    ids = (list(lm.encode("the model cache prompt " * 50, raw=True).ids) * 8)[:1200]
    assert len(ids) == 1200
    seen: list[int] = []
    list(lm.stream(ids, max_tokens=1, progress=lambda done, total: seen.append(done)))
    assert seen[:3] == [0, lm.engine.prefill_step_size, 2 * lm.engine.prefill_step_size]
    seen.clear()
    list(lm.stream(ids, max_tokens=1, prefill_step_size=300, progress=lambda done, total: seen.append(done)))
    assert seen[:3] == [0, 300, 600]
    assert nbllm.PromptCache(lm).prefill_step_size == lm.engine.prefill_step_size
