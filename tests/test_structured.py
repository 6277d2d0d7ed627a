"""Structured output on real tiny models: schemas, Pydantic, json, regex, choices, grammars.

Random-weight models write arbitrary text, so whatever they produce under a
constraint must be valid: every output here is sampled with temperature and
several seeds, then checked with jsonschema / Pydantic / re / lark.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Literal

import jsonschema
import mlx.core as mx
import pytest
from pydantic import BaseModel, Field

import nbllm
from nbllm.grammar import cached_grammars, ll_tokenizer
from nbllm.structured import Constraint, StructuredOutputError, make_constraint
from nbllm.testing import make_model

ROOT = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_structured", ROOT / "bench" / "bench_structured.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tokenizer_lms(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, nbllm.LM]:
    """Models whose tokenizers differ: 300- and 512-token BPEs, and a 4K BPE trained on another corpus."""
    root = tmp_path_factory.mktemp("structured")
    big = _bench_module().big_vocab_model(root / "qwen3-4k", 4000, {}, "qwen3", n_words=60_000)
    return {
        "llama-300": nbllm.load(make_model(root / "llama-300", "llama", vocab_size=300, seed=1)),
        "gemma3-512": nbllm.load(model_dir / "gemma3"),
        "qwen3-4k": nbllm.load(big),
    }


ADDRESS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
    "required": ["city", "zip"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 10}, "address": ADDRESS},
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}},
            "required": ["id"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "enum_bounds": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "level": {"type": "integer", "minimum": 3, "maximum": 7},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "level", "ok"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": ["string", "null"], "maxLength": 5},
            "c": {"type": "boolean"},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 4},
        },
        "required": ["code", "tags"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema_outputs_validate_across_tokenizers(tokenizer_lms: dict[str, nbllm.LM], name: str) -> None:
    schema = SCHEMAS[name]
    for lm in tokenizer_lms.values():
        for seed in (0, 1):
            c = nbllm.generate(lm, "Answer in JSON.", schema=schema, temperature=1.0, seed=seed, max_tokens=400)
            assert c.finish_reason == "stop" and c.tokens[-1].special
            jsonschema.validate(c.value, schema)
            assert json.loads(c.text) == c.value


def test_number_bounds(lm: nbllm.LM) -> None:
    schema = {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": -1, "maximum": 1},
            "t": {"type": "number", "exclusiveMinimum": 10},
        },
        "required": ["ratio", "t"],
        "additionalProperties": False,
    }
    done = 0
    for seed in range(8):
        try:  # a random model may repeat digits forever: then a clear error, never a bad number
            c = nbllm.generate(lm, "x", schema=schema, temperature=1.0, seed=seed, max_tokens=40)
        except StructuredOutputError as e:
            assert e.finish_reason == "length"
            continue
        jsonschema.validate(c.value, schema)
        done += 1
    assert done >= 3


def test_schema_as_json_string_and_stream(lm: nbllm.LM) -> None:
    schema = SCHEMAS["enum_bounds"]
    tokens = list(nbllm.stream(lm, "go", schema=json.dumps(schema), temperature=0.7, seed=3, max_tokens=300))
    text = "".join(t.text for t in tokens)
    jsonschema.validate(json.loads(text), schema)
    assert tokens[-1].finish_reason == "stop"


class Pet(BaseModel):
    kind: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)


class Owner(BaseModel):
    name: str = Field(min_length=1, max_length=12)
    phone: str = Field(pattern=r"^[0-9]{3}-[0-9]{4}$")
    pets: list[Pet] = Field(max_length=2)
    nickname: str | None = Field(default=None, max_length=6)


def test_pydantic_model_returns_an_instance(tokenizer_lms: dict[str, nbllm.LM]) -> None:
    for lm in tokenizer_lms.values():
        c = lm.generate("Who owns what?", schema=Owner, temperature=1.0, seed=5, max_tokens=400)
        assert isinstance(c.value, Owner)
        assert c.value == Owner.model_validate_json(c.text)
        jsonschema.validate(json.loads(c.text), Owner.model_json_schema())


def test_types_pydantic_can_describe(lm: nbllm.LM) -> None:
    c = nbllm.generate(lm, "numbers", schema=list[int], temperature=1.0, seed=2, max_tokens=300)
    assert isinstance(c.value, list) and all(isinstance(x, int) for x in c.value)


def test_json_true_gives_json_objects_or_a_clear_error(lm: nbllm.LM) -> None:
    done = 0
    for seed in range(12):
        try:
            c = nbllm.generate(lm, "JSON please", json=True, temperature=1.0, seed=seed, max_tokens=120)
        except StructuredOutputError as e:  # a random model may wander on; never silently invalid
            assert e.finish_reason == "length" and e.partial_text.startswith("{")
            continue
        assert isinstance(c.value, dict) and json.loads(c.text) == c.value
        done += 1
    assert done >= 2


def test_regex_and_forced_tokens(any_lm: nbllm.LM) -> None:
    pattern = r"[0-9]{3}-(cat|dog)s?!"
    for seed in range(3):
        c = nbllm.generate(any_lm, "id:", regex=pattern, temperature=1.0, seed=seed, max_tokens=60)
        assert re.fullmatch(pattern, c.text) and c.value == c.text
        assert c.tokens[-1].special and c.tokens[-1].finish_reason == "stop"
        for t in c.tokens:
            assert 0.0 <= t.masked_prob <= 1.0
            if t.forced:  # only one token allowed: it had all the (masked) probability
                assert t.logprob == pytest.approx(0.0, abs=1e-5)
        assert c.tokens[-1].forced  # after "!" nothing but EOS can follow


def test_choices(lm: nbllm.LM) -> None:
    choices = ["yes", "no", "no way", "café ☕", 'say "hi"']  # a prefix of another, Unicode, quotes
    for lm_seed in range(6):
        c = nbllm.generate(lm, "Well?", choices=choices, temperature=1.5, seed=lm_seed)
        assert c.value in choices and c.text == c.value
        assert c.tokens[-1].special and c.tokens[-1].forced  # a complete choice with no longer one: EOS only
    c = nbllm.generate(lm, "Well?", choices=['say "hi"'])
    assert c.value == 'say "hi"' and c.tokens[-1].forced


def test_lark_and_gbnf_grammars(lm: nbllm.LM) -> None:
    import lark

    grammar = r"""
