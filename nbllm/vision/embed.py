"""Merged image+text input embeddings, with the image features cached per image content.

mlx-vlm's ``get_input_embeddings`` runs the vision tower and writes its
features into the placeholder rows of the text embeddings. The rows an image
set produced are kept (keyed by the images' content hashes), so a follow-up
question about the same picture splices them in without the vision tower —
once a first check has shown that only placeholder rows differ from plain text
embeddings for this model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .adapter import int_list, source_mentions

__all__ = ["ImageFeatures", "ImageCacheStats", "Embedded"]

# Outputs of mlx-vlm's get_input_embeddings the adapter can serve (the 4D mask
# is built by mlx-vlm but ignored by the causal language models it supports).
_HANDLED = {"inputs_embeds", "position_ids", "rope_deltas", "attention_mask_4d"}
_CACHE_SIZE = 16


@dataclass(frozen=True)
class ImageCacheStats:
    """How the per-image feature cache is doing.

    Attributes:
        entries: Image sets whose features are held.
        hits: Prompts whose images skipped the vision tower.
        misses: Prompts whose images ran through the vision tower.
    """

    entries: int
    hits: int
    misses: int


@dataclass(frozen=True)
class Embedded:
    """A prompt's input embeddings ``(L, hidden)`` and, for mRoPE models, positions ``(3, L)`` and rope delta."""

    embeddings: mx.array
    positions: mx.array | None = None
    rope_delta: int = 0


class ImageFeatures:
    """Embeds prompts for one mlx-vlm model, caching image features by content.

    Args:
        vlm: The mlx-vlm model.
        image_ids: Placeholder token ids image features replace.
        uses_mrope: Whether the language model takes 3D (mRoPE) positions.
    """

    def __init__(self, vlm: Any, image_ids: set[int], uses_mrope: bool):
        self.vlm, self.image_ids, self.uses_mrope = vlm, image_ids, uses_mrope
        self._rows: OrderedDict[tuple[str, ...], mx.array] = OrderedDict()
        self._splice_ok: bool | None = None  # can cached image rows be spliced into text embeddings?
        self._hits = self._misses = 0
        self._reads_4d_mask = source_mentions(type(vlm.language_model), "attention_mask_4d")  # e.g. Falcon-OCR

    @property
    def stats(self) -> ImageCacheStats:
        return ImageCacheStats(len(self._rows), self._hits, self._misses)

    def clear(self) -> None:
        self._rows.clear()

    def embed(self, ids: list[int], inputs: dict[str, Any], digests: tuple[str, ...]) -> Embedded:
        """Embeddings for ``ids`` with the processor outputs ``inputs`` of images ``digests`` (none for text)."""
        inputs = dict(inputs)
        input_ids = mx.array(ids)[None]
        mask = inputs.pop("attention_mask", None)
        pixels = inputs.pop("pixel_values", None)
        if not digests:
            if set(ids) & self.image_ids:
                raise ValueError("images: the prompt holds image placeholder tokens but no images were given")
            out = self.vlm.get_input_embeddings(input_ids, None, mask=mask)
        else:
            if pixels is None:
                raise ValueError("images: the processor produced no pixel values for these images")
            out = self._merge(input_ids, pixels, mask, inputs, digests)
        handled = _HANDLED - {"attention_mask_4d"} if self._reads_4d_mask else _HANDLED
        extras = sorted(k for k, v in out.to_dict().items() if v is not None and k not in handled)
        if extras:
            raise NotImplementedError(
                f"{self.vlm.config.model_type}: its language model needs {', '.join(extras)} at every step, which "
                "mlx-lm's decode loop cannot pass; use mlx_vlm.generate for this architecture"
            )
        embeddings = out.inputs_embeds[0]
        if not self.uses_mrope:
            mx.eval(embeddings)  # now: the prompt may be fed on another thread
            return Embedded(embeddings)
        positions, deltas = out.position_ids, out.rope_deltas
        if positions is None:
            positions, deltas = self.vlm.language_model.get_rope_index(
                input_ids, inputs.get("image_grid_thw"), None, mask
            )
        if positions.ndim == 2:  # text only: the same position on all three axes
            positions = mx.broadcast_to(positions[None], (3, *positions.shape))
        positions = positions[:, 0, :]
        mx.eval(embeddings, positions, deltas)
        return Embedded(embeddings, positions, int_list(mx.array(deltas))[0])

    def _merge(
        self, input_ids: mx.array, pixels: mx.array, mask: mx.array | None, inputs: dict[str, Any], key: tuple[str, ...]
    ) -> Any:
        """mlx-vlm's merge of image features into the text embeddings, cached per image hash."""
        vlm = self.vlm
        where = mx.array([t in self.image_ids for t in int_list(input_ids)])
        rows = self._rows.get(key) if self._splice_ok else None
        if rows is not None and rows.shape[0] == int_list(where.sum())[0]:
            self._rows.move_to_end(key)
            self._hits += 1
            out = vlm.get_input_embeddings(input_ids, None, mask=mask)
            text = out.inputs_embeds[0]
            index = mx.maximum(mx.cumsum(where.astype(mx.int32)) - 1, 0)
            out.inputs_embeds = mx.where(where[:, None], rows[index], text)[None]
            if self.uses_mrope:
                out.position_ids, out.rope_deltas = vlm.language_model.get_rope_index(
                    input_ids, inputs.get("image_grid_thw"), None, mask
                )
            return out
        self._misses += 1
        out = vlm.get_input_embeddings(input_ids, pixels, mask=mask, **inputs)
        merged = out.inputs_embeds[0]
        if self._splice_ok is None:  # check once that only placeholder rows differ from plain text
            text = vlm.get_input_embeddings(input_ids, None, mask=mask).inputs_embeds[0]
            self._splice_ok = bool(
                mx.array_equal(mx.where(where[:, None], 0, merged), mx.where(where[:, None], 0, text)).item()
            )
        if self._splice_ok:
            import numpy as np

            rows = merged[mx.array(np.flatnonzero(np.array(where)))]
            mx.eval(rows)
            self._rows[key] = rows
            while len(self._rows) > _CACHE_SIZE:
                self._rows.popitem(last=False)
        return out
