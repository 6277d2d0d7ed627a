"""Vision models through the text engine: parity with mlx-vlm, stepper, cache reuse, bad input.

Two tiny random-weight mlx-vlm architectures with their real image-processor
configs: Qwen2-VL (mRoPE positions, dynamic image size) and Gemma 3 (SigLIP at
896 px, 256 tokens per image, sliding-window cache); Qwen2.5-VL for parity; and
Qwen3-VL, which needs mlx-vlm's own loop and is refused by name.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

import nbllm
from nbllm.cache import PromptCache
from nbllm.testing import make_image, make_vision_model
from nbllm.vision import VisionLM

ARCHS = ["qwen2_vl", "gemma3"]
QUESTION = "What is in this picture?"


@pytest.fixture(scope="session", params=ARCHS)
def vlm(request: pytest.FixtureRequest, vision_dir: Path) -> VisionLM:
    lm = nbllm.load(vision_dir / request.param)
    assert isinstance(lm, VisionLM)
    return lm


def _mlx_vlm_tokens(path: Path, prompt: Any, images: list[str], max_tokens: int) -> tuple[list[int], list[int]]:
    """mlx-vlm's own prompt ids and greedy tokens for the same folder, prompt and images."""
    from mlx_vlm import load
    from mlx_vlm.generate import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    model, processor = load(str(path))
    text = apply_chat_template(processor, model.config, prompt, num_images=len(images))
    ids = prepare_inputs(
        processor,
        images=images or None,
        prompts=text,
        image_token_index=None,
        add_special_tokens=should_add_special_tokens(model.config.model_type, processor),
    )["input_ids"]
    last = None
    for last in stream_generate(model, processor, text, image=images or None, max_tokens=max_tokens, temperature=0.0):
        pass
    assert last is not None
    return ids[0].tolist(), list(last.token_ids)


# -- loading and parity ---------------------------------------------------------


def test_load_routes_vision_config_to_vision_lm(vlm: VisionLM) -> None:
    assert vlm.is_vision and vlm.info.is_vision
    assert vlm.info.architecture in ARCHS
    vision_params = sum(v.size for k, v in _flat(vlm.vlm.vision_tower.parameters()))
    assert vlm.info.parameters > vision_params > 0  # counts the vision tower too
    assert "<table" in vlm._repr_html_()


@pytest.mark.parametrize("images", [["a.png"], ["a.png", "b.png"], []])
def test_greedy_parity_with_mlx_vlm(vlm: VisionLM, vision_dir: Path, images: list[str]) -> None:
    paths = [str(vision_dir / p) for p in images]
    ref_ids, ref_tokens = _mlx_vlm_tokens(vlm.path, QUESTION, paths, max_tokens=16)
    assert list(vlm.encode(QUESTION, images=paths).ids) == ref_ids
    ours = [t.id for t in vlm.stream(QUESTION, images=paths, max_tokens=16)]
    assert ours == ref_tokens
    if images:  # the picture matters: without it the model says something else
        assert ours != [t.id for t in vlm.stream(QUESTION, max_tokens=16)]


def test_qwen2_5_vl_parity_with_mlx_vlm(vision_dir: Path, tmp_path: Path) -> None:
    lm = nbllm.load(make_vision_model(tmp_path / "qwen2_5_vl", "qwen2_5_vl"))
    paths = [str(vision_dir / "a.png"), str(vision_dir / "b.png")]
    ref_ids, ref_tokens = _mlx_vlm_tokens(lm.path, QUESTION, paths, max_tokens=12)
    assert list(lm.encode(QUESTION, images=paths).ids) == ref_ids
    assert [t.id for t in lm.stream(QUESTION, images=paths, max_tokens=12)] == ref_tokens


