"""Training data for ``finetune``: the shapes a user passes, checked record by record, as mlx-lm datasets.

mlx-lm's trainer reads three record formats (``{"text"}``, ``{"messages"}``,
``{"prompt", "completion"}``; see its LORA.md) and finds a bad record only when
it reaches it, deep in training. Here every record is checked before anything
runs, and the error names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..prompt import check_text

__all__ = ["Examples", "as_examples", "read_jsonl"]

_ROLES = ("system", "user", "assistant", "tool")
_FORMATS = {"text": "plain texts", "chat": "chat message lists", "completion": "prompt/completion pairs"}


@dataclass(frozen=True)
class Examples:
    """Checked training records in one of mlx-lm's formats.

    Attributes:
        records: Dicts as mlx-lm's datasets read them (``text``, ``messages`` or ``prompt``/``completion``).
        kind: ``"text"``, ``"chat"`` or ``"completion"``.
        where: What the records came from (for messages).
    """

    records: tuple[dict[str, Any], ...]
    kind: str
    where: str

    def __len__(self) -> int:
        return len(self.records)

    def dataset(self, tokenizer: Any, mask_prompt: bool) -> Any:
        """mlx-lm's dataset for these records (tokenized lazily, each once), as its trainer takes it."""
        import types

        from mlx_lm.tuner.datasets import CacheDataset, create_dataset

        config = types.SimpleNamespace(mask_prompt=mask_prompt and self.kind != "text")
        return CacheDataset(create_dataset([dict(r) for r in self.records], tokenizer, config))

    def token_counts(self, tokenizer: Any) -> list[int]:
        """Tokens per record, as the trainer will see them."""
        data = self.dataset(tokenizer, mask_prompt=False)
        return [len(data[i][0]) for i in range(len(data))]


def as_examples(data: Any, where: str, *, chat_template: bool) -> Examples:
    """Check ``data`` and turn it into ``Examples``.

    Args:
        data: A list of plain texts, of ``(prompt, completion)`` pairs, of chat
            message lists, or of mlx-lm records (``{"text"}``, ``{"messages"}``,
            ``{"prompt", "completion"}``); or the path of a ``.jsonl`` file of such records.
        where: The argument's name, for errors (``"data"``, ``"validation"``).
        chat_template: Whether the model has a chat template (chats and pairs need one).

    Raises:
        ValueError / TypeError: naming the first bad record, before anything runs.
    """
    if isinstance(data, (str, os.PathLike)) and (isinstance(data, os.PathLike) or data.endswith(".jsonl")):
        return as_examples(read_jsonl(Path(data)), f"{where} ({Path(data).name})", chat_template=chat_template)
    if isinstance(data, str) or not isinstance(data, (list, tuple)):
        raise TypeError(
            f"{where}: expected a list of texts, (prompt, completion) pairs or chat message lists, "
            f"or a .jsonl path, got {type(data).__name__}"
        )
    if not data:
        raise ValueError(f"{where}: expected at least one example, got an empty list")
    records: list[dict[str, Any]] = []
    kinds: list[str] = []
    for i, item in enumerate(data):
        kind, record = _record(item, f"{where}[{i}]")
        if kinds and kind != kinds[0]:
            raise ValueError(
                f"{where}[{i}]: expected {_FORMATS[kinds[0]]} like {where}[0], got one of {_FORMATS[kind]}; "
                "use one format per data set"
            )
        kinds.append(kind)
        records.append(record)
    if kinds[0] != "text" and not chat_template:
        raise ValueError(f"{where}: {_FORMATS[kinds[0]]} need a model with a chat template; pass plain texts instead")
    return Examples(tuple(records), kinds[0], where)


def read_jsonl(path: Path) -> list[Any]:
    """The records of a JSONL file (one JSON object a line; blank lines skipped), or a one-line error."""
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {n}: expected one JSON object, got invalid JSON ({err.msg})") from None
    return out


def _record(item: Any, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return "text", {"text": _text(item, where)}
    if isinstance(item, tuple) and len(item) == 2:
        return "completion", {"prompt": _text(item[0], f"{where}[0]"), "completion": _text(item[1], f"{where}[1]")}
    if isinstance(item, list):
        return "chat", {"messages": _messages(item, where)}
    if isinstance(item, dict):
        if "messages" in item:
            return "chat", {"messages": _messages(item["messages"], f"{where}['messages']")}
        if "prompt" in item or "completion" in item:
            return "completion", {
                "prompt": _text(item.get("prompt"), f"{where}['prompt']"),
                "completion": _text(item.get("completion"), f"{where}['completion']"),
            }
        if "text" in item:
            return "text", {"text": _text(item["text"], f"{where}['text']")}
        raise ValueError(
            f"{where}: expected a record with 'text', 'messages' or 'prompt' and 'completion', got keys {sorted(item)}"
        )
    raise TypeError(
        f"{where}: expected a text, a (prompt, completion) pair or a list of chat messages, got {type(item).__name__}"
    )


def _text(value: Any, where: str) -> str:
    if value is None:
        raise ValueError(f"{where}: expected a non-empty str, got nothing")
    check_text(value, where)
    if not value.strip():
        raise ValueError(f"{where}: expected a non-empty str, got {value!r}")
    return str(value)


def _messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            got = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise ValueError(f"{where}[{j}]: expected a message with role in {_ROLES}, got {got!r}")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"{where}[{j}]['content']")})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"{where}: expected the last message to be the assistant's reply (what to learn)")
    return out
