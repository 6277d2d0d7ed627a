"""A reusable prompt cache: longest-prefix reuse, snapshots, save/load, stats.

mlx-lm owns the KV cache layers (``make_prompt_cache``, ``trim_prompt_cache``)
and their file format (see ``nbllm.cache_file``). ``PromptCache`` adds the
token ids they cover and reuses the longest prefix a new prompt shares with
them: trimmed when every layer can be trimmed; otherwise (a rotating or
sliding-window layer past its window) restored from a snapshot taken at the
start of the last request, or rebuilt from scratch when no snapshot fits.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import mlx.core as mx

from .cache_file import model_fingerprint

if TYPE_CHECKING:
    from .model import LM

__all__ = ["PromptCache", "CacheStats", "progress_bar", "model_fingerprint"]

_KV_BITS, _GROUP_SIZES = (2, 3, 4, 5, 6, 8), (32, 64, 128)


@dataclass
class CacheStats:
    """What a ``PromptCache`` holds and has saved.

    Attributes:
        tokens_held: Token ids the layers cover now.
        bytes_held: Bytes of KV arrays held now, the snapshot included.
        tokens_reused: Prompt tokens taken from the cache, over all requests.
        tokens_processed: Prompt tokens the model had to run, over all requests.
        last_reused: Prompt tokens reused by the last request.
        last_processed: Prompt tokens run by the last request.
        requests: Prompts served.
        restores: Times layers that could not be trimmed were rolled back to the snapshot.
        rebuilds: Times reusable tokens were lost: layers could not be trimmed and no snapshot fitted.
    """

    tokens_held: int = 0
    bytes_held: int = 0
    tokens_reused: int = 0
    tokens_processed: int = 0
    last_reused: int = 0
    last_processed: int = 0
    requests: int = 0
    restores: int = 0
    rebuilds: int = 0

    @property
    def reuse_rate(self) -> float:
        """Share of all prompt tokens served from the cache."""
        total = self.tokens_reused + self.tokens_processed
        return self.tokens_reused / total if total else 0.0


class PromptCache:
    """mlx-lm KV cache layers plus the token ids they cover, for one model.

    Pass it as ``prompt_cache=`` to ``stream``/``generate``/``Stepper``; each
    prompt reuses the longest prefix it shares with what the cache holds.

    Args:
        lm: The model the cache belongs to.
        max_kv_size: Keep at most this many tokens per layer (rotating cache:
            bounded memory, older context forgotten; also caps sliding-window
            layers with a larger window); ``None`` = unbounded.
        kv_bits: Quantize the KV cache to this many bits (2-8; mlx-lm's
            ``QuantizedKVCache``, works on the CPU backend); ``None`` = full precision.
            Rotating/sliding-window layers stay full precision (mlx-lm cannot
            quantize them), so ``kv_bits`` with ``max_kv_size`` is refused.
        kv_group_size: Quantization group size (32, 64 or 128; must divide the head size).
        prefill_step_size: Tokens per chunk in ``prefill``.
    """

    def __init__(self, lm: "LM", max_kv_size: int | None = None, kv_bits: int | None = None,
                 kv_group_size: int = 64, prefill_step_size: int = 2048):
        if max_kv_size is not None and (not isinstance(max_kv_size, int) or isinstance(max_kv_size, bool) or max_kv_size < 8):
            raise ValueError(f"max_kv_size: expected an integer >= 8 or None, got {max_kv_size!r}")
        if kv_bits is not None and kv_bits not in _KV_BITS:
            raise ValueError(f"kv_bits: expected one of {_KV_BITS} or None, got {kv_bits!r}")
        if kv_group_size not in _GROUP_SIZES:
            raise ValueError(f"kv_group_size: expected one of {_GROUP_SIZES}, got {kv_group_size!r}")
        if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
            raise ValueError(f"prefill_step_size: expected an integer >= 1, got {prefill_step_size!r}")
        if kv_bits is not None:
            if max_kv_size is not None:
                raise ValueError("kv_bits: expected kv_bits or max_kv_size, got both (mlx-lm has no quantized rotating cache)")
            head = _head_dim(lm.config)
            if head is not None and head % kv_group_size:
                raise ValueError(f"kv_bits: expected a head size divisible by kv_group_size={kv_group_size}, got head size {head}")
        self.lm, self.max_kv_size, self.kv_bits = lm, max_kv_size, kv_bits
        self.kv_group_size, self.prefill_step_size = kv_group_size, prefill_step_size
        self._layers: list[Any] | None = None
        self._ids: list[int] = []
        # Content hashes of the images behind the ids: the same placeholder ids
        # with other images must not reuse the cache.
        self._media: tuple[str, ...] = ()
        # (ids it covers, per layer: a copy, or None for a layer that is rolled back by trimming)
        self._snap: tuple[list[int], list[Any]] | None = None
        self._busy, self._stats = False, CacheStats()

    # -- state -----------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """The token ids the cache covers."""
        return list(self._ids)

    @property
    def layers(self) -> list[Any] | None:
        """The mlx-lm cache layers (``None`` while empty)."""
        return self._layers

    @property
    def stats(self) -> CacheStats:
        s = self._stats
        held = (self._layers or []) + [c for c in (self._snap[1] if self._snap else []) if c is not None]
        s.tokens_held, s.bytes_held = len(self._ids), sum(int(c.nbytes) for c in held)
        return CacheStats(**vars(s))

    @property
    def busy(self) -> bool:
        """True while a stream is using the layers (between ``prepare`` and ``commit``)."""
        return self._busy

    def __repr__(self) -> str:
        s = self.stats
        return f"PromptCache({self.lm.name!r}, {s.tokens_held} tokens, {s.bytes_held / 1e6:.1f} MB, reuse {s.reuse_rate:.0%})"

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading ids of ``ids`` the cache already covers."""
        return next((i for i, (a, b) in enumerate(zip(self._ids, ids)) if a != b), min(len(self._ids), len(ids)))

    def clear(self) -> None:
        """Drop every cached token and free the layers."""
        self._check_free()
        self._layers, self._ids, self._snap = None, [], None

    def trim_to(self, n: int) -> int:
        """Keep at most the first ``n`` cached tokens; returns how many are kept."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"trim_to: expected an integer >= 0, got {n!r}")
        self._check_free()
        return self._cut(n)

    # -- the CacheLike hook used by stream() -----------------------------------
    def prepare(self, ids: Sequence[int], media: Sequence[str] = ()) -> tuple[list[Any], int]:
        """Make the layers cover the longest usable prefix of the prompt ``ids``.

        Args:
            ids: The prompt's token ids.
            media: Content hashes of the prompt's images (``LM.media_key``); when
                they differ from the cached prompt's, nothing is reused.

        Returns:
            ``(layers, n)``: layers covering ``ids[:n]``, ``n < len(ids)`` (mlx-lm must run one token).
        """
        ids = _check_ids(ids, self.lm.vocab_size)
        self._check_free()
        media = tuple(media)
        n = self._reuse(ids, len(ids) - 1 if media == self._media else 0)
        self._media = media
        self._busy = True
        return self._layers, n  # type: ignore[return-value]

    def commit(self, ids: Sequence[int]) -> None:
        """Record that the layers were fed a prefix of ``ids`` (their offsets say how much)."""
        self._busy = False
        if self._layers is None:
            return
        covered = min([c.offset for c in self._layers if hasattr(c, "offset")] + [len(ids)])
        self._ids = [int(t) for t in ids[:covered]]
        # An interrupt inside a forward pass can leave some layers one step ahead.
        ahead = [c for c in self._layers if getattr(c, "offset", covered) > covered]
        if all(c.is_trimmable() for c in ahead):
            for c in ahead:
                c.trim(c.offset - covered)
        elif not self._restore(covered):
            self._layers, self._ids, self._snap = None, [], None

    def prefill(self, ids: Sequence[int], progress: bool | Callable[[int, int], None] | None = None) -> int:
        """Run the model over ``ids`` (in chunks) so later prompts starting with them reuse the work.

        Args:
            ids: Token ids (e.g. ``lm.encode(long_document)``).
            progress: ``True`` for a tqdm progress bar, or ``progress(done, total)``.

        Returns:
            How many tokens were processed (the rest came from the cache).
        """
        ids = _check_ids(ids, self.lm.vocab_size)
        report = progress_bar() if progress is True else (progress or None)
        if report is not None and not callable(report):
            raise TypeError(f"progress: expected True, a callable or None, got {type(progress).__name__}")
        self._check_free()
        n = self._reuse(ids, len(ids))
        todo, done = ids[n:], 0
        try:
            while done < len(todo):
                chunk = todo[done : done + self.prefill_step_size]
                self.lm.model(mx.array(chunk)[None], cache=self._layers)
                mx.eval([c.state for c in self._layers])  # type: ignore[union-attr]
                done += len(chunk)
                if report:
                    report(done, len(todo))
        finally:
            self.commit(ids[: n + done])
        return len(todo)

    # -- save / load -------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the cache to a ``.safetensors`` file (suffix added if missing); returns the path.

        The metadata holds the model fingerprint, token ids, settings, nbllm
        version and a checksum, so ``load`` refuses another model's or a damaged file.
        """
        from . import cache_file

        self._check_free()
        if self._layers is None:
            raise ValueError("save: expected a cache holding tokens, got an empty cache")
        settings = {"max_kv_size": self.max_kv_size, "kv_bits": self.kv_bits, "kv_group_size": self.kv_group_size,
                    "media": list(self._media)}
        return cache_file.write(self.lm, self._layers, self._ids, settings, path)

    @classmethod
    def load(cls, lm: "LM", path: str | os.PathLike[str]) -> "PromptCache":
        """Read a cache written by ``save`` for this model.

        Raises:
            FileNotFoundError: No such file.
            ValueError: Not an nbllm prompt cache, damaged, or made with another model.
        """
        from . import cache_file

        layers, ids, settings = cache_file.read(lm, path)
        media = tuple(settings.pop("media", ()))
        cache = cls(lm, **settings)
        cache._layers, cache._ids, cache._media = layers, ids, media
        return cache

    # -- internals ---------------------------------------------------------------
    def _check_free(self) -> None:
        if self._busy:
            raise RuntimeError("this PromptCache is in use by a stream that has not finished; iterate it to the end or call its close()")

    def _reuse(self, ids: list[int], limit: int) -> int:
        """Cut the layers back to cover ``ids[:n]`` (n <= limit), snapshot them, update stats."""
        n = min(self.common_prefix(ids), limit)
        consistent = self._layers is not None and all(getattr(c, "offset", len(self._ids)) == len(self._ids) for c in self._layers)
        n = self._cut(n) if n and consistent else 0
        if n == 0:
            self._layers, self._ids, self._snap = self._new_layers(), [], None
        self._snapshot()
        s = self._stats
        s.requests, s.last_reused, s.last_processed = s.requests + 1, n, len(ids) - n
        s.tokens_reused, s.tokens_processed = s.tokens_reused + n, s.tokens_processed + len(ids) - n
        return n

    def _cut(self, n: int) -> int:
        """Make the layers cover at most ``self._ids[:n]``: trim, else restore the snapshot, else drop all."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if n >= len(self._ids):
            return len(self._ids)
        if self._layers is not None and can_trim_prompt_cache(self._layers):
            trim_prompt_cache(self._layers, len(self._ids) - n)
            self._ids = self._ids[:n]
            if self._snap is not None and len(self._snap[0]) > n:
                self._snap = None
            return n
        if self._restore(n):
            return len(self._ids)
        self._stats.rebuilds += n > 0
        self._layers, self._ids, self._snap = None, [], None
        return 0

    def _snapshot(self) -> None:
        # Only layers that may become untrimmable need a copy (bounded: at most their window).
        if self._layers is None or all(c.is_trimmable() and not hasattr(c, "max_size") for c in self._layers):
            self._snap = None
            return
        keep = [None if c.is_trimmable() and not hasattr(c, "max_size") else copy.deepcopy(c) for c in self._layers]
        self._snap = (list(self._ids), keep)

    def _restore(self, n: int) -> bool:
        """Roll back to the snapshot if it covers a prefix of ``self._ids[:n]``."""
        if self._snap is None or self._layers is None:
            return False
        ids, kept = self._snap
        s = len(ids)
        if s > n or self._ids[:s] != ids or any(k is None and c.offset < s for c, k in zip(self._layers, kept)):
            return False
        for i, (c, k) in enumerate(zip(self._layers, kept)):
            if k is None:
                c.trim(c.offset - s)
            else:
                self._layers[i] = k
        self._ids, self._snap = list(ids), None
        self._stats.restores += 1
        return True

    def _new_layers(self) -> list[Any]:
        from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache

        layers = make_prompt_cache(self.lm.model, max_kv_size=self.max_kv_size)
        # Models with their own make_cache ignore max_kv_size: bound every layer here.
        if self.max_kv_size is not None:
            size = self.max_kv_size
            layers = [RotatingKVCache(max_size=size, keep=4) if type(c) is KVCache
                      else RotatingKVCache(max_size=size, keep=c.keep) if type(c) is RotatingKVCache and c.max_size > size
                      else c for c in layers]
        if self.kv_bits is not None:
            layers = [QuantizedKVCache(group_size=self.kv_group_size, bits=self.kv_bits) if type(c) is KVCache else c for c in layers]
        return list(layers)


def progress_bar(desc: str = "prefill", min_total: int = 0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback drawing a ``tqdm.auto`` bar labelled ``desc``.

    One bar per prefill; prefills shorter than ``min_total`` tokens draw nothing.
    """
    state: dict[str, Any] = {"bar": None}

    def report(done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = state["bar"]
        if bar is None:
            if total < max(min_total, 1) or done >= total:
                return
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="tok", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def _head_dim(config: dict[str, Any]) -> int | None:
    cfg = config.get("text_config") or config
    heads = cfg.get("num_attention_heads")
    return int(cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads if heads else 0)) or None


def _check_ids(ids: Any, vocab_size: int) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"ids: expected a list of token ids, got {type(ids).__name__}")
    if not ids:
        raise ValueError("ids: expected at least one token id, got an empty list")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"ids: expected token ids in [0, {vocab_size}), got {bad[:3]}")
    return list(ids)