def test_encode_returns_merged_embeddings(vlm: VisionLM, vision_dir: Path) -> None:
    image_path = vision_dir / "a.png"
    prompt = vlm.encode(QUESTION, images=image_path)
    plain = vlm.encode(QUESTION)
    ids = list(prompt.ids)
    assert len(ids) > len(plain) and prompt.media and not plain.media and not prompt.continuation
    # token ids with one image marker per image, plus the images: expanded as the processor does
    marked = vlm.tokenizer.encode(vlm.image_marker + " " + QUESTION, add_special_tokens=False)
    expanded = vlm.encode(marked, images=image_path)
    assert len(expanded) > len(marked) and expanded.media == prompt.media
    emb = prompt.embeddings
    hidden = vlm.vlm.language_model.model.embed_tokens.weight.shape[1]
    assert emb.shape == (len(ids), hidden)
    text = vlm.vlm.language_model.model.embed_tokens(mx.array(ids))
    image = mx.array([t in vlm.model.image_ids for t in ids])
    assert int(image.sum().item()) > 0
    assert mx.array_equal(mx.where(image[:, None], 0, emb), mx.where(image[:, None], 0, text)).item()
    assert not mx.allclose(mx.where(image[:, None], emb, 0), mx.where(image[:, None], text, 0)).item()


def test_image_sources_are_equivalent(qwen: VisionLM, vision_dir: Path) -> None:
    from PIL import Image

    path = vision_dir / "a.png"
    data = path.read_bytes()
    pil = Image.open(path)
    pixels = np.asarray(pil.convert("RGB"))
    sources = [
        str(path),
        path,
        pil,
        pixels,
        pixels.astype(np.float32) / 255.0,
        data,
        bytearray(data),
        io.BytesIO(data),
        "data:image/png;base64," + base64.b64encode(data).decode(),
    ]
    ref = [t.id for t in qwen.stream(QUESTION, images=sources[0], max_tokens=6)]
    for src in sources[1:]:
        assert [t.id for t in qwen.stream(QUESTION, images=src, max_tokens=6)] == ref, type(src).__name__


# -- the engine's features on a vision model -------------------------------------


def test_stepper_matches_stream_back_and_branch(vlm: VisionLM, vision_dir: Path) -> None:
    img = vision_dir / "a.png"
    ref = [t.id for t in vlm.stream(QUESTION, images=img, max_tokens=10)]
    st = vlm.stepper(QUESTION, images=img)
    assert [st.step().id for _ in range(10)] == ref
    st.back(4)
    assert [st.step().id for _ in range(4)] == ref[6:]
    twin = st.branch()
    twin.back(3)
    assert [twin.step().id for _ in range(3)] == ref[7:]
    assert [t.id for t in st.tokens] == ref
    alt = next(a for a in twin.candidates(5) if a.id != ref[7])  # choose a different path
    twin.back(3)
    twin.choose(alt.id)
    assert [t.id for t in st.tokens] == ref  # the original is untouched


def test_followup_reuses_prompt_cache_and_image_features(vlm: VisionLM, vision_dir: Path) -> None:
    img = vision_dir / "b.png"
    vlm.clear_image_cache()
    cache = PromptCache(vlm)
    turn1 = [{"role": "user", "content": "What colour is it?"}]
    first = vlm.generate(turn1, images=img, max_tokens=8, prompt_cache=cache)
    misses = vlm.image_cache.misses
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And its shape?"}]
    second = vlm.generate(turn2, images=img, max_tokens=8, prompt_cache=cache)
    image_tokens = sum(t in vlm.model.image_ids for t in list(vlm.encode(turn2, images=img).ids))
    # the image (and everything before the new question) came from the cache
    assert second.stats.cached_tokens > image_tokens > 0
    assert vlm.image_cache.misses == misses and vlm.image_cache.hits >= 1  # vision tower not re-run
    vlm.clear_image_cache()
    fresh = vlm.generate(turn2, images=img, max_tokens=8)  # no prompt cache, features recomputed
    assert [t.id for t in second.tokens] == [t.id for t in fresh.tokens]
    assert vlm.image_cache.misses == misses + 1


