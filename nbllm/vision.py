"""Vision-language models through the same engine as text models.

An mlx-vlm model is used in two phases. ``VisionLM.prepare_inputs`` runs the
image processor and the vision tower once and returns the merged image+text
input embeddings, shape ``(len(ids), hidden)``. Decoding is then mlx-lm's
``generate_step(..., input_embeddings=...)`` over ``VisionLM.model``, an
adapter that calls mlx-vlm's language model with mlx-lm's signature. So
samplers, logits processors, alternatives, structured output, the stepper
and prompt-cache reuse work for images exactly as for text.

Image features are cached per image content hash, so a follow-up question
about the same picture skips the vision tower. Architectures whose language
model needs more than embeddings (and mRoPE positions) at every step need
mlx-vlm's own loop, and ``prepare_inputs`` says so by name: Qwen3-VL (deepstack
visual features), Gemma 3n (per-layer inputs), Llama 3.2 Vision (cross
attention), Falcon-OCR (a 4D attention mask), encoder-decoders like Florence-2.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx

from .images import MissingImages, as_list, drop_images, format_messages, image_digest, load_image
from .model import LM, _cast, _is_messages
from .vision_adapter import LanguageAdapter, image_token_ids, int_list, source_mentions

__all__ = ["VisionLM", "ImageCacheStats", "load_vision"]

# Outputs of mlx-vlm's get_input_embeddings the adapter can serve (the 4D mask
# is built by mlx-vlm but ignored by the causal language models it supports).
_HANDLED = {"inputs_embeds", "position_ids", "rope_deltas", "attention_mask_4d"}
_FEATURE_CACHE_SIZE = 16


class _Prompt(list):  # type: ignore[type-arg]
    """Token ids that remember how they were made (so images can be added later)."""

    vision: "_Vision | None" = None


@dataclass
class _Vision:
    source: tuple[Any, str | None, bool] | None  # (prompt, system, raw) for re-encoding
    images: list[Any] = field(default_factory=list)  # decoded PIL images, in placeholder order
    digests: tuple[str, ...] = ()
    inputs: dict[str, Any] = field(default_factory=dict)  # processor outputs (pixel_values, grids, ...)
    missing: int = 0  # image parts in the messages still waiting for images=


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


class VisionLM(LM):
    """A vision-language model: an ``LM`` whose prompts can carry images.

    ``lm.stream(prompt, images=...)``, ``lm.generate``, ``lm.stepper`` and chat
    take ``images=``: one image or a list (path, URL, PIL image, numpy array,
    bytes). Chat messages may also hold images as content parts
    (``{"type": "image", "image": source}``); images given with ``images=``
    go into the first user message, so follow-up turns keep the same prefix.

    Attributes:
        vlm: The mlx-vlm model (vision tower, projector, language model).
        processor: The mlx-vlm / transformers processor.
        max_images: Most images per prompt (``None``: limited by context only).
    """

    def __init__(self, vlm: Any, processor: Any, tokenizer: Any, config: dict[str, Any], name: str, path: Path, load_seconds: float = 0.0):
        from mlx_vlm.prompt_utils import SINGLE_IMAGE_ONLY_MODELS

        super().__init__(LanguageAdapter(vlm), tokenizer, config, name, path, load_seconds)
        self.vlm = vlm
        self.processor = processor
        self.model_type = str(vlm.config.model_type)
        self.max_images: int | None = 1 if self.model_type in SINGLE_IMAGE_ONLY_MODELS else None
        self._features: OrderedDict[tuple[str, ...], mx.array] = OrderedDict()
        self._splice_ok: bool | None = None  # can cached image rows be spliced into text embeddings?
        self._hits = self._misses = 0
        self._reads_4d_mask = source_mentions(type(vlm.language_model), "attention_mask_4d")  # e.g. Falcon-OCR
        text_cfg = config.get("text_config") or {}
        ctx = config.get("max_position_embeddings") or text_cfg.get("max_position_embeddings")
        self._context = int(ctx) if ctx else None

    @property
    def is_vision(self) -> bool:
        return True

    @property
    def image_cache(self) -> ImageCacheStats:
        """Entries, hits and misses of the image feature cache (keyed by image content)."""
        return ImageCacheStats(len(self._features), self._hits, self._misses)

    def clear_image_cache(self) -> None:
        """Forget cached image features (the next prompt with images runs the vision tower)."""
        self._features.clear()

    # -- prompts -----------------------------------------------------------
    def encode(self, prompt: Any, *, system: str | None = None, raw: bool = False, images: Any = None) -> list[int]:
        """Turn a prompt (and its images) into token ids, image placeholders expanded.

        Args:
            prompt: Text, chat messages (content may list ``{"type": "image"}``
                and ``{"type": "text"}`` parts), or token ids.
            system: System message (chat template only).
            raw: No chat template; the text must then hold one image marker
                (``lm.image_marker``) per image.
            images: Image(s) for the prompt; see ``nbllm.images.load_image``.

        Returns:
            Token ids, with each image expanded into the placeholder tokens its
            vision features will fill (as the model's processor does).
        """
        return self._encode(prompt, system, raw, as_list(images))

    @property
    def image_marker(self) -> str:
        """The text marker the processor expands into an image's placeholder tokens."""
        proc = self.processor
        return str(getattr(proc, "boi_token", None) or getattr(proc, "image_token", None) or "<image>")

    def prepare_inputs(self, ids: list[int], images: Sequence[Any] | None) -> mx.array | None:
        """Merged image+text input embeddings for ``ids``, shape ``(len(ids), hidden)``.

        When ``images`` are given for a prompt encoded without them, the image
        placeholders are expanded in ``ids`` in place (callers keep that list).

        Args:
            ids: Token ids from ``encode``.
            images: Images for the prompt (or ``None`` if ``ids`` already carry them).

        Returns:
            The embeddings the language model is fed instead of ``ids``.
        """
        extra = as_list(images)
        vision = getattr(ids, "vision", None)
        if extra:
            if vision is not None and vision.images:
                raise ValueError("images: pass images either inside the chat messages or with images=, not both")
            if vision is not None and vision.source is not None:
                fresh = self._encode(vision.source[0], vision.source[1], vision.source[2], extra)
            else:
                fresh = self._attach(list(ids), extra)
            ids[:] = fresh
            if isinstance(ids, _Prompt):
                ids.vision = fresh.vision
            vision = fresh.vision
        elif vision is not None and vision.missing:
            raise ValueError(f"images: the messages have {vision.missing} image part(s) without an image, expected as many images=, got 0")
        return self._embed(list(ids), vision)

    def media_key(self, ids: Sequence[int]) -> tuple[str, ...]:
        """Content hashes of the images behind ``ids`` (after ``prepare_inputs``)."""
        vision = getattr(ids, "vision", None)
        return tuple(vision.digests) if vision is not None else ()

    # -- internals: text + images -> ids -------------------------------------
    def _encode(self, prompt: Any, system: str | None, raw: bool, extra: list[Any]) -> _Prompt:
        from mlx_vlm.prompt_utils import get_chat_template

        has_template = bool(self.tokenizer.has_chat_template)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return self._attach(LM.encode(self, list(prompt)), extra)
        if isinstance(prompt, str) and (raw or not has_template):
            if system is not None:
                raise ValueError("system: expected no system message with raw=True or a model without a chat template")
            images = self._load(extra)
            found = prompt.count(self.image_marker)
            if images and found != len(images):
                raise ValueError(f"prompt: with raw=True put one {self.image_marker!r} marker per image in the text; expected {len(images)}, got {found}")
            bos = self.tokenizer.bos_token
            special = bos is None or not prompt.startswith(bos)
            return self._tokenize(prompt, images, (prompt, system, raw), special)
        if isinstance(prompt, str):
            messages: list[Any] = [{"role": "user", "content": prompt}]
        elif _is_messages(prompt):
            if not has_template:
                raise ValueError("prompt: chat messages need a model with a chat template; pass text with raw=True")
            messages = list(prompt)
        else:
            raise TypeError(f"prompt: expected str, list of token ids or list of chat messages, got {type(prompt).__name__}")
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
        try:
            formatted, sources = format_messages(self.model_type, messages, extra)
            missing = 0
        except MissingImages as err:
            missing = err.count
            formatted, sources = format_messages(self.model_type, [{**m, "content": drop_images(m.get("content"))} for m in messages], [])
        images = self._load(sources)
        with _quiet_transformers():
            text = get_chat_template(self.processor, formatted, add_generation_prompt=True)
        ids = self._tokenize(text, images, (prompt, system, raw), None)
        if ids.vision is not None:
            ids.vision.missing = missing
        return ids

    def _load(self, sources: list[Any]) -> list[Any]:
        if self.max_images is not None and len(sources) > self.max_images:
            raise ValueError(f"images: {self.name} takes at most {self.max_images} image(s) per prompt, got {len(sources)}")
        return [load_image(s) for s in sources]

    def _tokenize(self, text: str, images: list[Any], source: Any, special: bool | None) -> _Prompt:
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        if special is None:
            special = should_add_special_tokens(self.model_type, self.processor)
        try:
            with _quiet_transformers():
                inputs = prepare_inputs(self.processor, images=images or None, prompts=text, add_special_tokens=special,
                                        image_token_index=min(image_token_ids(self.vlm.config), default=None))
        except ValueError as err:
            raise ValueError(f"images: the processor rejected the input: {str(err).splitlines()[0][:200]}") from None
        ids = _Prompt(int_list(inputs.pop("input_ids")[0]))
        if not ids:
            raise ValueError("prompt: expected at least one token, got an empty prompt")
        ctx = self._context
        if ctx and len(ids) > ctx:
            raise ValueError(f"prompt: expected at most {ctx} tokens (the model's context), got {len(ids)} with {len(images)} image(s)")
        ids.vision = _Vision(source, images, tuple(image_digest(i) for i in images), inputs)
        return ids

    def _attach(self, ids: list[int], extra: list[Any]) -> _Prompt:
        """Token ids plus images: placeholders already expanded, or one marker token per image to expand."""
        prompt = _Prompt(ids)
        prompt.vision = _Vision(None)
        if not extra:
            return prompt
        images = self._load(extra)
        joint = self._tokenize(self.image_marker * len(images), images, None, False)
        placeholder = image_token_ids(self.vlm.config)
        need, have = sum(t in placeholder for t in joint), sum(t in placeholder for t in ids)
        if have != need:
            marker = self.tokenizer.convert_tokens_to_ids(self.image_marker)
            spots = [i for i, t in enumerate(ids) if t == marker]
            if len(spots) != len(images):
                raise ValueError(f"prompt: expected token ids with one {self.image_marker!r} per image or {need} image tokens "
                                 f"for {len(images)} image(s), got {len(spots)} and {have}; build them with lm.encode(prompt, images=...)")
            for spot, image in reversed(list(zip(spots, images))):  # expand each marker as the processor does
                ids = ids[:spot] + list(self._tokenize(self.image_marker, [image], None, False)) + ids[spot + 1 :]
            prompt[:] = ids
        assert joint.vision is not None
        joint.vision.inputs["attention_mask"] = mx.ones((1, len(ids)), dtype=mx.int32)  # these ids' mask, not the marker's
        prompt.vision = joint.vision
        return prompt

    # -- internals: ids + images -> embeddings -------------------------------
    def _embed(self, ids: list[int], vision: _Vision | None) -> mx.array:
        vlm = self.vlm
        inputs = dict(vision.inputs) if vision is not None else {}
        input_ids = mx.array(ids)[None]
        mask = inputs.pop("attention_mask", None)
        pixels = inputs.pop("pixel_values", None)
        key = vision.digests if vision is not None and vision.images else None
        if key is None:
            if set(ids) & self.model.image_ids:
                raise ValueError("images: the prompt holds image placeholder tokens but no images were given")
            out = vlm.get_input_embeddings(input_ids, None, mask=mask)
        else:
            if pixels is None:
                raise ValueError("images: the processor produced no pixel values for these images")
            out = self._merge(input_ids, pixels, mask, inputs, key)
        handled = _HANDLED - {"attention_mask_4d"} if self._reads_4d_mask else _HANDLED
        extras = sorted(k for k, v in out.to_dict().items() if v is not None and k not in handled)
        if extras:
            raise NotImplementedError(
                f"{self.model_type}: its language model needs {', '.join(extras)} at every step, which mlx-lm's "
                "decode loop cannot pass; use mlx_vlm.generate for this architecture"
            )
        embeddings = out.inputs_embeds[0]
        adapter = self.model
        if adapter.uses_mrope:
            positions, deltas = out.position_ids, out.rope_deltas
            if positions is None:
                positions, deltas = vlm.language_model.get_rope_index(input_ids, inputs.get("image_grid_thw"), None, mask)
            if positions.ndim == 2:  # text only: the same position on all three axes
                positions = mx.broadcast_to(positions[None], (3, *positions.shape))
            mx.eval(embeddings, positions, deltas)
            adapter.remember(ids, embeddings, positions[:, 0, :], int_list(mx.array(deltas))[0])
        mx.eval(embeddings)
        return embeddings

    def _merge(self, input_ids: mx.array, pixels: mx.array, mask: mx.array | None, inputs: dict[str, Any], key: tuple[str, ...]) -> Any:
        """mlx-vlm's merge of image features into the text embeddings, cached per image hash."""
        vlm = self.vlm
        where = mx.array([t in self.model.image_ids for t in int_list(input_ids)])
        rows = self._features.get(key) if self._splice_ok else None
        if rows is not None and rows.shape[0] == int_list(where.sum())[0]:
            self._features.move_to_end(key)
            self._hits += 1
            out = vlm.get_input_embeddings(input_ids, None, mask=mask)
            text = out.inputs_embeds[0]
            index = mx.maximum(mx.cumsum(where.astype(mx.int32)) - 1, 0)
            out.inputs_embeds = mx.where(where[:, None], rows[index], text)[None]
            if self.model.uses_mrope:
                out.position_ids, out.rope_deltas = vlm.language_model.get_rope_index(input_ids, inputs.get("image_grid_thw"), None, mask)
            return out
        self._misses += 1
        out = vlm.get_input_embeddings(input_ids, pixels, mask=mask, **inputs)
        merged = out.inputs_embeds[0]
        if self._splice_ok is None:  # check once that only placeholder rows differ from plain text
            text = vlm.get_input_embeddings(input_ids, None, mask=mask).inputs_embeds[0]
            self._splice_ok = bool(mx.array_equal(mx.where(where[:, None], 0, merged), mx.where(where[:, None], 0, text)).item())
        if self._splice_ok:
            import numpy as np

            rows = merged[mx.array(np.flatnonzero(np.array(where)))]
            mx.eval(rows)
            self._features[key] = rows
            while len(self._features) > _FEATURE_CACHE_SIZE:
                self._features.popitem(last=False)
        return out


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    # mlx-vlm passes tokenizer options loosely; transformers warns on every call.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_vision(name: str, path: Path, config: dict[str, Any], *, dtype: str | None = "auto", trust_remote_code: bool = False) -> VisionLM:
    """Load an mlx-vlm model folder as a ``VisionLM`` (called by ``nbllm.load``).

    Args:
        name: Hub id or folder name.
        path: Local model folder.
        config: Its parsed ``config.json``.
        dtype: As for ``nbllm.load``.
        trust_remote_code: Allow the processor's custom code to run.

    Returns:
        A ``VisionLM``.
    """
    from mlx_lm.utils import load_tokenizer
    from mlx_vlm.utils import load as vlm_load

    start = time.perf_counter()
    kwargs: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        with _quiet_transformers():
            vlm, processor = vlm_load(str(path), **kwargs)
    except ValueError as err:
        if "not supported" in str(err):
            raise ValueError(f"unsupported vision architecture {config.get('model_type')!r}: mlx-vlm has no model class for it") from None
        raise
    except (OSError, RuntimeError) as err:
        raise ValueError(f"could not read the model in {path} (corrupt or incomplete?): {str(err).splitlines()[0][:200]}") from None
    _cast(vlm, config, dtype)
    tokenizer = load_tokenizer(path, eos_token_ids=_eos_ids(path, config))
    return VisionLM(vlm, processor, tokenizer, config, name, path, time.perf_counter() - start)


def _eos_ids(path: Path, config: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    sources = [config.get("eos_token_id"), (config.get("text_config") or {}).get("eos_token_id")]
    gen = path / "generation_config.json"
    if gen.exists():
        try:
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    for value in sources:
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids
