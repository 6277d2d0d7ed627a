"""What a structured-output request means: an llguidance grammar and a parser.

``output_spec`` turns ``schema=`` / ``json=`` / ``regex=`` / ``choices=`` /
``grammar=`` into an ``OutputSpec`` (grammar text + how to parse the finished
text). ``compile_matcher`` builds llguidance's matcher for a tokenizer once and
caches it per (grammar, tokenizer); each generation gets a cheap deep copy.
llguidance does the grammar work for every kind (JSON Schema, regex, Lark and
GBNF), so one engine serves them all with ~µs masks and ~ms compiles.
"""

from __future__ import annotations

import json as _json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["OutputSpec", "JSON_STYLE", "output_spec", "compile_matcher", "ll_tokenizer", "cached_grammars"]

# Compact, model-friendly JSON: `{"a": 1, "b": [2, 3]}`. A schema's own
# "x-guidance" options override these (llguidance applies defaults first).
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MATCHERS_PER_TOKENIZER = 64


@dataclass(frozen=True)
class OutputSpec:
    """A structured-output request, ready to compile.

    Attributes:
        kind: ``schema``, ``json``, ``regex``, ``choices`` or ``grammar``.
        grammar: The llguidance grammar text.
        parse: Turns the finished text into the value (Pydantic instance, dict, str...).
        label: Short human description, e.g. ``schema Person`` or ``regex '\\d+'``.
        source: What was asked for, in the form servers take it: the JSON Schema
            dict, the pattern, the list of choices or the grammar text.
    """

    kind: str
    grammar: str
    parse: Callable[[str], Any]
    label: str
    source: Any = None


def output_spec(
    *,
    schema: Any = None,
    json: Any = None,
    regex: Any = None,
    choices: Sequence[str] | None = None,
    grammar: Any = None,
) -> OutputSpec:
    """Build the spec for exactly one of the keyword arguments (see ``make_constraint``)."""
    import llguidance as llg

    given = {
        k: v
        for k, v in dict(schema=schema, json=json, regex=regex, choices=choices, grammar=grammar).items()
        if v is not None and v is not False
    }
    if len(given) != 1:
        raise ValueError(f"expected exactly one of schema/json/regex/choices/grammar, got {sorted(given) or 'none'}")
    kind, value = next(iter(given.items()))
    kind, value = _unwrap_outlines(kind, value)
    if kind == "json":
        if value is not True:
            raise TypeError(f"json: expected True (any JSON object; use schema= for a schema), got {value!r}")
        return OutputSpec("json", _json_grammar({"type": "object"}), _json.loads, "any JSON object", {"type": "object"})
    if kind == "schema":
        return _schema_spec(value)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise TypeError(f"regex: expected a non-empty pattern string, got {value!r}")
        return OutputSpec("regex", llg.grammar_from("regex", value), str, f"regex {value!r}", value)
    if kind == "choices":
        if (
            isinstance(value, (str, bytes))
            or not isinstance(value, (list, tuple))
            or not value
            or not all(isinstance(c, str) and c for c in value)
        ):
            raise TypeError(f"choices: expected a non-empty list of non-empty strings, got {value!r}")
        lark = "start: " + " | ".join(_lark_literal(c) for c in value)
        return OutputSpec("choices", llg.grammar_from("lark", lark), str, f"choices {list(value)!r}", list(value))
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"grammar: expected a Lark (or GBNF) grammar string, got {value!r}")
    try:
        text = llg.grammar_from("grammar", value)  # Lark as is; GBNF converted to Lark
    except ValueError as e:
        raise ValueError(f"grammar: invalid grammar: {e}") from None
    return OutputSpec("grammar", text, str, "grammar", text)


def _unwrap_outlines(kind: str, value: Any) -> tuple[str, Any]:
    # Accept outlines' output types (Regex, CFG, JsonSchema) through their public fields.
    name = type(value).__name__
    if not type(value).__module__.startswith("outlines"):
        return kind, value
    if name == "Regex":
        return "regex", value.pattern
    if name == "CFG":
        return "grammar", value.definition
    if name == "JsonSchema":
        return "schema", value.schema
    return kind, value


def _lark_literal(text: str) -> str:
    # A Lark string literal: JSON escaping of quotes, backslashes and control chars, Unicode kept.
    return _json.dumps(text, ensure_ascii=False)


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_DATA_KEYS = ("enum", "const", "default", "examples", "required", "x-guidance")