def test_same_size_other_image_does_not_reuse_the_cache(vlm: VisionLM, vision_dir: Path) -> None:
    from PIL import ImageOps

    a = make_image(64, 48, seed=0)
    b = ImageOps.invert(a)  # same size, so the same placeholder ids
    turn = [{"role": "user", "content": "What is this?"}]
    assert list(vlm.encode(turn, images=a).ids) == list(vlm.encode(turn, images=b).ids)
    cache = PromptCache(vlm)
    vlm.generate(turn, images=a, max_tokens=6, prompt_cache=cache)
    warm = vlm.generate(turn, images=b, max_tokens=6, prompt_cache=cache)
    assert warm.stats.cached_tokens == 0
    assert [t.id for t in warm.tokens] == [t.id for t in vlm.generate(turn, images=b, max_tokens=6).tokens]
    again = vlm.generate(turn, images=b, max_tokens=6, prompt_cache=cache)
    assert again.stats.cached_tokens > 0  # the same image again is reused


def test_saved_prompt_cache_serves_a_followup(vlm: VisionLM, vision_dir: Path, tmp_path: Path) -> None:
    img = vision_dir / "a.png"
    cache = PromptCache(vlm)
    turn1 = [{"role": "user", "content": "What is this?"}]
    first = vlm.generate(turn1, images=img, max_tokens=6, prompt_cache=cache)
    loaded = PromptCache.load(vlm, cache.save(tmp_path / "chat"))  # mlx-lm's cache file format
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More?"}]
    warm = vlm.generate(turn2, images=img, max_tokens=6, prompt_cache=loaded)
    assert warm.stats.cached_tokens > 0
    assert [t.id for t in warm.tokens] == [t.id for t in vlm.generate(turn2, images=img, max_tokens=6).tokens]


def test_images_inside_chat_messages(vlm: VisionLM, vision_dir: Path) -> None:
    img = str(vision_dir / "a.png")
    side = list(vlm.encode([{"role": "user", "content": QUESTION}], images=img).ids)
    parts = [{"type": "text", "text": QUESTION}, {"type": "image", "image": img}]
    inline = list(vlm.encode([{"role": "user", "content": parts}]).ids)
    assert inline == side  # text then image: the layout both families use for images=
    blank = list(
        vlm.encode(
            [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}], images=img
        ).ids
    )
    assert blank == inline
    ref = [t.id for t in vlm.stream(inline.copy(), images=img, max_tokens=6)]  # token ids + images
    assert ref == [t.id for t in vlm.stream([{"role": "user", "content": parts}], max_tokens=6)]


def test_token_ids_with_one_marker_per_image_are_expanded(vlm: VisionLM, vision_dir: Path) -> None:
    # What a plain tokenizer makes of a chat template with image parts (as a
    # chat session that builds its own ids would): one marker token per image.
    imgs = [str(vision_dir / "a.png"), str(vision_dir / "b.png")]
    msgs = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}, {"type": "image"}]}]
    text = vlm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = vlm.tokenizer.encode(text, add_special_tokens=False)
    full = list(vlm.encode(msgs, images=imgs).ids)
    assert len(ids) < len(full)
    ts = vlm.stream(ids, images=imgs, max_tokens=6)
    assert ts.prompt_ids == full
    assert [t.id for t in ts] == [t.id for t in vlm.stream(msgs, images=imgs, max_tokens=6)]
    with pytest.raises(ValueError, match="one .* per image"):
        vlm.stream(ids, images=imgs[:1])


