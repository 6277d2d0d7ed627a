"""Pure render functions: token records and distributions to HTML, text or a matplotlib ``Figure``.

Nothing here displays anything, computes a distribution or calls a model. Widgets, magics and the
``_repr_html_`` fallbacks all draw through these functions, so a notebook
viewed without a widget frontend (nbconvert, GitHub) shows the same picture.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .filters import Shaped
from .tokens import Token

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "STYLE",
    "prob_color",
    "token_span",
    "tokens_html",
    "tokens_table",
    "alternatives_text",
    "distribution_html",
    "distribution_figure",
    "messages_html",
    "prompt_html",
]

# Scoped to .nbllm so it cannot restyle the rest of the page. The popup is
# pure CSS (hover or focus after a click), so it works without JavaScript.
STYLE = """<style>
.nbllm{font-family:var(--jp-code-font-family,monospace);font-size:13px;line-height:1.7;white-space:pre-wrap;word-break:break-word}
.nbllm .t{position:relative;border-radius:2px;color:#111}
.nbllm .t.b{outline:1px solid #9996;margin:0 1px}
.nbllm .t.f{border-bottom:2px dashed #7a3cc2}
.nbllm .t.s{color:#888;font-size:smaller}
.nbllm .t.d{text-decoration:underline dotted #15803d 2px}
.nbllm .t.r{text-decoration:underline wavy #c2410c 1px}
.nbllm .t[data-a]:hover::after,.nbllm .t[data-a]:focus::after{content:attr(data-a);position:absolute;left:0;top:1.6em;z-index:20;
 background:#222;color:#eee;padding:4px 6px;border-radius:4px;white-space:pre;font-size:12px;line-height:1.4;pointer-events:none}
.nbllm-dist td{padding:1px 6px;font-family:var(--jp-code-font-family,monospace);font-size:12px;white-space:pre}
.nbllm-dist .bar{display:inline-block;height:9px;vertical-align:middle}
.nbllm-dist tr.cut td{color:#999}
.nbllm-msg{margin:4px 0;padding:6px 10px;border-radius:8px;white-space:pre-wrap;overflow-wrap:anywhere;max-width:90%}
.nbllm-msg.user{background:#e3f0ff;color:#111;margin-left:auto}
.nbllm-msg.assistant{background:#f1f1f1;color:#111}
.nbllm-msg.system{background:#fff7d6;color:#555;font-size:smaller}
.nbllm-foot{color:#888;font-size:12px}
</style>"""


def prob_color(p: float) -> str:
    """Background colour for a probability: red (unlikely) to green (likely).

    Args:
        p: A probability in [0, 1] (clipped).

    Returns:
        A CSS ``hsl(...)`` colour.
    """
    p = min(max(float(p), 0.0), 1.0)
    return f"hsl({120 * p:.0f},80%,{78 + 8 * p:.0f}%)"


def _piece(text: str) -> str:
    return repr(text)


def _visible(text: str) -> str:
    # With boundaries on, show what an empty-looking token holds.
    return "".join("↵\n" if ch == "\n" else ch if ch.isprintable() or ch in "\t " else repr(ch)[1:-1] for ch in text)


def alternatives_text(token: Token, k: int = 10) -> str:
    """The token's top alternatives as lines ``'piece'  p%`` (the chosen one marked)."""
    lines = [f"{token.prob:6.1%} chosen {_piece(token.piece)}" + (" · forced" if token.forced else "")]
    if token.masked_prob is not None:
        lines.append(f"constraint removed {token.masked_prob:.1%} of the model's probability")
    if token.from_draft:
        lines.append("proposed by the draft model, kept by the model")
    elif token.accepted is False:
        lines.append("the model's own: it refused the draft's proposal here")
    for alt in token.top[:k]:
        mark = "▸" if alt.id == token.id else " "
        sampled = f"  (sampler {alt.sampled_prob:.1%})" if alt.sampled_prob is not None else ""
        lines.append(f"{mark}{alt.prob:6.1%} {_piece(alt.piece)}{sampled}")
    return "\n".join(lines)


def token_span(token: Token, *, colored: bool = True, boundaries: bool = False, tooltips: str = "css") -> str:
    """One token as an HTML ``<span>``.

    Args:
        token: The token record.
        colored: Background coloured by the token's probability.
        boundaries: Outline each token so boundaries show.
        tooltips: ``"css"`` (popup on hover/click, needs ``STYLE``),
            ``"title"`` (browser tooltip; survives sanitizers), or ``"none"``.

    Returns:
        HTML text.
    """
    text = _visible(token.text) if boundaries else token.text
    if boundaries and not text and not token.special:
        text = token.piece  # a partial character: show its bytes so the token is not invisible
    if token.special:
        text = text + f"⟨{token.piece or 'eos'}⟩" if boundaries or colored else text
    cls = "t" + (" b" if boundaries else "") + (" f" if token.forced else "") + (" s" if token.special else "")
    cls += " d" if token.from_draft else (" r" if token.accepted is False else "")
    attrs = f' class="{cls}"'
    if colored:
        attrs += f' style="background:{prob_color(token.prob)}"'
    if tooltips != "none" and (colored or boundaries or token.top):
        tip = html.escape(alternatives_text(token), quote=True).replace("\n", "&#10;")
        attrs += f' tabindex="0" data-a="{tip}"' if tooltips == "css" else f' title="{tip}"'
    return f"<span{attrs}>{html.escape(text)}</span>"


def tokens_html(
    tokens: Iterable[Token],
    *,
    colored: bool = True,
    boundaries: bool = False,
    tooltips: str = "css",
    footer: str = "",
    style: bool = True,
) -> str:
    """A block of tokens (see ``token_span``) with an optional footer line.

    Returns:
        HTML text, with the ``<style>`` block unless ``style=False``.
    """
    body = "".join(token_span(t, colored=colored, boundaries=boundaries, tooltips=tooltips) for t in tokens)
    foot = f"<div class='nbllm-foot'>{html.escape(footer)}</div>" if footer else ""
    return (STYLE if style else "") + f"<div class='nbllm nbllm-stream'>{body}</div>{foot}"


def tokens_table(tokens: Iterable[Token], k: int = 3) -> str:
    """Plain-text table: index, probability, the token, its top ``k`` alternatives (for terminals)."""
    lines = []
    for t in tokens:
        alts = "  ".join(f"{a.piece!r} {a.prob:.2f}" for a in t.top[:k] if a.id != t.id)
        flags = (" forced" if t.forced else "") + (" <eos>" if t.special else "")
        lines.append(f"{t.index:>4} {t.prob:7.2%} {t.piece!r:<16} {alts}{flags}")
    return "\n".join(lines)


def prompt_html(kind: str, text: str) -> str:
    """How a prompt reached the model: a one-line label, the rendered text behind a click."""
    return (
        "<details class='nbllm-prompt'><summary style='color:#888;font-size:12px;cursor:pointer'>"
        f"prompt: {html.escape(kind)}</summary>"
        f"<pre style='white-space:pre-wrap;font-size:12px;margin:2px 0'>{html.escape(text)}</pre></details>"
    )


# -- distributions ----------------------------------------------------------
def distribution_html(shaped: Shaped, *, chosen: int | None = None, style: bool = True) -> str:
    """A bar chart table: model probability (grey) and sampled probability (blue).

    Args:
        shaped: From ``shape_distribution``.
        chosen: A token id to mark (e.g. the one just taken).
        style: Include the ``<style>`` block.

    Returns:
        HTML text.
    """
    peak = max(shaped.model_probs + shaped.sampled_probs + (1e-9,))
    rows = []
    for i, lab, pm, ps, cut in zip(shaped.ids, shaped.labels, shaped.model_probs, shaped.sampled_probs, shaped.cut_by):
        rows.append(_dist_row(_piece(lab) + (" ◂" if i == chosen else ""), pm, ps, cut, peak, cut != ""))
    rest_n = shaped.vocab_size - len(shaped.ids)
    rest_label = f"rest ({rest_n} tokens)"
    if shaped.known is not None:
        hidden = shaped.known - len(shaped.ids)
        rest_label = f"rest ({hidden} known, the others unknown)" if hidden else "rest (unknown tokens)"
    rows.append(_dist_row(rest_label, shaped.rest_model, shaped.rest_sampled, "", peak, False, "rest"))
    head = "<tr><td><b>token</b></td><td><b>model</b></td><td><b>sampled</b></td><td></td></tr>"
    caption = f"{shaped.survivors} of {shaped.vocab_size} tokens can be sampled"
    if shaped.known is not None:
        caption = known_caption(shaped)
    table = f"<table class='nbllm-dist'><caption style='text-align:left;color:#666'>{caption}</caption>{head}{''.join(rows)}</table>"
    return (STYLE if style else "") + table


def known_caption(shaped: Shaped) -> str:
    """What a top-k-only chart can say: the known tokens, and the rest as unknown but bounded."""
    return (
        f"only the server's top {shaped.known} tokens are known; the rest ({shaped.rest_model:.1%} of the model's "
        "probability) is unknown, each of its tokens at most as likely as the last known one: the sliders reshape "
        "the known tokens, and the rest's sampled share assumes that worst case"
    )


def _dist_row(label: str, pm: float, ps: float, cut: str, peak: float, is_cut: bool, cls: str = "") -> str:
    def bar(p: float, colour: str) -> str:
        width = 0 if p <= 0 else max(1, round(120 * p / peak))
        return f"<span class='bar' style='width:{width}px;background:{colour}'></span> {p:6.1%}"

    klass = " ".join(c for c in (cls, "cut" if is_cut else "") if c)
    tag = f"cut by {cut}" if cut else ""
    return (
        f"<tr class='{klass}' data-cut='{cut}'><td>{html.escape(label)}</td><td>{bar(pm, '#999')}</td>"
        f"<td>{bar(ps, '#3b82f6')}</td><td>{tag}</td></tr>"
    )


def distribution_figure(shaped: Shaped, *, title: str | None = None) -> Figure:
    """The same chart as a matplotlib ``Figure`` (no pyplot global state).

    Args:
        shaped: From ``shape_distribution``.
        title: Figure title.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure

    labels = [_piece(lab) for lab in shaped.labels] + ["rest"]
    model = list(shaped.model_probs) + [shaped.rest_model]
    sampled = list(shaped.sampled_probs) + [shaped.rest_sampled]
    fig = Figure(figsize=(6, 0.3 * len(labels) + 1))
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    ax.barh(y - 0.2, model, height=0.4, color="#999", label="model")
    ax.barh(y + 0.2, sampled, height=0.4, color="#3b82f6", label="sampled")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    ax.legend(loc="lower right")
    ax.set_title(title or f"{shaped.survivors} of {shaped.vocab_size} tokens survive the filters")
    fig.tight_layout()
    return fig


# -- chat -------------------------------------------------------------------
def messages_html(messages: Sequence[dict[str, Any]], *, pending: str | None = None, style: bool = True) -> str:
    """Chat messages as bubbles; ``pending`` is a reply still streaming.

    Args:
        messages: ``{"role", "content"}`` dicts (content may be a string or a
            list of parts with ``{"type": "text", "text": ...}``).
        pending: Partial assistant text to show last.

    Returns:
        HTML text.
    """
    out = []
    for m in messages:
        role = str(m.get("role", "user"))
        out.append(f"<div class='nbllm-msg {html.escape(role)}'>{html.escape(_content_text(m.get('content')))}</div>")
    if pending is not None:
        out.append(f"<div class='nbllm-msg assistant pending'>{html.escape(pending)}▍</div>")
    return (
        (STYLE if style else "")
        + "<div class='nbllm-chat' style='display:flex;flex-direction:column'>"
        + "".join(out)
        + "</div>"
    )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(
                    str(part.get("text", "")) if part.get("type", "text") == "text" else f"[{part.get('type')}]"
                )
            else:
                parts.append(str(part))
        return "".join(parts)
    return "" if content is None else str(content)