def closed_objects(node: Any) -> Any:
    """A copy of a JSON Schema where objects that list ``properties`` allow no others.

    JSON Schema leaves objects open by default, so a sampler may invent keys
    (Pydantic models say nothing either). Like outlines, nbllm closes them
    unless the schema sets ``additionalProperties`` or ``patternProperties``.
    """
    if isinstance(node, list):
        return [closed_objects(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _DATA_KEYS else closed_objects(value)
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_grammar(schema: Mapping[str, Any]) -> str:
    import llguidance as llg

    try:
        return llg.LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=JSON_STYLE)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"schema: expected a JSON Schema object, got {str(schema)[:80]!r} ({e})") from None


def _schema_spec(schema: Any) -> OutputSpec:
    if isinstance(schema, Mapping):
        return OutputSpec(
            "schema",
            _json_grammar(dict(schema)),
            _json.loads,
            f"schema {schema.get('title', '')}".strip(),
            dict(schema),
        )
    if isinstance(schema, str):
        try:
            parsed = _json.loads(schema)
        except ValueError as e:
            raise ValueError(
                f"schema: expected a JSON Schema as a JSON string, got text that is not JSON ({e})"
            ) from None
        if not isinstance(parsed, dict):
            raise ValueError(f"schema: expected a JSON object, got {type(parsed).__name__}")
        return _schema_spec(parsed)
    from pydantic import BaseModel, TypeAdapter

    if isinstance(schema, type) and issubclass(schema, BaseModel):
        described = schema.model_json_schema()
        return OutputSpec(
            "schema", _json_grammar(described), schema.model_validate_json, f"schema {schema.__name__}", described
        )
    try:  # dataclasses, TypedDicts, list[int], Literal[...]: anything Pydantic can describe
        adapter = TypeAdapter(schema)
        described = adapter.json_schema()
    except Exception:
        raise TypeError(
            f"schema: expected a Pydantic model class, a JSON Schema dict or JSON string, got {schema!r}"
        ) from None
    label = f"schema {getattr(schema, '__name__', schema)}"
    return OutputSpec("schema", _json_grammar(described), adapter.validate_json, label, described)


class _TokenizerEntry:
    def __init__(self, ll: Any):
        self.ll = ll
        self.matchers: OrderedDict[str, Any] = OrderedDict()


_ENTRIES: weakref.WeakKeyDictionary[Any, _TokenizerEntry] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's ``LLTokenizer`` for an mlx-lm/Hugging Face tokenizer (built once, cached)."""
    return _entry(tokenizer).ll


def _entry(tokenizer: Any) -> _TokenizerEntry:
    with _LOCK:
        entry = _ENTRIES.get(tokenizer)
        if entry is None:
            entry = _ENTRIES[tokenizer] = _TokenizerEntry(_build_ll_tokenizer(tokenizer))
        return entry


def _build_ll_tokenizer(tokenizer: Any) -> Any:
    import copy

    import llguidance as llg

    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers only
    if backend is None:
        raise TypeError(f"structured output: expected a fast Hugging Face tokenizer, got {type(tokenizer).__name__}")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    return llg.LLTokenizer(backend.to_str(), eos_token=eos)


def cached_grammars(tokenizer: Any) -> int:
    """How many compiled grammars are cached for this tokenizer."""
    with _LOCK:
        entry = _ENTRIES.get(tokenizer)
        return len(entry.matchers) if entry is not None else 0


def compile_matcher(spec: OutputSpec, tokenizer: Any) -> Any:
    """Return a fresh llguidance ``LLMatcher`` for ``spec`` (compiled once per tokenizer).

    Raises:
        ValueError: The schema, regex or grammar is invalid (llguidance's message included).
    """
    import llguidance as llg

    entry = _entry(tokenizer)
    with _LOCK:
        pristine = entry.matchers.get(spec.grammar)
        if pristine is not None:
            entry.matchers.move_to_end(spec.grammar)
            return pristine.deep_copy()
    pristine = llg.LLMatcher(entry.ll, spec.grammar, log_level=0)
    if pristine.is_error():
        what = {
            "schema": "JSON Schema",
            "json": "JSON Schema",
            "regex": "regular expression",
            "choices": "choices",
            "grammar": "grammar",
        }[spec.kind]
        message = " ".join(pristine.get_error().split())
        raise ValueError(f"{spec.kind}: invalid {what}: {message}")
    with _LOCK:
        entry.matchers[spec.grammar] = pristine
        while len(entry.matchers) > _MATCHERS_PER_TOKENIZER:
            entry.matchers.popitem(last=False)
    return pristine.deep_copy()