def test_interleaved_streams_keep_their_own_images(vlm: VisionLM, vision_dir: Path) -> None:
    # Transposed sizes: the same number of image tokens (same ids) but, for
    # Qwen2-VL, different 2D positions; each stream must keep its own.
    from PIL import ImageOps

    a, b = make_image(84, 56, seed=1), ImageOps.invert(make_image(56, 84, seed=2))
    assert list(vlm.encode(QUESTION, images=a).ids) == list(vlm.encode(QUESTION, images=b).ids)

    def run(ts: Any) -> list[tuple[int, float]]:  # logprobs too: wrong positions shift them
        return [(t.id, t.logprob) for t in ts]

    # references from fresh loads: each has seen only its own prompt
    ref_a = run(nbllm.load(vlm.path).stream(QUESTION, images=a, max_tokens=8))
    ref_b = run(nbllm.load(vlm.path).stream(QUESTION, images=b, max_tokens=8))
    vlm.stream(QUESTION, images=a, max_tokens=8)  # prepared, never run: a decoy with the same ids
    sa, sb = vlm.stream(QUESTION, images=a, max_tokens=8), vlm.stream(QUESTION, images=b, max_tokens=8)
    assert run(sb) == ref_b and run(sa) == ref_a
    assert ref_a != ref_b


def test_sampling_and_processors_apply(qwen: VisionLM, vision_dir: Path) -> None:
    img = vision_dir / "a.png"
    toks = list(qwen.stream(QUESTION, images=img, max_tokens=6, top_logprobs=3, temperature=0.7, seed=5))
    again = list(qwen.stream(QUESTION, images=img, max_tokens=6, top_logprobs=3, temperature=0.7, seed=5))
    assert [t.id for t in toks] == [t.id for t in again] and all(len(t.top) == 3 for t in toks)
    banned = toks[0].id
    out = qwen.generate(QUESTION, images=img, max_tokens=6, logit_bias={banned: -1e9})
    assert banned not in [t.id for t in out.tokens]


def test_structured_output_on_a_vision_model(vlm: VisionLM, vision_dir: Path) -> None:
    img = vision_dir / "a.png"
    out = vlm.generate(QUESTION, images=img, choices=["red", "green", "blue"], max_tokens=16)
    assert out.value in ("red", "green", "blue") and out.text == out.value
    out = vlm.generate(QUESTION, images=img, regex=r"[0-9]{3}", max_tokens=16)
    assert len(out.value) == 3 and out.value.isdigit()
    st = vlm.stepper(QUESTION, images=img, choices=["yes", "no"])
    while not st.done:
        st.step()
    assert st.text in ("yes", "no")


# -- bad input: clear errors, nothing lost ---------------------------------------


def test_bad_images_raise_one_line_errors_and_keep_the_cache(qwen: VisionLM, vision_dir: Path, tmp_path: Path) -> None:
    img = vision_dir / "a.png"
    cache = PromptCache(qwen)
    before = [t.id for t in qwen.generate(QUESTION, images=img, max_tokens=6, prompt_cache=cache).tokens]
    held = cache.ids
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(img.read_bytes()[:200])
    bad: list[tuple[Any, type[Exception], str]] = [
        (tmp_path / "missing.png", FileNotFoundError, "no file"),
        (tmp_path, ValueError, "directory"),
        (corrupt, ValueError, "could not decode"),
        (truncated, ValueError, "could not decode"),
        (b"", ValueError, "empty"),
        ("http://127.0.0.1:9/cat.png", ConnectionError, "offline"),
        ("data:image/png;base64,@@@", ValueError, "base64"),
        (np.zeros((4, 4, 5), np.uint8), ValueError, "shape"),
        (np.full((8, 8, 3), 2.0), ValueError, r"in \[0, 1\]"),
        (object(), TypeError, "expected a path, URL, PIL image"),
    ]
    for src, kind, words in bad:
        with pytest.raises(kind, match=words) as err:
            qwen.stream(QUESTION, images=src, prompt_cache=cache)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not both"):
        qwen.stream([{"role": "user", "content": [{"type": "image", "image": str(img)}]}], images=img)
    with pytest.raises(ValueError, match="image part"):
        list(qwen.encode([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], images=img).ids)
    with pytest.raises(ValueError, match="image token"):
        qwen.stream(list(qwen.encode(QUESTION).ids), images=img)  # token ids without placeholders
    with pytest.raises(ValueError, match="placeholder"):
        qwen.stream(list(list(qwen.encode(QUESTION, images=img).ids)))  # placeholders without images
    with pytest.raises(ValueError, match="marker"):
        qwen.stream(QUESTION, images=img, raw=True)
    assert cache.ids == held
    assert [t.id for t in qwen.generate(QUESTION, images=img, max_tokens=6, prompt_cache=cache).tokens] == before


