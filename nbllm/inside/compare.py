"""Comparison: the same prompt under two models or two settings (or two prompts), side by side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..tokens import Token
from .run import forward, needs_local

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

__all__ = ["Comparison", "compare"]


@dataclass(frozen=True, eq=False)
class Comparison:
    """Two generations and how each side sees the other's tokens.

    Attributes:
        labels: A name for each side.
        a: Side a's tokens; b: side b's.
        a_under_b: ``[len(a)]``: probability of each of a's tokens under side b, given a's text so far.
        b_under_a: ``[len(b)]``: the same for b's tokens under side a.
        kl: ``[len(a)]``: KL divergence, in nats, from side a's distribution to side b's at each of a's positions.
        divergence: The first position where the two outputs differ (``None``: identical).
    """

    labels: tuple[str, str]
    a: tuple[Token, ...]
    b: tuple[Token, ...]
    a_under_b: np.ndarray
    b_under_a: np.ndarray
    kl: np.ndarray
    divergence: int | None

    def figure(self) -> Figure:
        """KL along side a, with the first difference marked."""
        from ..render_inside import compare_figure

        return compare_figure(self)


def compare(a: Any, b: Any, prompt: Any, *, prompt_b: Any = None, max_tokens: int = 32, **settings: Any) -> Comparison:
    """Generate from two sides and compare them token by token.

    Args:
        a: A model, or ``(model, {settings})`` for this side's own settings.
        b: The same for the other side (the same model with other settings,
            or another model with the same tokenizer).
        prompt: The prompt (text, messages or ids; chat template as for ``stream``).
        prompt_b: Another prompt for side b (default: the same).
        max_tokens: Tokens each side generates.
        **settings: Settings both sides share (``raw=``, ``system=``, sampling ...).

    Each side's distribution is its model's (after its ``temperature`` when it
    samples); other filters are left out, or the two would often have no token
    in common and the KL would be infinite.

    Returns:
        A ``Comparison``.
    """
    import numpy as np

    (lm_a, own_a), (lm_b, own_b) = _side(a), _side(b)
    for lm in (lm_a, lm_b):
        needs_local(lm, "comparing two runs")
    if lm_a is not lm_b and (
        lm_a.vocab_size != lm_b.vocab_size
        or lm_a.encode("A test, 42!", raw=True).ids != lm_b.encode("A test, 42!", raw=True).ids
    ):
        raise ValueError("compare: expected two models that share a tokenizer (their token ids must mean the same)")
    sa, sb = {**settings, **own_a}, {**settings, **own_b}
    pa = lm_a.encode(prompt, **_encode_args(sa))
    pb = lm_b.encode(prompt if prompt_b is None else prompt_b, **_encode_args(sb))
    ta = tuple(lm_a.stream(pa, max_tokens=max_tokens, top_logprobs=1, **_run_args(sa)))
    tb = tuple(lm_b.stream(pb, max_tokens=max_tokens, top_logprobs=1, **_run_args(sb)))
    ids_a, ids_b = [t.id for t in ta], [t.id for t in tb]
    la_on_a = _along(lm_a, pa, ids_a, sa)  # side a's distributions at a's positions
    lb_on_a = _along(lm_b, pb, ids_a, sb)
    la_on_b = _along(lm_a, pa, ids_b, sa)
    rows_a = np.arange(len(ids_a))
    kl = (np.exp(la_on_a) * (la_on_a - lb_on_a)).sum(axis=-1) if len(ids_a) else np.zeros(0)
    divergence = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), None)
    if divergence is None and len(ids_a) != len(ids_b):
        divergence = min(len(ids_a), len(ids_b))
    return Comparison(
        labels=(_label(lm_a, own_a), _label(lm_b, own_b)),
        a=ta,
        b=tb,
        a_under_b=np.exp(lb_on_a[rows_a, ids_a]) if len(ids_a) else np.zeros(0),
        b_under_a=np.exp(la_on_b[np.arange(len(ids_b)), ids_b]) if len(ids_b) else np.zeros(0),
        kl=np.maximum(kl, 0.0),
        divergence=divergence,
    )


def _side(side: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(side, tuple):
        if len(side) != 2 or not isinstance(side[1], dict):
            raise TypeError("compare: a side is a model or a (model, {settings}) pair")
        return side[0], dict(side[1])
    return side, {}


def _encode_args(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in ("raw", "system", "images") if k in settings}


def _run_args(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in ("raw", "system", "images")}


def _label(lm: Any, own: dict[str, Any]) -> str:
    return lm.name + (" " + ", ".join(f"{k}={v}" for k, v in own.items()) if own else "")


def _along(lm: Any, prompt: Any, ids: list[int], settings: dict[str, Any]) -> np.ndarray:
    """Log-distributions ``[len(ids), vocab]`` of one side at each position of ``ids`` after ``prompt`` (teacher forcing)."""
    import numpy as np

    if not ids:
        return np.zeros((0, lm.vocab_size), dtype=np.float32)
    logits = forward(lm, lm.encode(list(prompt.ids) + ids[:-1]))[len(prompt) - 1 :].astype(mx.float32)
    temperature = float(settings.get("temperature") or 0.0)
    if temperature > 0:
        logits = logits / temperature
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(lp)
