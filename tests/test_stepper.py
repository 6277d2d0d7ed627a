"""The stepper: step, choose, back, branch, and one decode step per move."""

from __future__ import annotations

from typing import Any

import mlx_lm
import pytest

import nbllm
from nbllm import Stepper


class CountingModel:
    """Wraps an mlx-lm model and records how many tokens each call processes."""

    def __init__(self, model: Any):
        self.inner = model
        self.calls: list[int] = []
        self.layers = model.layers

    def __call__(self, inputs: Any, cache: Any = None, **kw: Any) -> Any:
        self.calls.append(int(inputs.shape[1]))
        return self.inner(inputs, cache=cache, **kw)


def test_greedy_steps_match_mlx_lm(any_lm: nbllm.LM) -> None:
    ids = list(any_lm.encode("Hello world").ids)
    ref = [r.token for r in mlx_lm.stream_generate(any_lm.model, any_lm.tokenizer, ids, max_tokens=12)]
    st = any_lm.stepper(ids)
    got = []
    while len(got) < len(ref) and not st.done:
        got.append(st.step().id)
    assert got == ref[: len(got)]


def test_back_then_greedy_reproduces_the_tokens(any_lm: nbllm.LM) -> None:
    st = any_lm.stepper("The capital of France is")
    first = [st.step().id for _ in range(15)]
    text = st.text
    for n in (1, 4, 15):
        st.back(n)
        assert len(st.tokens) == 15 - n
        assert [st.step().id for _ in range(n)] == first[15 - n :]
    assert st.text == text


def test_each_step_costs_one_decode_step(lm: nbllm.LM) -> None:
    counting = CountingModel(lm.model)
    twin = nbllm.LM(counting, lm.tokenizer, lm.config, lm.name, lm.path)
    prompt = list(twin.encode("A prompt that is several tokens long").ids)
    st = twin.stepper(prompt)
    assert sum(counting.calls) == len(prompt)  # prefill: each prompt token once
    counting.calls.clear()
    st.step()
    st.step()
    st.choose(st.candidates(3)[2].id)
    st.back(2)
    st.step()
    assert counting.calls == [1, 1, 1, 1, 1]  # no re-processing of the prompt
    b = st.branch()
    b.step()
    assert counting.calls[-1] == 1


def test_choose_and_candidates(lm: nbllm.LM) -> None:
    st = lm.stepper("Hello")
    cands = st.candidates(5)
    assert len(cands) == 5
    third = cands[2]
    tok = st.choose(third.id)
    assert tok.id == third.id and tok.logprob == pytest.approx(third.logprob)
    piece_id = lm.tokenizer.encode("the", add_special_tokens=False)
    if len(piece_id) == 1:
        assert st.choose("the").id == piece_id[0]
    before = len(st.tokens)
    last = st.choose("hello there my friend")  # several tokens: taken one after another
    pieces = lm.tokenizer.encode("hello there my friend", add_special_tokens=False)
    assert [t.id for t in st.tokens[before:]] == pieces and last.id == pieces[-1]
    with pytest.raises(ValueError, match="expected text of at least one token"):
        st.choose("")
    with pytest.raises(ValueError, match="expected a token id in"):
        st.choose(10**7)


def test_branch_is_independent(lm: nbllm.LM) -> None:
    st = lm.stepper("Hello")
    for _ in range(5):
        st.step()
    b = st.branch()
    b.back(2)
    b.choose(b.candidates(4)[3].id)
    b.step()
    # the original is untouched and still continues exactly as before
    before = [t.id for t in st.tokens]
    ref = lm.stepper("Hello")
    expect = [ref.step().id for _ in range(8)]
    assert before == expect[:5]
    assert [st.step().id for _ in range(3)] == expect[5:8]
    assert [t.id for t in b.tokens][:3] == expect[:3]
    assert [t.id for t in b.tokens][3] != expect[3] or b.tokens[3].id == st.candidates(4)[3].id


def test_eos_finishes_and_back_reopens(lm: nbllm.LM) -> None:
    eos = next(iter(lm.tokenizer.eos_token_ids))
    st = lm.stepper("Hello")
    st.step()
    tok = st.choose(eos)
    assert tok.special and tok.finish_reason == "stop" and st.done
    with pytest.raises(RuntimeError, match="generation has finished"):
        st.step()
    st.back(1)
    assert not st.done
    st.step()


def test_back_validates(lm: nbllm.LM) -> None:
    st = lm.stepper("Hello")
    st.step()
    with pytest.raises(ValueError, match=r"back: expected an integer in \[0, 1\]"):
        st.back(2)
    assert len(st.tokens) == 1  # nothing lost


def test_sampled_steps_with_seed_are_reproducible(lm: nbllm.LM) -> None:
    a = Stepper(lm, "Hi", temperature=1.0, seed=4)
    b = Stepper(lm, "Hi", temperature=1.0, seed=4)
    got = []
    for _ in range(10):  # interleaved: each stepper has its own draws
        got.append((a.step().id, b.step().id))
    assert all(x == y for x, y in got)
    assert len({x for x, _ in got}) > 1
    a.back(5)
    assert [a.step().id for _ in range(5)] == [x for x, _ in got[5:]]


def test_reset(lm: nbllm.LM) -> None:
    st = lm.stepper("Hello")
    ids = [st.step().id for _ in range(4)]
    st.reset()
    assert st.tokens == [] and st.text == ""
    assert [st.step().id for _ in range(4)] == ids


def test_back_past_a_sliding_window_rebuilds_the_cache(tmp_path) -> None:
    from mlx_lm.models.cache import can_trim_prompt_cache

    from nbllm.testing import make_model

    lm = nbllm.load(make_model(tmp_path / "g", "gemma3", overrides={"sliding_window": 8}))
    st = lm.stepper("Hello there")
    first = [st.step().id for _ in range(20)]
    assert not can_trim_prompt_cache(st._run._layers)  # the rotating layers are past their window
    st.back(5)
    assert len(st.tokens) == 15
    again = [st.step().id for _ in range(5)]
    assert again == first[15:]
    st.back(20)
    assert [st.step().id for _ in range(3)] == first[:3]
