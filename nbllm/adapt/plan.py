"""A fine-tuning run checked before it starts: every argument and record, with nothing written yet."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import Examples, as_examples

__all__ = ["Plan", "plan_training", "knobs"]


_KNOBS = [
    "steps",
    "learning_rate",
    "rank",
    "layers",
    "batch_size",
    "validation",
    "seed",
    "dora",
    "scale",
    "dropout",
    "mask_prompt",
    "eval_every",
    "save_every",
    "adapter_path",
]


def knobs(args: dict[str, Any]) -> dict[str, Any]:
    return {k: args[k] for k in _KNOBS}


@dataclass(frozen=True)
class Plan:
    """A checked training run, ready to start (nothing written yet)."""

    lm: Any
    train: Examples
    validation: Examples | None
    steps: int
    learning_rate: float
    lora: dict[str, Any]
    layers: int
    batch_size: int
    seed: int
    dora: bool
    mask_prompt: bool
    eval_every: int
    save_every: int
    folder: Path | None
    max_seq_length: int


def plan_training(
    lm: Any,
    data: Any,
    *,
    steps: int,
    learning_rate: float,
    rank: int,
    layers: int | None,
    batch_size: int | None,
    validation: Any,
    seed: int,
    dora: bool,
    scale: float,
    dropout: float,
    mask_prompt: bool,
    eval_every: int | None,
    save_every: int,
    adapter_path: str | os.PathLike[str] | None,
) -> Plan:
    """Check every argument and record (see ``finetune``); raises before anything is written."""
    from ..inside.run import needs_local

    needs_local(lm, "finetune")
    if getattr(lm, "is_vision", False):
        raise ValueError(f"finetune: expected a text model, got the vision model {lm.name!r}")
    if getattr(lm, "adapter_path", None) is not None:
        raise ValueError(f"finetune: {lm.name!r} already has adapters; fuse() it first or train its base")
    n_layers = len(lm.model.layers)
    _int("steps", steps, 1, 1_000_000)
    _int("rank", rank, 1, 4096)
    _int("seed", seed, 0, 2**32 - 1)
    _int("save_every", save_every, 1, 1_000_000)
    if layers is not None:
        _int("layers", layers, 1, n_layers)
    for name, value in (("learning_rate", learning_rate), ("scale", scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    template = bool(getattr(lm.tokenizer, "has_chat_template", False))
    train_set = as_examples(data, "data", chat_template=template)
    val_set = None if validation is None else as_examples(validation, "validation", chat_template=template)
    if batch_size is None:
        batch_size = min(4, len(train_set), *([len(val_set)] if val_set is not None else []))
    _int("batch_size", batch_size, 1, len(train_set))
    if val_set is not None and len(val_set) < batch_size:
        raise ValueError(f"validation: expected at least batch_size={batch_size} examples, got {len(val_set)}")
    if eval_every is not None:
        _int("eval_every", eval_every, 1, 1_000_000)
    context = lm.context_length or 2048
    for examples in (train_set, val_set):
        if examples is None:
            continue
        for i, n in enumerate(examples.token_counts(lm.tokenizer)):
            if n > context:
                raise ValueError(f"{examples.where}[{i}]: {n} tokens, longer than the model's context of {context}")
    folder = None if adapter_path is None else Path(adapter_path).expanduser()
    if folder is not None and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"adapter_path: {folder} exists and is not an empty folder; expected a new folder")
    return Plan(
        lm=lm,
        train=train_set,
        validation=val_set,
        steps=steps,
        learning_rate=float(learning_rate),
        lora={"rank": rank, "scale": float(scale), "dropout": float(dropout)},
        layers=layers or n_layers,
        batch_size=batch_size,
        seed=seed,
        dora=dora,
        mask_prompt=mask_prompt,
        eval_every=eval_every or max(1, steps // 10),
        save_every=save_every,
        folder=folder,
        max_seq_length=context,
    )


def _int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {value!r}")
