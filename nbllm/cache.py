"""A reusable prompt cache: longest-prefix reuse, snapshots, save/load, stats.

mlx-lm owns the KV cache layers (``make_prompt_cache``, ``trim_prompt_cache``)
and their file format (see ``nbllm.cache_file``). ``PromptCache`` adds the
token ids they cover and reuses the longest prefix a new prompt shares with
them: trimmed when every layer can be trimmed; otherwise (a rotating or
sliding-window layer past its window) restored from a snapshot taken at the
start of the last request, or rebuilt from scratch when no snapshot fits.

A run leases the layers (``prepare``) and hands them back (``commit``) with
the tokens they then cover, however it ended. While leased, the cache refuses
other users with a clear "in use" error; a stream left unfinished on the same
thread (a notebook cell that stopped reading it) is closed instead.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .engine import InUseError
from .kv import bounded, head_dim, restore, snapshot, trim_ahead
from .progress import progress_bar
from .prompt import Prompt
from .request import check_max_kv_size
from .sdpa import cpu_prefill

__all__ = ["PromptCache", "CacheStats"]

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
        prefill_step_size: Tokens per chunk in ``prefill`` (``None``: the engine's choice for the device).
    """

    def __init__(
        self,
        lm: Any,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        prefill_step_size: int | None = None,
    ):
        check_max_kv_size(max_kv_size)
        if kv_bits is not None and kv_bits not in _KV_BITS:
            raise ValueError(f"kv_bits: expected one of {_KV_BITS} or None, got {kv_bits!r}")
        if kv_group_size not in _GROUP_SIZES:
            raise ValueError(f"kv_group_size: expected one of {_GROUP_SIZES}, got {kv_group_size!r}")
        if prefill_step_size is not None and (not isinstance(prefill_step_size, int) or prefill_step_size < 1):
            raise ValueError(f"prefill_step_size: expected an integer >= 1 or None, got {prefill_step_size!r}")
        if kv_bits is not None:
            if max_kv_size is not None:
                raise ValueError(
                    "kv_bits: expected kv_bits or max_kv_size, got both (mlx-lm has no quantized rotating cache)"
                )
            head = head_dim(lm.config)
            if head is not None and head % kv_group_size:
                raise ValueError(
                    f"kv_bits: expected a head size divisible by kv_group_size={kv_group_size}, got head size {head}"
                )
        self.lm, self.max_kv_size, self.kv_bits = lm, max_kv_size, kv_bits
        self.kv_group_size = kv_group_size
        self.prefill_step_size = prefill_step_size or lm.engine.prefill_step_size
        self._layers: list[Any] | None = None
        self._ids: list[int] = []
        # Content hashes of the images behind the ids: the same placeholder ids
        # with other images must not reuse the cache.
        self._media: tuple[str, ...] = ()
        # (ids it covers, per layer: a copy, or None for a layer that is rolled back by trimming)
        self._snap: tuple[list[int], list[Any]] | None = None
        self._busy, self._stats = False, CacheStats()
        self._lock = threading.RLock()
        self._holder: Any = None  # weak reference to the stream that holds the lease
        self._holder_thread: int | None = None

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

    def ensure_free(self) -> None:
        """Raise a clear "in use" error if a stream holds the cache (one left unfinished on this thread is closed)."""
        with self._lock:
            self._check_free()

    def __repr__(self) -> str:
        s = self.stats
        return f"PromptCache({self.lm.name!r}, {s.tokens_held} tokens, {s.bytes_held / 1e6:.1f} MB, reuse {s.reuse_rate:.0%})"

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading ids of ``ids`` the cache already covers."""
        return next((i for i, (a, b) in enumerate(zip(self._ids, ids)) if a != b), min(len(self._ids), len(ids)))

    def clear(self) -> None:
        """Drop every cached token and free the layers."""
        with self._lock:
            self._check_free()
            self._layers, self._ids, self._snap = None, [], None

    def trim_to(self, n: int) -> int:
        """Keep at most the first ``n`` cached tokens; returns how many are kept."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"trim_to: expected an integer >= 0, got {n!r}")
        with self._lock:
            self._check_free()
            return self._cut(n)

    # -- the lease an engine run takes -------------------------------------------
    def prepare(self, ids: Sequence[int], media: Sequence[str] = (), owner: Any = None) -> tuple[list[Any], int]:
        """Lease the layers, cut back to the longest usable prefix of the prompt ``ids``.

        Args:
            ids: The prompt's token ids.
            media: Content hashes of the prompt's images (``Prompt.media``); when
                they differ from the cached prompt's, nothing is reused.
            owner: The stream taking the lease (one with ``release_lease()``), so
                a new request on the same thread can close it if it was left unfinished.

        Returns:
            ``(layers, n)``: layers covering ``ids[:n]``, ``n < len(ids)`` (the model must run one token).

        Raises:
            RuntimeError: The cache is in use (by a stream on another thread, or one producing a token now).
        """
        ids = _check_ids(ids, self.lm.vocab_size)
        return self._lease(ids, tuple(media), owner, len(ids) - 1)

    def _lease(self, ids: list[int], media: tuple[str, ...], owner: Any, limit: int) -> tuple[list[Any], int]:
        with self._lock:
            self._check_free()
            n = self._reuse(ids, limit if media == self._media else 0)
            self._media = media
            self._busy = True
            self._holder = weakref.ref(owner) if owner is not None else None
            self._holder_thread = threading.get_ident()
            return self._layers, n  # type: ignore[return-value]

    def commit(self, ids: Sequence[int]) -> None:
        """End the lease: the layers were fed a prefix of ``ids`` (their offsets say how much)."""
        with self._lock:
            self._busy, self._holder, self._holder_thread = False, None, None
            if self._layers is None:
                return
            covered = min([c.offset for c in self._layers if hasattr(c, "offset")] + [len(ids)])
            self._ids = [int(t) for t in ids[:covered]]
            if not trim_ahead(self._layers, covered) and not self._restore(covered):
                self._layers, self._ids, self._snap = None, [], None

    def prefill(self, ids: Sequence[int] | Prompt, progress: bool | Callable[[int, int], None] | None = None) -> int:
        """Run the model over a prompt (in chunks) so later prompts starting with it reuse the work.

        Args:
            ids: Token ids or a ``Prompt`` (e.g. ``lm.encode(long_document)``; a
                vision prompt's image embeddings are fed as they are).
            progress: ``True`` for a tqdm progress bar, or ``progress(done, total)``.

        Returns:
            How many tokens were processed (the rest came from the cache).
        """
        from .mlx_engine import generation_stream

        prompt = ids if isinstance(ids, Prompt) else Prompt.of(_check_ids(ids, self.lm.vocab_size))
        report = progress_bar() if progress is True else (progress or None)
        if report is not None and not callable(report):
            raise TypeError(f"progress: expected True, a callable or None, got {type(progress).__name__}")
        engine = self.lm.engine
        layers, n = self._lease(list(prompt.ids), prompt.media, None, len(prompt))
        done, todo = 0, len(prompt) - n
        try:
            engine.bind(layers, prompt)
            while done < todo:
                start = n + done
                chunk = list(prompt.ids[start : start + self.prefill_step_size])
                emb = prompt.embeddings[start : start + len(chunk)] if prompt.embeddings is not None else None
                with mx.stream(generation_stream()), cpu_prefill():
                    engine.call(chunk, layers, emb)
                    mx.eval([c.state for c in layers])
                done += len(chunk)
                if report:
                    report(done, todo)
        finally:
            self.commit(list(prompt.ids[: n + done]))
        return todo

    # -- save / load -------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the cache to a ``.safetensors`` file (suffix added if missing); returns the path.

        The metadata holds the model fingerprint, token ids, settings, nbllm
        version and a checksum, so ``load`` refuses another model's or a damaged file.
        """
        from . import cache_file

        with self._lock:
            self._check_free()
            if self._layers is None:
                raise ValueError("save: expected a cache holding tokens, got an empty cache")
            settings = {
                "max_kv_size": self.max_kv_size,
                "kv_bits": self.kv_bits,
                "kv_group_size": self.kv_group_size,
                "media": list(self._media),
            }
            return cache_file.write(self.lm, self._layers, self._ids, settings, path)

    @classmethod
    def load(cls, lm: Any, path: str | os.PathLike[str]) -> PromptCache:
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
        """Raise unless nobody holds the lease; a stream left unfinished on this thread is closed first."""
        if not self._busy:
            return
        holder = self._holder() if self._holder is not None else None
        if (
            holder is not None
            and self._holder_thread == threading.get_ident()
            and holder.release_lease()
            and not self._busy
        ):
            return
        where = "on another thread" if self._holder_thread != threading.get_ident() else "that is producing a token now"
        raise InUseError(
            f"this PromptCache is in use by a stream {where}; finish or close() it first, "
            "or give each thread its own PromptCache"
        )

    def _reuse(self, ids: list[int], limit: int) -> int:
        """Cut the layers back to cover ``ids[:n]`` (n <= limit), snapshot them, update stats."""
        n = min(self.common_prefix(ids), limit)
        consistent = self._layers is not None and all(
            getattr(c, "offset", len(self._ids)) == len(self._ids) for c in self._layers
        )
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
        kept = snapshot(self._layers) if self._layers is not None else None
        self._snap = (list(self._ids), kept) if kept is not None else None

    def _restore(self, n: int) -> bool:
        """Roll back to the snapshot if it covers a prefix of ``self._ids[:n]``."""
        if self._snap is None or self._layers is None:
            return False
        ids, kept = self._snap
        if len(ids) > n or self._ids[: len(ids)] != ids or not restore(self._layers, kept, len(ids)):
            return False
        self._ids, self._snap = list(ids), None
        self._stats.restores += 1
        return True

    def _new_layers(self) -> list[Any]:
        return bounded(self.lm.engine.make_layers(self.max_kv_size), self.max_kv_size, self.kv_bits, self.kv_group_size)


def _check_ids(ids: Any, vocab_size: int) -> list[int]:
    if isinstance(ids, Prompt):
        return list(ids.ids)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"ids: expected a list of token ids, got {type(ids).__name__}")
    if not ids:
        raise ValueError("ids: expected at least one token id, got an empty list")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"ids: expected token ids in [0, {vocab_size}), got {bad[:3]}")
    return list(ids)
