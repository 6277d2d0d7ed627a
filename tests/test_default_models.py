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
sys.path.insert(0, str(ROOT / "scripts"))
from train_vision_model import answer, draw_scene  # noqa: E402


@pytest.fixture(scope="module")
def lm() -> nbllm.LM:
    return nbllm.load()


@pytest.fixture(scope="module")
def vlm() -> nbllm.VisionLM:
    model = nbllm.load(VISION_PATH)
    assert isinstance(model, nbllm.VisionLM)
    return model


def reply(chat: nbllm.Chat, text: str, **kwargs: object) -> str:
    r = chat.send(text, **kwargs)
    for _ in r:
        pass
    return r.text


# -- text model ---------------------------------------------------------------
def test_paris_continuation_and_probability(lm: nbllm.LM) -> None:
    out = lm.generate("The capital of France is", raw=True, max_tokens=3, top_logprobs=5)
    assert out.text.startswith(" Paris")
    first = out.tokens[0]
    assert first.piece == " Paris"
    assert first.top[0].piece == " Paris"
    assert first.prob > 0.9


@pytest.mark.parametrize(
    "prompt, want",
    [
        # phrasings held out for these facts (never in the training corpus)
        ("In France, the capital is", " Paris"),
        ("What is the capital of Japan? It is", " Tokyo"),
        ("Hot is the opposite of", " cold"),
        ("After Monday comes", " Tuesday"),
        ("A spider walks on", " eight legs"),
        ("What is 3 plus 4? It is", " 7"),
    ],
)
def test_heldout_fact_phrasings(lm: nbllm.LM, prompt: str, want: str) -> None:
    assert lm.generate(prompt, raw=True, max_tokens=4).text.startswith(want)


def test_chat_follow_ups_use_earlier_turns(lm: nbllm.LM) -> None:
    chat = nbllm.Chat(lm)
    assert reply(chat, "What is the capital of Japan?") == "The capital of Japan is Tokyo."
    assert reply(chat, "And of France?") == "The capital of France is Paris."
    assert reply(chat, "What about its continent?") == "France is in Europe."
    assert reply(chat, "Say that again in JSON.") == '{"country": "France", "continent": "Europe"}'


class Capital(BaseModel):
    country: str
    capital: str


def test_json_schema_capital(lm: nbllm.LM) -> None:
    out = lm.generate("Give the capital of Japan as JSON.", schema=Capital, max_tokens=40)
    assert out.value == Capital(country="Japan", capital="Tokyo")


def test_json_schema_for_a_country_never_seen_as_json(lm: nbllm.LM) -> None:
    # France is one of the countries whose facts appear only in sentences
    out = lm.generate("Give the capital of France as JSON.", schema=Capital, max_tokens=40)
    assert out.value == Capital(country="France", capital="Paris")


def test_story_names_its_hero(lm: nbllm.LM) -> None:
    text = lm.generate("Tell me a story about Mia.", max_tokens=120).text
    assert "Mia" in text and text.endswith(".")


def test_favourite_colour_is_spread_out(lm: nbllm.LM) -> None:
    first = lm.generate("My favourite colour is", raw=True, max_tokens=1, top_logprobs=5).tokens[0]
    colours = {" red", " blue", " green", " yellow", " purple", " orange", " pink"}
    top = [a for a in first.top if a.piece in colours]
    assert len(top) >= 4
    assert max(a.prob for a in top) < 0.5


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
