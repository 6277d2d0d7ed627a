"""Golden checks for the two embedded models, through nbllm's public API only.

The expected answers are the facts of the models' generated worlds (see
scripts/train_default_model.py and scripts/train_vision_model.py); the
prompts include phrasings and pictures held out from training. Greedy
decoding, so each answer is exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

import nbllm

ROOT = Path(__file__).resolve().parent.parent
VISION_PATH = ROOT / "nbllm" / "assets" / "default-vision"
DRAFT_PATH = ROOT / "nbllm" / "assets" / "default-draft"
sys.path.insert(0, str(ROOT / "scripts"))
from train_vision_model import answer, draw_scene  # noqa: E402


@pytest.fixture(scope="module")
def lm() -> nbllm.LM:
    return nbllm.load()


@pytest.fixture(scope="module")
def draft() -> nbllm.LM:
    return nbllm.load("nbllm/default-draft")


@pytest.fixture(scope="module")
def vlm() -> nbllm.VisionLM:
    if not (VISION_PATH / "model.safetensors").exists():
        # no trained vision model has met its card's bar yet (scripts/reports/default_vision_*)
        pytest.skip("nbllm/assets/default-vision not built: run scripts/train_vision_model.py")
    model = nbllm.load(VISION_PATH)
    assert isinstance(model, nbllm.VisionLM)
    return model


def reply(chat: nbllm.Chat, text: str, **kwargs: object) -> str:
    r = chat.send(text, **kwargs)
    for _ in r:
        pass
    return r.text


# -- text model (the shipped version 1) ----------------------------------------
def test_paris_continuation_and_probability(lm: nbllm.LM) -> None:
    out = lm.generate("The capital of France is", raw=True, max_tokens=3, top_logprobs=5)
    assert out.text == " Paris."
    first = out.tokens[0]
    assert first.piece == " Paris"
    assert first.top[0].piece == " Paris"
    assert first.prob == pytest.approx(0.9944, abs=0.002)


@pytest.mark.parametrize(
    "prompt, want",
    [
        # the phrasing held out for each of these facts (never in the training corpus)
        ("In France, the capital is", " Paris."),
        ("What is the capital of Japan? It is", " Tokyo."),
        ("France is a country in", " Europe."),
        ("The sound a cow makes is", " moo."),
        ("The baby of a cat is called", " a kitten."),
        ("The color of a banana is", " yellow."),
    ],
)
def test_heldout_fact_phrasings(lm: nbllm.LM, prompt: str, want: str) -> None:
    assert lm.generate(prompt, raw=True, max_tokens=4).text.startswith(want)


def test_chat_answers(lm: nbllm.LM) -> None:
    assert lm.generate("What is the capital of France?", max_tokens=30).text == "The capital of France is Paris."
    assert lm.generate("Which continent is Japan in?", max_tokens=30).text == "Japan is in Asia."
    chat = nbllm.Chat(lm)
    assert reply(chat, "What is the capital of Japan?") == "The capital of Japan is Tokyo."


class Capital(BaseModel):
    country: str
    capital: str


def test_json_schema_capital(lm: nbllm.LM) -> None:
    out = lm.generate("Give the capital of Japan as JSON.", schema=Capital, max_tokens=40)
    assert out.value == Capital(country="Japan", capital="Tokyo")


def test_story(lm: nbllm.LM) -> None:
    text = lm.generate("Tell me a short story about a cat.", max_tokens=200).text
    assert text.startswith("Once upon a time, there was a soft cat named Hana.")
    assert text.endswith("Hana was happy again.")


# Issue 12 targets the shipped model does not meet yet (see MODEL_CARD.md and
# scripts/reports/): strict, so they fail loudly once a model that meets them lands.
@pytest.mark.xfail(strict=True, reason="version 1 was not trained on follow-ups ('And of France?')")
def test_chat_follow_ups_use_earlier_turns(lm: nbllm.LM) -> None:
    chat = nbllm.Chat(lm)
    assert reply(chat, "What is the capital of Japan?") == "The capital of Japan is Tokyo."
    assert reply(chat, "And of France?") == "The capital of France is Paris."
    assert reply(chat, "What about its continent?") == "France is in Europe."


@pytest.mark.xfail(strict=True, reason="France is never seen as JSON in training; version 1 answers Copenhagen")
def test_json_schema_for_a_country_never_seen_as_json(lm: nbllm.LM) -> None:
    out = lm.generate("Give the capital of France as JSON.", schema=Capital, max_tokens=40)
    assert out.value == Capital(country="France", capital="Paris")


# -- draft model (speculative decoding) -------------------------------------------
def test_the_draft_shares_the_tokenizer_and_is_small(lm: nbllm.LM, draft: nbllm.LM) -> None:
    assert draft.tokenizer.get_vocab() == lm.tokenizer.get_vocab()
    assert draft.tokenizer.eos_token_ids == lm.tokenizer.eos_token_ids
    assert sum(f.stat().st_size for f in DRAFT_PATH.iterdir()) < 5_000_000
    assert draft.info.parameters * 3 < lm.info.parameters


@pytest.mark.parametrize(
    "prompt, raw",
    [("Once upon a time", True), ("Tell me a story about a cat.", False), ("What is the capital of Japan?", False)],
)
def test_speculative_greedy_equals_plain_greedy(lm: nbllm.LM, draft: nbllm.LM, prompt: str, raw: bool) -> None:
    plain = lm.generate(prompt, raw=raw, max_tokens=64)
    fast = lm.generate(prompt, raw=raw, max_tokens=64, draft_model=draft)
    assert [t.id for t in fast.tokens] == [t.id for t in plain.tokens]
    assert fast.stats.acceptance_rate is not None and fast.stats.acceptance_rate > 0.5  # the draft learned the world


# -- vision model -------------------------------------------------------------
SCENES = [
    [("circle", "red", 30, 36, 14), ("square", "blue", 82, 70, 13)],
    [("triangle", "green", 24, 80, 14), ("star", "yellow", 86, 30, 15), ("square", "purple", 56, 50, 12)],
    [("square", "orange", 26, 28, 13), ("square", "red", 84, 84, 12), ("circle", "blue", 80, 28, 13)],
]


@pytest.mark.parametrize(
    "scene, question",
    [
        (SCENES[0], "What colour is the circle?"),
        (SCENES[0], "How many squares are there?"),
        (SCENES[0], "Is the circle left of the square?"),
        (SCENES[1], "Is the triangle left of the star?"),
        (SCENES[1], "What shape is yellow?"),
        (SCENES[1], "How many shapes are there?"),
        (SCENES[2], "How many squares are there?"),
        (SCENES[2], "What colour is the circle?"),
    ],
)
def test_vision_answers(vlm: nbllm.VisionLM, scene: list, question: str) -> None:
    want = answer(scene, question)
    assert want is not None
    assert vlm.generate(question, images=draw_scene(scene), max_tokens=16).text == want


def test_vision_chat_follow_up(vlm: nbllm.VisionLM) -> None:
    scene = SCENES[2]
    chat = nbllm.Chat(vlm)
    assert reply(chat, "What colour is the circle?", images=draw_scene(scene)) == "The circle is blue."
    assert reply(chat, "How many squares are there?") == "There are two squares."