start: greeting " " name "!" (" " mood)?
greeting: "hello" | "hi" | "good morning"
name: /[a-z]{1,8}/
mood: "(" ("happy" | "sad") ")"
"""
    check = lark.Lark(grammar)
    for seed in range(4):
        c = nbllm.generate(lm, "greet", grammar=grammar, temperature=1.0, seed=seed, max_tokens=60)
        check.parse(c.text)  # raises if the text is not in the language
        assert c.value == c.text
    c = nbllm.generate(lm, "y/n", grammar='root ::= ("yes" | "no") "."', temperature=1.0, seed=0)
    assert c.text in ("yes.", "no.")


def test_outlines_output_types(lm: nbllm.LM) -> None:
    from outlines.types import CFG, JsonSchema, Regex

    assert re.fullmatch("[ab]{4}", nbllm.generate(lm, "x", regex=Regex("[ab]{4}"), temperature=1.0, seed=1).text)
    assert nbllm.generate(lm, "x", grammar=CFG('start: "a" | "b"'), temperature=1.0, seed=1).text in "ab"
    schema = JsonSchema(json.dumps(SCHEMAS["optional"]))
    jsonschema.validate(
        nbllm.generate(lm, "x", schema=schema, temperature=1.0, seed=1, max_tokens=200).value, SCHEMAS["optional"]
    )


def test_masked_prob_is_the_probability_the_mask_removed(lm: nbllm.LM) -> None:
    choices = ["red", "green", "blue"]
    free = nbllm.Stepper(lm, "Pick a color.")
    constrained = nbllm.Stepper(lm, "Pick a color.", choices=choices)
    allowed = mx.isfinite(constrained.logprobs)
    expected = 1.0 - mx.sum(mx.where(allowed, mx.exp(free.logprobs), 0.0)).item()
    c = nbllm.generate(lm, "Pick a color.", choices=choices)
    assert c.tokens[0].masked_prob == pytest.approx(expected, abs=1e-4)
    assert c.tokens[0].masked_prob > 0.5  # a random model rarely wants these tokens
    assert constrained.step().masked_prob == pytest.approx(expected, abs=1e-4)
    assert nbllm.generate(lm, "free", max_tokens=3).tokens[0].masked_prob is None


def test_too_few_tokens_raises_with_the_partial_text(lm: nbllm.LM) -> None:
    with pytest.raises(StructuredOutputError) as info:
        nbllm.generate(lm, "go", schema=SCHEMAS["nested"], temperature=1.0, seed=0, max_tokens=5)
    err = info.value
    assert isinstance(err, ValueError) and err.finish_reason == "length"
    assert err.partial_text.startswith('{"name": "') and "max_tokens" in str(err)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schema": {"type": "strin"}}, "schema: invalid JSON Schema"),
        ({"schema": "{not json"}, "schema: expected a JSON Schema as a JSON string"),
        ({"schema": 42}, "schema: expected a Pydantic model class"),
        ({"regex": "(ab"}, "regex: invalid regular expression"),
        ({"regex": ""}, "regex: expected a non-empty pattern"),
        ({"grammar": "start: undefined_rule"}, "grammar: invalid grammar"),
        ({"choices": []}, "choices: expected a non-empty list"),
        ({"choices": "yes"}, "choices: expected a non-empty list"),
        ({"choices": ["a", 1]}, "choices: expected a non-empty list"),
        ({"json": "yes"}, "json: expected True"),
        ({"json": True, "regex": "a"}, "expected at most one of"),
    ],
)
def test_bad_input_fails_before_generation(lm: nbllm.LM, kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        nbllm.stream(lm, "hi", **kwargs)  # raises at the call, before any token
    with pytest.raises((ValueError, TypeError), match="expected|invalid"):
        make_constraint(lm, **kwargs)


def test_compiled_grammars_are_cached_per_tokenizer(lm: nbllm.LM, tokenizer_lms: dict[str, nbllm.LM]) -> None:
    other = tokenizer_lms["llama-300"]
    assert ll_tokenizer(lm.tokenizer) is ll_tokenizer(lm.tokenizer)
    assert ll_tokenizer(lm.tokenizer) is not ll_tokenizer(other.tokenizer)
    pattern = "cached-[0-9]"
    before = cached_grammars(lm.tokenizer)
    a, b = make_constraint(lm, regex=pattern), make_constraint(lm, regex=pattern)
    assert cached_grammars(lm.tokenizer) == before + 1
    # Each constraint has its own state: running one leaves the other at the start.
    ts = nbllm.stream(lm, "x", constraint=a, temperature=1.0, seed=0)
    ts.completion()
    assert ts.constraint.is_complete and not a.is_complete and not b.is_complete  # a run works on its own copy
    make_constraint(other, regex=pattern)
    assert cached_grammars(other.tokenizer) >= 1


def test_stepper_back_branch_and_choose(lm: nbllm.LM) -> None:
    pattern = r"(abc|abd|xyz)[0-9]{2}"
    st = nbllm.Stepper(lm, "code:", regex=pattern, temperature=1.0, seed=4)
    while not st.done:
        st.step()
    first = list(st.ids)
    assert re.fullmatch(pattern, st.text) and st.tokens[-1].special
    st.back(1)  # un-take EOS only: the grammar keeps its state, so EOS is all it allows
    assert not st.done and st.constraint.is_complete
    assert st.step().forced and st.ids == first
    st.back(1)
    st.back(len(st.tokens))  # to the prompt: the grammar is back at its start
    assert not st.constraint.is_complete
    with pytest.raises(ValueError, match="not allowed by the constraint"):
        st.choose("q")
    greedy = nbllm.Stepper(lm, "code:", regex=pattern)
    while not greedy.done:
        greedy.step()
    before = list(greedy.ids)
    greedy.back(3)
    while not greedy.done:
        greedy.step()
    assert greedy.ids == before  # the rolled-back grammar gives the same masks again
    # A branch gets its own grammar state: different choices on each side stay valid.
    st.choose("x")
    twin = st.branch()
    assert twin.constraint is not st.constraint
    st.reset()
    st.choose("a")
    for s in (st, twin):
        while not s.done:
            s.step()
        assert re.fullmatch(pattern, s.text)
    assert st.text.startswith("a") and twin.text.startswith("x")


def test_processor_masks_padded_vocab_and_rolls_back(lm: nbllm.LM) -> None:
    c = make_constraint(lm, choices=["hello"])
    padded = lm.vocab_size + 64  # models often have more output rows than tokenizer entries
    logits = mx.zeros((1, padded))
    out = c.processor(mx.array([1, 2, 3]), logits)  # first call: the prompt
    assert out.shape == (1, padded)
    assert not mx.any(mx.isfinite(out[0, lm.vocab_size :])).item()
    first = int(mx.argmax(out[0]).item())
    out2 = c.processor(mx.array([1, 2, 3, first]), logits)
    assert c.allowed_count(1) is not None and c.allowed_count(0) > 0
    c.rollback(1)
    again = c.processor(mx.array([1, 2, 3]), logits)
    assert mx.array_equal(mx.isfinite(again), mx.isfinite(out)).item()
    twin = c.copy()
    assert (
        isinstance(twin, Constraint)
        and mx.array_equal(mx.isfinite(twin.processor(mx.array([1, 2, 3, first]), logits)), mx.isfinite(out2)).item()
    )
    with pytest.raises(ValueError, match="not allowed"):
        c.processor(mx.array([1, 2, 3, lm.tokenizer.encode("zz", add_special_tokens=False)[0]]), logits)


def test_constrained_reply_in_a_chat(lm: nbllm.LM) -> None:
    chat = nbllm.Chat(lm, temperature=1.0, seed=0)
    chat.send("Hello!", max_tokens=12).completion()  # a free turn first
    schema = SCHEMAS["enum_bounds"]
    constraint = make_constraint(lm, schema=schema)
    reply = chat.send("Now answer in JSON.", constraint=constraint, max_tokens=300).completion()
    jsonschema.validate(reply.value, schema)
    assert reply.value == constraint.finish(reply)
    assert chat.history[-1] == {"role": "assistant", "content": reply.text}
    assert chat.last_stats.cached_tokens > 0  # the constrained turn reused the conversation's cache
    third = chat.send("A or B?", choices=["A", "B"]).completion()
    assert third.text in ("A", "B") and third.value == third.text and chat.history[-1]["content"] == third.text
