"""The sampler's filters in numpy: the distribution mlx-lm's sampler actually draws from.

One implementation, used for each token's sampler probabilities and by the
distribution views. It follows ``mlx_lm.sample_utils.make_sampler`` exactly:
top-p, then min-p, then XTC, then top-k on the model's log-probabilities,
then temperature inside the categorical draw; temperature 0 is the argmax.
XTC fires at random (with ``xtc_probability``), so the distribution drawn
from is the mixture of the two cases, which is what is reported.

Everything runs on a float32 vector without sorting the whole vocabulary when
the nucleus is small, so it costs microseconds per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .distribution import as_numpy
from .sampling import SamplingParams

__all__ = ["Shaped", "branches", "sampled_probs", "sampled_distribution", "shape_distribution", "shape_known"]


def _deterministic(lp: np.ndarray, params: SamplingParams, cut: np.ndarray | None) -> np.ndarray:
    """Tokens kept by top-p and min-p (the filters before XTC)."""
    keep = np.isfinite(lp)
    if 0.0 < params.top_p < 1.0:
        keep = _apply(keep, lp >= _nucleus_threshold(lp, params.top_p), cut, "top-p")
    if params.min_p > 0.0:
        keep = _apply(keep, lp >= lp.max() + math.log(params.min_p), cut, "min-p")
    return keep


def _top_k(lp: np.ndarray, keep: np.ndarray, k: int, cut: np.ndarray | None) -> np.ndarray:
    if not 0 < k < lp.shape[-1] or int(keep.sum()) <= k:
        return keep
    top = np.zeros_like(keep)
    top[np.argpartition(-np.where(keep, lp, -np.inf), k - 1)[:k]] = True
    return _apply(keep, top, cut, "top-k")


def _xtc_removed(lp: np.ndarray, keep: np.ndarray, params: SamplingParams) -> np.ndarray:
    # mlx-lm: among tokens above the threshold, all but the least likely go.
    probs = np.zeros(lp.shape[-1], dtype=np.float64)
    x = lp[keep].astype(np.float64)
    probs[keep] = np.exp(x - x.max())
    probs /= probs.sum()
    above = probs > params.xtc_threshold
    removed = probs > (probs[above].min() if above.any() else np.inf)
    if params.xtc_special_tokens:
        removed[[t for t in params.xtc_special_tokens if t < removed.shape[0]]] = False
    return removed


def branches(lp: np.ndarray, params: SamplingParams, cut: np.ndarray | None = None) -> list[tuple[float, np.ndarray]]:
    """``[(weight, kept tokens), ...]``: the sets the sampler draws from and how often.

    One branch without XTC; two when XTC may fire (weights ``1 - p`` and ``p``).
    ``cut`` (an object array), when given, records which filter removed each
    token on the branch without XTC.
    """
    if params.greedy:
        hot = np.zeros(lp.shape[-1], dtype=bool)
        hot[int(np.argmax(lp))] = True
        if cut is not None:
            cut[np.isfinite(lp) & ~hot] = "greedy"
        return [(1.0, hot)]
    keep = _deterministic(lp, params, cut)
    plain = _top_k(lp, keep, params.top_k, cut)
    p = params.xtc_probability
    if p <= 0.0:
        return [(1.0, plain)]
    fired = _top_k(lp, keep & ~_xtc_removed(lp, keep, params), params.top_k, None)
    return [(1.0 - p, plain), (p, fired)] if p < 1.0 else [(1.0, fired)]


def _log_z(lp: np.ndarray, keep: np.ndarray, temperature: float) -> float:
    scaled = lp[keep].astype(np.float64) / temperature
    peak = scaled.max()
    return float(peak + math.log(np.exp(scaled - peak).sum()))


def sampled_probs(lp: np.ndarray, params: SamplingParams, ids: np.ndarray) -> np.ndarray:
    """Probabilities of ``ids`` under the distribution the sampler draws from.

    Args:
        lp: Model log-probabilities after logits processors, float32, shape ``(vocab,)``.
        params: The sampling settings.
        ids: Token ids to report.
    """
    out = np.zeros(len(ids), dtype=np.float64)
    for weight, keep in branches(lp, params):
        if params.greedy:
            out += weight * keep[ids]
            continue
        log_z = _log_z(lp, keep, params.temperature)
        out += weight * np.where(keep[ids], np.exp(lp[ids].astype(np.float64) / params.temperature - log_z), 0.0)
    return out


def sampled_distribution(lp: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The whole distribution the sampler draws from, float64, shape ``(vocab,)``."""
    return _mix(lp, params, branches(lp, params))


def _mix(lp: np.ndarray, params: SamplingParams, parts: list[tuple[float, np.ndarray]]) -> np.ndarray:
    out = np.zeros(lp.shape[-1], dtype=np.float64)
    for weight, keep in parts:
        if params.greedy:
            out += weight * keep
            continue
        x = lp[keep].astype(np.float64) / params.temperature
        e = np.exp(x - x.max())
        out[keep] += weight * e / e.sum()
    return out


def _apply(keep: np.ndarray, passes: np.ndarray, cut: np.ndarray | None, name: str) -> np.ndarray:
    if cut is not None:
        cut[keep & ~passes] = name
    return keep & passes


