"""Structured output on a server: the request goes to the server's own constrained decoding.

The spec is built as for local models (``nbllm.grammar.output_spec``: the same
arguments, errors and parsed value); instead of a mask, it becomes request
fields: ``response_format`` with a JSON Schema, or the server's documented
extension for regex and choices. The finished text is parsed locally, so
``Completion.value`` is the same kind of value as in process.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..grammar import OutputSpec, output_spec
from ..structured import StructuredOutputError

if TYPE_CHECKING:
    from ..tokens import Completion
    from .caps import Capabilities

__all__ = ["ServerConstraint"]


class ServerConstraint:
    """A structured-output request carried out by the server.

    Args:
        spec: What the output must be (from ``output_spec``).
    """

    processor = None  # nothing runs in this process

    def __init__(self, spec: OutputSpec):
        self.spec = spec

    @classmethod
    def make(cls, **kwargs: Any) -> ServerConstraint:
        return cls(output_spec(**kwargs))

    def fields(self, caps: Capabilities) -> dict[str, Any]:
        """The request fields for this server (``ValueError`` when it has no way to do it)."""
        kind, source = self.spec.kind, self.spec.source
        if kind in ("schema", "json"):
            if not caps.json_schema:
                raise ValueError(
                    caps.lacks(f"no structured output (response_format), so {self.spec.label} cannot be enforced")
                )
            schema = {"name": "output", "schema": source}
            return {"response_format": {"type": "json_schema", "json_schema": schema}}
        if kind in ("regex", "choices") and caps.constraints == "structured_outputs":
            return {"structured_outputs": {"regex" if kind == "regex" else "choice": source}}
        if kind == "regex" and caps.constraints == "regex":
            return {"regex": source}
        if kind == "choices" and caps.constraints == "gbnf":  # llama.cpp's `grammar` field
            return {"grammar": "root ::= " + " | ".join(json.dumps(c) for c in source)}
        raise ValueError(caps.lacks(f"no documented way to enforce {self.spec.label}"))

    def finish(self, completion: Completion) -> Any:
        """Parse the finished text (``StructuredOutputError`` when it does not parse or was cut short)."""
        reason = completion.finish_reason
        text = completion.text
        try:
            value = self.spec.parse(text)
        except ValueError as e:
            hint = " (raise max_tokens)" if reason == "length" else ""
            raise StructuredOutputError(
                f"output for {self.spec.label} does not parse{hint}: {str(e)[:120]}", text, reason
            ) from None
        if self.spec.kind == "choices" and value not in self.spec.source:
            raise StructuredOutputError(f"output {text!r} is not one of {self.spec.label}", text, reason)
        if self.spec.kind == "json" and not isinstance(value, dict):
            raise StructuredOutputError(f"output is not a JSON object: {json.dumps(value)[:80]}", text, reason)
        return value

    def __repr__(self) -> str:
        return f"ServerConstraint({self.spec.label})"