def test_too_many_images(qwen: VisionLM, vision_dir: Path, tmp_path: Path) -> None:
    img = vision_dir / "a.png"
    qwen.max_images = 1
    try:
        with pytest.raises(ValueError, match="at most 1 image"):
            qwen.stream(QUESTION, images=[img, img])
    finally:
        qwen.max_images = None
    small = nbllm.load(make_vision_model(tmp_path / "small", "qwen2_vl", overrides={"max_position_embeddings": 64}))
    small.generate(QUESTION, images=img, max_tokens=2)  # one image fits
    with pytest.raises(ValueError, match="at most 64 tokens"):
        small.stream(QUESTION, images=[img, img])


def test_text_only_model_refuses_images(lm: nbllm.LM, vision_dir: Path) -> None:
    with pytest.raises(ValueError, match="text-only"):
        lm.stream("Hello", images=vision_dir / "a.png")
    with pytest.raises(ValueError, match="text-only"):
        lm.stepper("Hello", images=vision_dir / "a.png")


def test_raw_prompt_with_markers(qwen: VisionLM, vision_dir: Path) -> None:
    text = f"<|vision_start|>{qwen.image_marker}<|vision_end|>Describe:"
    ids = list(qwen.encode(text, raw=True, images=vision_dir / "a.png").ids)
    assert sum(t in qwen.model.image_ids for t in ids) > 1
    assert len(list(qwen.stream(text, raw=True, images=vision_dir / "a.png", max_tokens=3))) == 3


def test_architecture_needing_mlx_vlms_own_loop_is_refused_by_name(vision_dir: Path, tmp_path: Path) -> None:
    lm = nbllm.load(make_vision_model(tmp_path / "qwen3_vl", "qwen3_vl"))
    with pytest.raises(NotImplementedError, match="deepstack_visual_embeds.*mlx_vlm.generate"):
        lm.stream(QUESTION, images=vision_dir / "a.png")
    assert len(lm.generate(QUESTION, max_tokens=3).tokens) >= 1  # text prompts still work


def _flat(tree: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return list(tree_flatten(tree))


def test_chat_about_an_image_reuses_the_cache(vlm: VisionLM, vision_dir: Path) -> None:
    img = vision_dir / "a.png"
    chat = nbllm.Chat(vlm, max_tokens=6)
    first = chat.send("What is in the picture?", images=img).completion()
    assert chat.history[0]["images"] == 1 and "[1 image(s)]" in chat.to_markdown()
    misses = vlm.image_cache.misses
    second = chat.send("And its colour?").completion()
    image_tokens = sum(t in vlm.model.image_ids for t in chat.cache.ids)
    assert image_tokens > 0 and second.stats.cached_tokens > image_tokens  # the image came from the cache
    assert vlm.image_cache.misses == misses  # and the vision tower did not run again
    cold = nbllm.Chat(vlm, max_tokens=6)
    assert cold.send("What is in the picture?", images=img).completion().text == first.text
    cold.cache.clear()
    again = cold.send("And its colour?").completion()
    assert again.stats.cached_tokens == 0
    assert [t.id for t in again.tokens] == [t.id for t in second.tokens]


def test_chat_with_images_on_a_text_model_is_refused(lm: nbllm.LM, vision_dir: Path) -> None:
    chat = nbllm.Chat(lm)
    with pytest.raises(ValueError, match="text-only model"):
        chat.send("hi", images=vision_dir / "a.png")
    assert chat.history == []
