"""PromptCache: prefix reuse, trimming and rebuilding, bounded and quantized KV, save/load, the stepper."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

import nbllm
from nbllm import PromptCache, Stepper
from nbllm.testing import make_model

PROMPT = "What is the capital of France? Paris. And the capital of Italy?"


class CountingModel:
    """Wraps an mlx-lm model and records how many tokens each forward pass processes."""

    def __init__(self, model: Any):
        self.inner, self.calls, self.layers = model, [], model.layers
        if hasattr(model, "make_cache"):
            self.make_cache = model.make_cache

    def __call__(self, inputs: Any, cache: Any = None, **kw: Any) -> Any:
        self.calls.append(int(inputs.shape[1]))
        return self.inner(inputs, cache=cache, **kw)


def ids_of(completion: Any) -> list[int]:
    return [t.id for t in completion.tokens]


def counting_twin(lm: nbllm.LM) -> tuple[nbllm.LM, CountingModel]:
    counting = CountingModel(lm.model)
    return nbllm.LM(counting, lm.tokenizer, lm.config, lm.name, lm.path), counting


def test_reuses_the_longest_prefix_and_matches_a_cold_run(any_lm: nbllm.LM) -> None:
    twin, counting = counting_twin(any_lm)
    pc = PromptCache(twin)
    first = twin.generate(PROMPT, max_tokens=12, prompt_cache=pc)
    assert first.stats.cached_tokens == 0
    held = pc.ids
    assert held == list(twin.encode(PROMPT).ids) + ids_of(first)  # prompt + reply, EOS included if any
    follow = held + list(twin.encode(" Rome.", raw=True).ids)
    counting.calls.clear()
    warm = twin.generate(follow, max_tokens=12, prompt_cache=pc)
    assert warm.stats.cached_tokens == len(held)
    # The model ran only the new suffix, then each generated token once.
    assert sum(counting.calls) == len(follow) - len(held) + len(warm.tokens)
    assert ids_of(warm) == ids_of(any_lm.generate(follow, max_tokens=12))
    s = pc.stats
    assert (s.last_reused, s.last_processed, s.requests) == (len(held), len(follow) - len(held), 2)
    assert s.tokens_held == len(pc.ids) and s.bytes_held > 0


def test_a_fully_cached_prompt_feeds_its_last_token_again(lm: nbllm.LM) -> None:
    pc = PromptCache(lm)
    cold = lm.generate(PROMPT, max_tokens=10)
    lm.generate(PROMPT, max_tokens=10, prompt_cache=pc)
    again = lm.generate(PROMPT, max_tokens=10, prompt_cache=pc)
    assert again.stats.cached_tokens == len(list(lm.encode(PROMPT).ids)) - 1
    assert ids_of(again) == ids_of(cold)


def test_a_diverging_prompt_trims_to_the_common_prefix(any_lm: nbllm.LM) -> None:
    pc = PromptCache(any_lm)
    a = list(any_lm.encode(PROMPT, raw=True).ids)
    b = a[:8] + list(any_lm.encode(" something else entirely", raw=True).ids)
    any_lm.generate(a, max_tokens=6, prompt_cache=pc)
    got = any_lm.generate(b, max_tokens=12, prompt_cache=pc)
    assert got.stats.cached_tokens == 8
    assert ids_of(got) == ids_of(any_lm.generate(b, max_tokens=12))


def test_sliding_window_layers_past_their_window_are_rebuilt(tmp_path: Path) -> None:
    lm = nbllm.load(make_model(tmp_path / "g", "gemma3", overrides={"sliding_window": 16}))
    pc = PromptCache(lm)
    long = list(lm.encode(" ".join(["the model cache prompt"] * 8), raw=True).ids)
    lm.generate(long, max_tokens=4, prompt_cache=pc)
    # Extending what is cached needs no trimming, even past the window.
    held = pc.ids
    assert len(held) > 16
    ext = held + list(lm.encode(" more", raw=True).ids)
    got = lm.generate(ext, max_tokens=8, prompt_cache=pc)
    assert got.stats.cached_tokens == len(held)
    assert ids_of(got) == ids_of(lm.generate(ext, max_tokens=8))
    # Going back inside the window is impossible for a rotating layer: rebuild.
    back = long[:20] + list(lm.encode(" cat", raw=True).ids)
    got = lm.generate(back, max_tokens=8, prompt_cache=pc)
    assert got.stats.cached_tokens == 0 and pc.stats.rebuilds == 1
    assert ids_of(got) == ids_of(lm.generate(back, max_tokens=8))


def test_layers_past_their_window_roll_back_to_the_snapshot(lm: nbllm.LM) -> None:
    pc = PromptCache(lm, max_kv_size=32)
    first = list(lm.encode(" ".join(["the model cache prompt"] * 6), raw=True).ids)
    lm.generate(first, max_tokens=6, prompt_cache=pc)
    held = pc.ids
    second = held + list(lm.encode(" and then", raw=True).ids)
    lm.generate(second, max_tokens=6, prompt_cache=pc)  # the snapshot holds `held`
    assert len(pc.ids) > 32 and pc.stats.rebuilds == 0
    # Diverging in the last token (e.g. another end-of-turn token) cannot be trimmed past the window.
    third = pc.ids[:-1] + list(lm.encode(" cat sings", raw=True).ids)
    got = lm.generate(third, max_tokens=8, prompt_cache=pc)
    s = pc.stats
    assert (s.restores, s.rebuilds) == (1, 0) and got.stats.cached_tokens == len(held)
    replay = PromptCache(lm, max_kv_size=32)  # the same work without the detour
    lm.generate(first, max_tokens=6, prompt_cache=replay)
    assert replay.ids == held
    assert ids_of(got) == ids_of(lm.generate(third, max_tokens=8, prompt_cache=replay))


def test_max_kv_size_bounds_memory(any_lm: nbllm.LM) -> None:
    pc = PromptCache(any_lm, max_kv_size=64)
    assert all(isinstance(c, RotatingKVCache) for c in pc._new_layers())
    sizes = []
    ids = list(any_lm.encode("Hello").ids)
    for turn in range(8):
        got = any_lm.generate(ids, max_tokens=16, prompt_cache=pc)
        ids = pc.ids + list(any_lm.encode(f" turn {turn} with a few more words", raw=True).ids)
        sizes.append(pc.stats.bytes_held)
    assert len(pc.ids) > 150 and got.stats.cached_tokens > 0
    assert max(sizes[3:]) == max(sizes[:4])  # stopped growing once the window was full


def test_kv_bits_quantizes_the_cache(tmp_path: Path) -> None:
    lm = nbllm.load(make_model(tmp_path / "q", "llama", overrides={"hidden_size": 128}))  # head size 32
    full = PromptCache(lm)
    quant = PromptCache(lm, kv_bits=4, kv_group_size=32)
    cold = lm.generate(PROMPT, max_tokens=8, prompt_cache=quant)
    lm.generate(PROMPT, max_tokens=8, prompt_cache=full)
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 4 for c in quant.layers)  # type: ignore[union-attr]
    assert quant.stats.bytes_held < full.stats.bytes_held / 3
    warm = lm.generate(PROMPT, max_tokens=8, prompt_cache=quant)  # reuses quantized prefix
    assert warm.stats.cached_tokens > 0 and ids_of(warm) == ids_of(cold)
    with pytest.raises(ValueError, match="head size divisible"):
        PromptCache(lm, kv_bits=4, kv_group_size=64)
    with pytest.raises(ValueError, match="got both"):
        PromptCache(lm, kv_bits=4, kv_group_size=32, max_kv_size=64)


def test_save_load_roundtrip(any_lm: nbllm.LM, tmp_path: Path) -> None:
    pc = PromptCache(any_lm)
    any_lm.generate(PROMPT, max_tokens=6, prompt_cache=pc)
    path = pc.save(tmp_path / "chat")
    assert path.name == "chat.safetensors" and not list(tmp_path.glob("tmp*"))
    meta = mx.load(str(path), return_metadata=True)[1]
    assert json.loads(meta["0.token_ids"]) == pc.ids and meta["0.nbllm_version"] == nbllm.__version__
    loaded = PromptCache.load(any_lm, path)
    assert loaded.ids == pc.ids and loaded.stats.bytes_held == pc.stats.bytes_held
    follow = pc.ids + list(any_lm.encode(" Rome", raw=True).ids)
    a = any_lm.generate(follow, max_tokens=10, prompt_cache=loaded)
    assert a.stats.cached_tokens == len(pc.ids)
    assert ids_of(a) == ids_of(any_lm.generate(follow, max_tokens=10, prompt_cache=pc))


def test_load_refuses_another_model(lm: nbllm.LM, model_dir: Path, tmp_path: Path) -> None:
    pc = PromptCache(lm)
    lm.generate(PROMPT, max_tokens=4, prompt_cache=pc)
    path = pc.save(tmp_path / "c.safetensors")
    same_shape = nbllm.load(make_model(tmp_path / "seed1", "llama", seed=1))
    for other in (same_shape, nbllm.load(model_dir / "qwen3")):
        with pytest.raises(ValueError, match="made with another model"):
            PromptCache.load(other, path)


def test_load_refuses_damaged_files(lm: nbllm.LM, tmp_path: Path) -> None:
    pc = PromptCache(lm)
    lm.generate(PROMPT, max_tokens=4, prompt_cache=pc)
    path = pc.save(tmp_path / "c")
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]

    def variant(name: str, data: bytes) -> Path:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        return p

    flipped = bytearray(raw)
    flipped[8 + header + 100] ^= 0xFF  # one byte of KV data
    arrays, meta = mx.load(str(path), return_metadata=True)
    ids = json.loads(meta["0.token_ids"])
    meta["0.token_ids"] = json.dumps([ids[1]] + ids[1:])  # a well-formed file with edited metadata
    mx.save_safetensors(str(tmp_path / "forged.safetensors"), arrays, meta)
    with pytest.raises(ValueError, match="checksum mismatch"):
        PromptCache.load(lm, variant("flipped", bytes(flipped)))
    with pytest.raises(ValueError, match="checksum mismatch"):
        PromptCache.load(lm, tmp_path / "forged.safetensors")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PromptCache.load(lm, variant("cut", raw[: len(raw) // 2]))
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"a": mx.zeros(2)})
    with pytest.raises(ValueError, match="expected an nbllm prompt cache"):
        PromptCache.load(lm, tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        PromptCache.load(lm, tmp_path / "missing.safetensors")


def test_bad_input_is_refused_and_changes_nothing(lm: nbllm.LM, tmp_path: Path) -> None:
    pc = PromptCache(lm)
    with pytest.raises(ValueError, match="empty cache"):
        pc.save(tmp_path / "x")
    lm.generate(PROMPT, max_tokens=4, prompt_cache=pc)
    before = (pc.ids, pc.stats)
    with pytest.raises(ValueError, match="at least one token"):
        pc.prepare([])
    with pytest.raises(TypeError, match="list of token ids"):
        pc.prepare("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token ids in"):
        pc.prepare([1, lm.vocab_size])
    with pytest.raises(ValueError, match="integer >= 0"):
        pc.trim_to(-1)
    with pytest.raises(TypeError, match="str or path"):
        pc.save(3)  # type: ignore[arg-type]
    assert (pc.ids, pc.stats) == before
    for kwargs in ({"max_kv_size": 0}, {"kv_bits": 7}, {"kv_group_size": 16}, {"prefill_step_size": 0}):
        with pytest.raises(ValueError, match="expected"):
            PromptCache(lm, **kwargs)


def test_a_new_request_on_the_same_thread_closes_an_unfinished_stream(lm: nbllm.LM) -> None:
    pc = PromptCache(lm)
    first = lm.stream(PROMPT, max_tokens=20, prompt_cache=pc)
    head = next(first)
    second = list(lm.stream("Hello", max_tokens=5, prompt_cache=pc))
    assert second[-1].finish_reason is not None and not pc.busy
    assert list(first) == [] and first.finish_reason == "cancelled" and first.tokens == [head]
    assert [t.id for t in second] == [t.id for t in lm.stream("Hello", max_tokens=5)]


def test_an_interrupt_inside_a_step_leaves_the_cache_consistent(any_lm: nbllm.LM) -> None:
    calls = []

    def interrupt(tokens: mx.array, logits: mx.array) -> mx.array:
        calls.append(1)
        if len(calls) == 4:  # in the forward pass feeding the 3rd token, before it is yielded
            raise KeyboardInterrupt
        return logits

    pc = PromptCache(any_lm)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for t in any_lm.stream(PROMPT, max_tokens=20, prompt_cache=pc, logits_processors=[interrupt]):
            seen.append(t.id)
    prompt = list(any_lm.encode(PROMPT).ids)
    assert len(seen) == 2 and pc.ids == prompt + seen  # the 3rd token's KV was trimmed away
    assert {c.offset for c in pc.layers} == {len(pc.ids)}  # type: ignore[union-attr]
    follow = pc.ids + list(any_lm.encode(" next", raw=True).ids)
    warm = any_lm.generate(follow, max_tokens=10, prompt_cache=pc)
    assert warm.stats.cached_tokens == len(prompt) + 2
    assert ids_of(warm) == ids_of(any_lm.generate(follow, max_tokens=10))


def test_prefill_in_chunks_with_progress(lm: nbllm.LM, capsys: pytest.CaptureFixture[str]) -> None:
    pc = PromptCache(lm, prefill_step_size=16)
    ids = list(lm.encode(" ".join(["the model cache prompt"] * 12), raw=True).ids)
    seen: list[tuple[int, int]] = []
    assert pc.prefill(ids, progress=lambda done, total: seen.append((done, total))) == len(ids)
    assert seen[-1] == (len(ids), len(ids)) and all(d == min(16 * (i + 1), len(ids)) for i, (d, _) in enumerate(seen))
    assert pc.prefill(ids) == 0  # already there
    got = lm.generate(ids, max_tokens=8, prompt_cache=pc)
    assert got.stats.cached_tokens == len(ids) - 1
    assert ids_of(got) == ids_of(lm.generate(ids, max_tokens=8))
    PromptCache(lm, prefill_step_size=16).prefill(ids, progress=True)
    assert "prefill" in capsys.readouterr().err  # the tqdm bar
    with pytest.raises(TypeError, match="progress"):
        pc.prefill(ids, progress="yes")  # type: ignore[arg-type]


def test_stepper_reuses_the_cached_prompt_and_keeps_its_invariant(any_lm: nbllm.LM) -> None:
    pc = PromptCache(any_lm)
    any_lm.generate(PROMPT, max_tokens=4, prompt_cache=pc)
    st = Stepper(any_lm, PROMPT, prompt_cache=pc)
    assert pc.stats.last_reused == len(st.prompt_ids) - 1
    ref = Stepper(any_lm, PROMPT)
    first = [st.step().id for _ in range(10)]
    assert first == [ref.step().id for _ in range(10)]
    twin = st.branch()
    st.back(6)
    assert [st.step().id for _ in range(6)] == first[4:]
    assert [twin.step().id for _ in range(3)] == [ref.step().id for _ in range(3)]
    assert pc.ids == st.prompt_ids  # the shared cache holds the prompt, not the stepper's moves
    with pytest.raises(TypeError, match="PromptCache"):
        Stepper(any_lm, PROMPT, prompt_cache=[KVCache()])
