"""Pure render functions for the inside-the-model records: lens, attention, surprise, comparison.

HTML for the live views (hover a cell for its tokens) and matplotlib
``Figure`` objects for static reports. Nothing here computes a model output.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .render import STYLE, alternatives_text, prob_color

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "lens_html",
    "lens_figure",
    "attention_html",
    "attention_figure",
    "surprise_html",
    "surprise_figure",
    "compare_html",
    "compare_figure",
]

_CELL = (
    "padding:1px 3px;font-size:11px;font-family:var(--jp-code-font-family,monospace);white-space:pre;text-align:center"
)


def _short(piece: str, n: int = 8) -> str:
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in piece.replace("\n", "↵"))
    return text if len(text) <= n else text[: n - 1] + "…"


def _entropy_color(h: float, top: float) -> str:
    share = 0.0 if top <= 0 else min(max(h / top, 0.0), 1.0)
    return prob_color(1.0 - share)


def lens_html(lens: Any, by: str = "prob") -> str:
    """Layers (rows, last on top) by positions (columns); each cell shows its top token, coloured by ``by``."""
    if by not in ("prob", "entropy"):
        raise ValueError(f"by: expected 'prob' or 'entropy', got {by!r}")
    top_h = math.log(max(lens.top_ids.shape[-1], 2)) if by == "entropy" else 0.0
    top_h = max(top_h, float(lens.entropy.max()) if lens.entropy.size else 1.0)
    head = "".join(f"<th style='{_CELL}'>{html.escape(_short(t))}</th>" for t in lens.tokens)
    rows = []
    for layer in reversed(range(lens.n_layers)):
        cells = []
        for pos in range(len(lens.tokens)):
            p, h = float(lens.final_prob[layer, pos]), float(lens.entropy[layer, pos])
            colour = prob_color(p) if by == "prob" else _entropy_color(h, top_h)
            tip = "\n".join(f"{a.prob:6.1%} {a.piece!r}" for a in lens.top(layer, pos))
            tip += f"\nfinal token {lens.label(int(lens.predicted[pos]))!r}: {p:.1%} (rank {int(lens.final_rank[layer, pos])})"
            tip += f"\nentropy {h:.2f} nats"
            top1 = lens.label(int(lens.top_ids[layer, pos, 0]))
            cells.append(
                f"<td class='lens-cell' style='{_CELL};background:{colour}' title='{html.escape(tip, quote=True)}'>"
                f"{html.escape(_short(top1))}</td>"
            )
        name = "output" if layer == lens.n_layers - 1 else f"layer {layer}"
        rows.append(f"<tr><th style='{_CELL};text-align:right'>{name}</th>{''.join(cells)}</tr>")
    caption = (
        "colour: probability of the token the full model predicts"
        if by == "prob"
        else "colour: entropy (green = sure, red = unsure)"
    )
    return (
        f"{STYLE}<table class='nbllm-lens' style='border-collapse:collapse'><caption style='text-align:left;color:#666'>"
        f"{caption}</caption><tr><th></th>{head}</tr>{''.join(rows)}</table>"
    )


def lens_figure(lens: Any, by: str = "prob") -> Figure:
    from matplotlib.figure import Figure

    data = lens.final_prob if by == "prob" else lens.entropy
    fig = Figure(figsize=(max(4, 0.55 * len(lens.tokens)), 0.45 * lens.n_layers + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", origin="lower", cmap="RdYlGn" if by == "prob" else "RdYlGn_r")
    ax.set_xticks(range(len(lens.tokens)), [_short(t) for t in lens.tokens], rotation=60, fontsize=8)
    ax.set_yticks(range(lens.n_layers), [f"{i}" for i in range(lens.n_layers)])
    ax.set_ylabel("layer")
    for layer in range(lens.n_layers):
        for pos in range(len(lens.tokens)):
            ax.text(
                pos,
                layer,
                _short(lens.label(int(lens.top_ids[layer, pos, 0])), 5),
                ha="center",
                va="center",
                fontsize=6,
            )
    fig.colorbar(image, ax=ax, label="P(final token)" if by == "prob" else "entropy (nats)")
    fig.tight_layout()
    return fig


def _attention_matrix(amap: Any, layer: int, head: int | None, how: str) -> np.ndarray:
    return amap.weights(layer)[head] if head is not None else amap.aggregate(layer, how)


def attention_html(amap: Any, layer: int = -1, head: int | None = None, how: str = "mean", lines: float = 0.1) -> str:
    """A heatmap of one head (or the heads' mean/max), and token-to-token lines for weights above ``lines``."""
    w = _attention_matrix(amap, layer, head, how)
    n = len(amap.tokens)
    head_row = "".join(f"<th style='{_CELL}'>{html.escape(_short(t))}</th>" for t in amap.tokens)
    rows = []
    for q in range(n):
        cells = "".join(
            f"<td style='{_CELL};background:rgba(59,130,246,{min(float(w[q, k]) * 1.5, 1):.3f})' "
            f"title='{html.escape(repr(amap.tokens[q]))} → {html.escape(repr(amap.tokens[k]))}: {float(w[q, k]):.3f}'></td>"
            for k in range(n)
        )
        rows.append(f"<tr><th style='{_CELL};text-align:right'>{html.escape(_short(amap.tokens[q]))}</th>{cells}</tr>")
    table = f"<table class='nbllm-attention' style='border-collapse:collapse'><tr><th></th>{head_row}</tr>{''.join(rows)}</table>"
    return STYLE + table + _attention_lines(amap.tokens, w, lines)


def _attention_lines(tokens: tuple[str, ...], w: np.ndarray, threshold: float) -> str:
    n, step, height = len(tokens), 64, 120
    width = max(step * n, 200)
    parts = [f"<svg class='nbllm-attention-lines' width='{width}' height='{height + 30}' style='font-size:11px'>"]
    for q in range(n):
        for k in range(n):
            if w[q, k] >= threshold:
                parts.append(
                    f"<line x1='{q * step + step / 2}' y1='18' x2='{k * step + step / 2}' y2='{height}' "
                    f"stroke='#3b82f6' stroke-opacity='{min(float(w[q, k]), 1):.2f}' stroke-width='2'/>"
                )
    for i, t in enumerate(tokens):
        label = html.escape(_short(t))
        parts.append(f"<text x='{i * step + step / 2}' y='12' text-anchor='middle'>{label}</text>")
        parts.append(f"<text x='{i * step + step / 2}' y='{height + 14}' text-anchor='middle'>{label}</text>")
    return "".join(parts) + "</svg>"


def attention_figure(amap: Any, layer: int = -1, head: int | None = None, how: str = "mean") -> Figure:
    from matplotlib.figure import Figure

    w = _attention_matrix(amap, layer, head, how)
    n = len(amap.tokens)
    fig = Figure(figsize=(max(4, 0.45 * n) + 1, max(3.5, 0.45 * n)))
    ax = fig.add_subplot()
    image = ax.imshow(w, cmap="Blues", vmin=0.0, vmax=max(float(w.max()), 1e-9))
    labels = [_short(t) for t in amap.tokens]
    ax.set_xticks(range(n), labels, rotation=60, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("attends to")
    ax.set_ylabel("position")
    what = f"head {head}" if head is not None else f"{how} over {amap.n_heads} heads"
    ax.set_title(f"layer {layer if layer >= 0 else amap.n_layers + layer}, {what}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def surprise_html(scored: Any) -> str:
    """The scored text, each token coloured by its probability (red = surprising), alternatives on hover."""
    spans = []
    for t in scored.tokens:
        tip = alternatives_text(t) + f"\nrank {t.rank} · entropy {t.entropy:.2f} nats"
        spans.append(
            f"<span class='t' tabindex='0' style='background:{prob_color(t.prob)}' "
            f"data-a='{html.escape(tip, quote=True)}'>{html.escape(t.text)}</span>"
        )
    foot = f"<div class='nbllm-foot'>{len(scored.tokens)} tokens · perplexity {scored.perplexity:.2f}</div>"
    return f"{STYLE}<div class='nbllm nbllm-surprise'>{''.join(spans)}</div>{foot}"


def surprise_figure(scored: Any) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5, 0.3 * len(scored.tokens)), 3))
    ax = fig.add_subplot()
    ax.plot([-t.logprob for t in scored.tokens], marker="o", markersize=3)
    ax.set_xticks(range(len(scored.tokens)), [_short(t.piece, 6) for t in scored.tokens], rotation=70, fontsize=7)
    ax.set_ylabel("surprise (−log p, nats)")
    ax.set_title(f"perplexity {scored.perplexity:.2f}")
    fig.tight_layout()
    return fig


