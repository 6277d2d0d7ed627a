"""Pure render functions for training: the loss curves as SVG (for the live view) or a matplotlib ``Figure``."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["losses_svg", "losses_figure", "training_line"]

_TRAIN, _VAL = "#1f77b4", "#d62728"


def losses_svg(
    train: Sequence[tuple[int, float]],
    validation: Sequence[tuple[int, float]],
    steps: int,
    *,
    width: int = 420,
    height: int = 180,
) -> str:
    """Training (blue line) and validation (red dots and line) loss against the step, on one axis."""
    pad_l, pad_r, pad_t, pad_b = 42, 10, 10, 24
    values = [v for _, v in train] + [v for _, v in validation]
    top = max(values) if values else 1.0
    top = top * 1.05 if top > 0 else 1.0
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def xy(step: int, loss: float) -> str:
        x = pad_l + w * step / max(steps, 1)
        y = pad_t + h * (1 - min(max(loss, 0.0), top) / top)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f"<svg class='nbllm-losses' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        "xmlns='http://www.w3.org/2000/svg' font-size='10' font-family='sans-serif'>",
        f"<line x1='{pad_l}' y1='{pad_t + h}' x2='{pad_l + w}' y2='{pad_t + h}' stroke='#999'/>",
        f"<line x1='{pad_l}' y1='{pad_t}' x2='{pad_l}' y2='{pad_t + h}' stroke='#999'/>",
        f"<text x='{pad_l - 4}' y='{pad_t + 8}' text-anchor='end'>{top:.2f}</text>",
        f"<text x='{pad_l - 4}' y='{pad_t + h}' text-anchor='end'>0</text>",
        f"<text x='{pad_l + w}' y='{height - 6}' text-anchor='end'>step {steps}</text>",
        f"<text x='{pad_l}' y='{height - 6}'>0</text>",
    ]
    if len(train) > 1:
        points = " ".join(xy(s, v) for s, v in train)
        parts.append(f"<polyline fill='none' stroke='{_TRAIN}' stroke-width='1.5' points='{points}'/>")
    if validation:
        if len(validation) > 1:
            points = " ".join(xy(s, v) for s, v in validation)
            parts.append(f"<polyline fill='none' stroke='{_VAL}' stroke-dasharray='4 2' points='{points}'/>")
        for s, v in validation:
            x, y = xy(s, v).split(",")
            parts.append(f"<circle cx='{x}' cy='{y}' r='2.5' fill='{_VAL}'><title>step {s}: {v:.3f}</title></circle>")
    parts.append(
        f"<text x='{pad_l + 6}' y='{pad_t + 12}' fill='{_TRAIN}'>train</text>"
        f"<text x='{pad_l + 40}' y='{pad_t + 12}' fill='{_VAL}'>validation</text></svg>"
    )
    return "".join(parts)


def training_line(
    step: int, steps: int, train_loss: float | None, val_loss: float | None, tps: float, state: str
) -> str:
    """One status line: step, losses, tokens/s, state."""
    bits = [f"step {step}/{steps}"]
    if train_loss is not None:
        bits.append(f"train loss {train_loss:.3f}")
    if val_loss is not None:
        bits.append(f"val loss {val_loss:.3f}")
    bits.append(f"{tps:,.0f} tok/s")
    bits.append(state)
    return f"<span class='nbllm-foot'>{html.escape(' · '.join(bits))}</span>"


def losses_figure(
    train: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]], *, title: str | None = None
) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", color=_TRAIN)
    if validation:
        ax.plot(*zip(*validation), marker="o", linestyle="--", label="validation", color=_VAL)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
