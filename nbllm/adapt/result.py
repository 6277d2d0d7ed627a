"""The records of a fine-tuning run: each step's ``Report``, the ``Losses`` history, and the ``FineTune`` result."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "Losses", "FineTune"]


@dataclass(frozen=True)
class Report:
    """One training step as mlx-lm's trainer reported it.

    Attributes:
        step: Steps done (1-based).
        steps: Steps asked for.
        train_loss: Mean training loss of this step's batch.
        val_loss: Validation loss measured before this step (``None`` when not measured).
        tokens_per_second: Training throughput over the step.
        learning_rate: The optimizer's rate.
    """

    step: int
    steps: int
    train_loss: float
    val_loss: float | None
    tokens_per_second: float
    learning_rate: float


@dataclass
class Losses:
    """Loss history: ``train`` is ``[(step, loss)]``; ``validation`` is ``[(steps done, loss)]``, from 0 (before
    training) to the last step (after it)."""

    train: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)

    def figure(self) -> Any:
        """Both curves against the step (a matplotlib ``Figure``)."""
        from ..render_training import losses_figure

        return losses_figure(self.train, self.validation)


class FineTune:
    """The result of ``finetune``: the adapter folder, the loss history and a handle with the adapters.

    Attributes:
        adapter_path: The adapter folder (mlx-lm's layout; ``nbllm.load(..., adapter_path=)`` and
            ``mlx_lm.load(..., adapter_path=)`` read it).
        losses: ``Losses`` so far.
        steps: Steps done; ``stopped``: ``None``, ``"stopped"`` (Stop / ``stop()``) or ``"interrupted"`` (Ctrl-C).
        tokens_per_second: Mean training throughput; ``seconds``: wall time of the training loop.
    """

    def __init__(self, base: Any, adapter_path: Path, steps: int):
        self.base = base
        self.adapter_path = adapter_path
        self.losses = Losses()
        self.steps = 0
        self.planned = steps
        self.stopped: str | None = None
        self.tokens_per_second = 0.0
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._lm: Any = None
        self.view: Any = None  # the live view showing this run, if any
        self._stop = threading.Event()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stop(self) -> None:
        """End training after the current step; the adapters so far are kept."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> FineTune:
        """Block until training ends (it runs in the background under a notebook's live view).

        Ctrl-C (the kernel's interrupt) while waiting stops training like ``stop()``.
        """
        try:
            self._done.wait(timeout)
        except KeyboardInterrupt:
            self.stop()
            self._done.wait()
        if self.error is not None:
            raise self.error
        return self

    @property
    def lm(self) -> Any:
        """A new handle: the base model with the trained adapters (waits for training to end)."""
        self.wait()
        return self._lm

    def __repr__(self) -> str:
        state = "running" if not self.done else (self.stopped or "done")
        last = self.losses.validation[-1][1] if self.losses.validation else None
        val = f", val loss {last:.3f}" if last is not None else ""
        return f"FineTune({self.steps}/{self.planned} steps, {state}{val}, {self.adapter_path})"