def compare_html(cmp: Any) -> str:
    """Two columns of tokens; the first differing position marked; each token's probability under the other side."""

    def column(tokens: Any, under_other: Any, label: str) -> str:
        spans = []
        for i, (t, p) in enumerate(zip(tokens, under_other)):
            mark = " outline:2px solid #c00;" if cmp.divergence is not None and i == cmp.divergence else ""
            tip = f"{t.piece!r}: {t.prob:.1%} here, {p:.1%} under the other side"
            spans.append(
                f"<span class='t' style='background:{prob_color(p)};{mark}' title='{html.escape(tip, quote=True)}'>"
                f"{html.escape(t.text)}</span>"
            )
        return f"<div style='flex:1;padding:4px'><b>{html.escape(label)}</b><div class='nbllm'>{''.join(spans)}</div></div>"

    where = "no divergence" if cmp.divergence is None else f"diverges at token {cmp.divergence}"
    kl = f" · mean KL {float(np.mean(cmp.kl)):.3f} nats" if len(cmp.kl) else ""
    return (
        f"{STYLE}<div class='nbllm-compare' style='display:flex;gap:12px'>{column(cmp.a, cmp.a_under_b, cmp.labels[0])}"
        f"{column(cmp.b, cmp.b_under_a, cmp.labels[1])}</div><div class='nbllm-foot'>{where}{kl}"
        " · colour: probability of each token under the other side</div>"
    )


def compare_figure(cmp: Any) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.plot(cmp.kl, marker="o", markersize=3, label="KL(a ‖ b) along a")
    if cmp.divergence is not None:
        ax.axvline(cmp.divergence, color="#c00", linestyle="--", label="first difference")
    ax.set_xlabel("position")
    ax.set_ylabel("nats")
    ax.legend()
    fig.tight_layout()
    return fig
