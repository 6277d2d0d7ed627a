"""The magics' registry: the models a notebook has loaded, the one selected, and its conversation.

Changes happen only once they succeed: a load that fails registers nothing,
and the selection moves only to a model that is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

__all__ = ["Registry"]


class Registry:
    """Loaded models by name, the selected one, and the notebook's ``Chat``."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.current: str | None = None
        self.chat: Any = None

    def add(self, lm: Any, alias: str | None = None) -> Any:
        """Register a loaded model (under ``alias`` or its name) and return it."""
        self.models[alias or lm.name] = lm
        return lm

    def get(self, name: str | None) -> Any:
        """A loaded model by name; a one-line error naming the loaded ones otherwise."""
        if name is None or name not in self.models:
            loaded = ", ".join(self.models) or "none"
            raise UsageError(f"expected the name of a loaded model ({loaded}), got {name!r}; use %llm load PATH")
        return self.models[name]

    def select(self, name: str) -> None:
        self.get(name)
        self.current = name

    def unload(self, name: str | None) -> None:
        self.get(name)
        del self.models[name]  # type: ignore[arg-type]
        self.current = None if self.current == name else self.current

    def model(self, name: str | None, load: Callable[[str | None], Any], default: str | None) -> Any:
        """The model for a cell: ``name`` (loaded now if it is not), else the selected one, else ``default``."""
        if name:
            # a server is registered under its URL, so the next cell with the same -m URL finds it
            alias = name if name.startswith(("http://", "https://")) else None
            return self.models[name] if name in self.models else self.add(load(name), alias)
        if self.current is None:
            lm = self.add(load(default))
            self.current = lm.name
        return self.models[self.current]

    def conversation(self, lm: Any, system: str | None) -> Any:
        """The notebook's chat with ``lm`` (started on first use; a new system message applies to later turns)."""
        from .chat import Chat

        if self.chat is not None and self.chat.lm is not lm:
            raise UsageError(
                f"--chat: the conversation uses {self.chat.lm.name}; run %llm reset to start one with {lm.name}"
            )
        if self.chat is None:
            self.chat = Chat(lm, system=system)
        elif system is not None and system != self.chat.system:
            self.chat.system = system
        return self.chat