def _nucleus_threshold(lp: np.ndarray, top_p: float) -> float:
    """Smallest log-probability kept by mlx-lm's ``apply_top_p`` (the nucleus; ties at the cut stay)."""
    total = float(np.exp(lp.astype(np.float64)).sum())
    n = lp.shape[-1]
    for m in (256, n):  # a small head almost always holds the nucleus
        m = min(m, n)
        head = np.sort(lp[np.argpartition(-lp, m - 1)[:m]] if m < n else lp)[::-1]
        mass_before = np.concatenate([[0.0], np.cumsum(np.exp(head.astype(np.float64)))[:-1]])
        kept = int((mass_before < top_p * total).sum())
        if kept < m or m == n:
            return float(head[kept - 1])
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Shaped:
    """A next-token distribution before and after the sampler's filters.

    Attributes:
        ids: The ``k`` most likely token ids under the model, most likely first.
        labels: Their texts.
        model_probs: Their probabilities under the model.
        sampled_probs: Their probabilities under the distribution sampled from.
        cut_by: Per row, the filter that removed the token (``"top-p"``,
            ``"min-p"``, ``"top-k"``, ``"greedy"``) or ``""`` when it survives.
        rest_model: Model probability of all tokens outside ``ids``.
        rest_sampled: Sampled probability of all tokens outside ``ids``.
        survivors: How many tokens of the whole vocabulary can still be sampled.
        vocab_size: Size of the vocabulary.
        known: When only the top entries were known (a server's ``top_logprobs``):
            how many; ``None`` for a full vector. Then ``rest_model`` is exact,
            ``survivors`` and ``rest_sampled`` assume the worst case for the
            unknown rest (each of its tokens as likely as the least likely known
            one), and the known tokens' sampled probabilities are exact when
            the filters cut the rest away, otherwise estimates under that case.
    """

    ids: tuple[int, ...]
    labels: tuple[str, ...]
    model_probs: tuple[float, ...]
    sampled_probs: tuple[float, ...]
    cut_by: tuple[str, ...]
    rest_model: float
    rest_sampled: float
    survivors: int
    vocab_size: int
    known: int | None = None


def shape_distribution(
    logprobs: Any, params: SamplingParams, *, k: int = 10, label: Callable[[int], str] = str
) -> Shaped:
    """Apply the sampler's filters to a stored distribution and describe its top ``k``.

    Args:
        logprobs: Model log-probabilities, shape ``(vocab,)`` (numpy or mlx).
        params: The settings to apply (``SamplingParams(temperature=0.7, top_p=0.9)``).
        k: Rows to report.
        label: Token id to display text.

    Returns:
        A ``Shaped`` record.
    """
    lp = as_numpy(logprobs)
    n = lp.shape[0]
    k = max(1, min(int(k), n))
    cut = np.full(n, "", dtype=object)
    parts = branches(lp, params, cut)
    sampled = _mix(lp, params, parts)
    probs = np.exp(lp.astype(np.float64))
    top = np.argpartition(-lp, k - 1)[:k]
    top = top[np.argsort(-lp[top], kind="stable")]
    return Shaped(
        ids=tuple(int(i) for i in top),
        labels=tuple(label(int(i)) for i in top),
        model_probs=tuple(float(probs[i]) for i in top),
        sampled_probs=tuple(float(sampled[i]) for i in top),
        cut_by=tuple(str(cut[i]) for i in top),
        rest_model=max(0.0, float(probs.sum() - probs[top].sum())),
        rest_sampled=max(0.0, float(sampled.sum() - sampled[top].sum())),
        survivors=int(np.logical_or.reduce([keep for _, keep in parts]).sum()),
        vocab_size=n,
    )


_FILLERS_MAX = 1_000_000


def shape_known(
    top: list[tuple[int, float]], params: SamplingParams, *, k: int = 10, label: Callable[[int], str] = str
) -> Shaped:
    """``shape_distribution`` when only the most likely entries are known (a server's alternatives).

    The unknown rest (``1 - sum`` of the known probabilities, exact) is filled
    with tokens each as likely as the least likely known one, the most it can
    be, so the filters see a whole distribution in its worst case; the rows
    shown are the known tokens only (see ``Shaped.known``).

    Args:
        top: ``[(token id, logprob), ...]``, the known entries.
        params: The settings to apply.
        k: Rows to report (at most the known entries).
        label: Token id to display text.
    """
    if not top:
        raise ValueError("shape_known: expected at least one known entry")
    ids = [i for i, _ in top]
    lp = np.array([v for _, v in top], dtype=np.float64)
    probs = np.exp(lp)
    rest = max(0.0, 1.0 - float(probs.sum()))
    floor = float(probs.min())
    fillers = min(math.ceil(rest / floor - 1e-9) if rest > 1e-9 and floor > 0 else 0, _FILLERS_MAX)
    pad = np.full(fillers, math.log(floor), dtype=np.float64)
    if fillers:
        pad[-1] = math.log(max(rest - floor * (fillers - 1), 1e-30))
    vector = np.concatenate([lp, pad]).astype(np.float32)
    shaped = shape_distribution(
        vector, params, k=min(k, len(ids)), label=lambda j: label(ids[j]) if j < len(ids) else ""
    )
    known_rows = [j for j in shaped.ids if j < len(ids)]
    rows = [shaped.ids.index(j) for j in known_rows]
    return Shaped(
        ids=tuple(ids[j] for j in known_rows),
        labels=tuple(shaped.labels[r] for r in rows),
        model_probs=tuple(float(probs[j]) for j in known_rows),
        sampled_probs=tuple(shaped.sampled_probs[r] for r in rows),
        cut_by=tuple(shaped.cut_by[r] for r in rows),
        rest_model=max(0.0, 1.0 - sum(float(probs[j]) for j in known_rows)),
        rest_sampled=max(0.0, 1.0 - sum(shaped.sampled_probs[r] for r in rows)),
        survivors=shaped.survivors,
        vocab_size=len(ids) + fillers,
        known=len(ids),
    )
