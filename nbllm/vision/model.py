"""``VisionLM``: a vision-language model whose prompts carry images, run by the same engine as text.

``encode`` runs the image processor and the vision tower once and returns a
``Prompt`` holding the merged image+text input embeddings (and mRoPE
positions for Qwen-VL). Decoding is mlx-lm's loop over ``LanguageAdapter``,
so samplers, alternatives, structured output, the stepper and prompt-cache
reuse work for images exactly as for text. Architectures whose language
model needs more than embeddings (and mRoPE positions) at every step need
mlx-vlm's own loop and are refused by name: Qwen3-VL (deepstack visual
features), Gemma 3n (per-layer inputs), Llama 3.2 Vision (cross attention),
Falcon-OCR (a 4D attention mask), encoder-decoders like Florence-2.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..folder import cast_weights, load_tokenizer
from ..mlx_engine import MLXEngine, generation_stream
from ..model import LM
from ..prompt import Prompt
from .adapter import LanguageAdapter, VisionEngine, image_token_ids, int_list
from .embed import ImageCacheStats, ImageFeatures
from .images import format_messages, image_digest, load_image

__all__ = ["VisionLM", "load_vision"]


class VisionLM(LM):
    """A vision-language model: an ``LM`` whose prompts can carry images.

    ``lm.encode(prompt, images=...)``, ``lm.stream``, ``lm.generate``,
    ``lm.stepper`` and chat take ``images=``: one image or a list (path, URL,
    PIL image, numpy array, bytes). Chat messages may also hold images as
    content parts (``{"type": "image", "image": source}``); images given with
    ``images=`` go into the first user message, so follow-up turns keep the
    same prefix.

    Attributes:
        vlm: The mlx-vlm model (vision tower, projector, language model).
        processor: The mlx-vlm / transformers processor.
        max_images: Most images per prompt (``None``: limited by context only).
    """

    def __init__(
        self,
        vlm: Any,
        processor: Any,
        tokenizer: Any,
        config: dict[str, Any],
        name: str,
        path: Path,
        load_seconds: float = 0.0,
        stored_dtype: str | None = None,
        loader: Any = None,
    ):
        from mlx_vlm.prompt_utils import SINGLE_IMAGE_ONLY_MODELS

        self.vlm = vlm
        self.processor = processor
        self.model_type = str(vlm.config.model_type)
        self.max_images: int | None = 1 if self.model_type in SINGLE_IMAGE_ONLY_MODELS else None
        adapter = LanguageAdapter(vlm)
        self._features = ImageFeatures(vlm, adapter.image_ids, adapter.uses_mrope)
        super().__init__(adapter, tokenizer, config, name, path, load_seconds, stored_dtype, loader)

    def _make_engine(self) -> MLXEngine:
        return VisionEngine(self.model, self.tokenizer, self.vocab_size)

    @property
    def is_vision(self) -> bool:
        return True

    @property
    def image_cache(self) -> ImageCacheStats:
        """Entries, hits and misses of the image feature cache (keyed by image content)."""
        return self._features.stats

    def clear_image_cache(self) -> None:
        """Forget cached image features (the next prompt with images runs the vision tower)."""
        self._features.clear()

    @property
    def image_marker(self) -> str:
        """The text marker the processor expands into an image's placeholder tokens."""
        proc = self.processor
        return str(getattr(proc, "boi_token", None) or getattr(proc, "image_token", None) or "<image>")

    # -- the image steps of LM.encode ------------------------------------------
    def _from_ids(self, ids: list[int], images: list[Any]) -> Prompt:
        """Token ids, with image placeholders already expanded or one marker token per image to expand."""
        base = LM._from_ids(self, ids, [])
        if not images:
            return self._prompt(list(base.ids), [], {}, True)
        pictures = self._load(images)
        joint_ids, inputs = self._tokenize(self.image_marker * len(pictures), pictures, False)
        placeholder = self.model.image_ids
        need, have = sum(t in placeholder for t in joint_ids), sum(t in placeholder for t in ids)
        if have != need:
            marker = self.tokenizer.convert_tokens_to_ids(self.image_marker)
            spots = [i for i, t in enumerate(ids) if t == marker]
            if len(spots) != len(pictures):
                raise ValueError(
                    f"prompt: expected token ids with one {self.image_marker!r} per image or {need} image tokens "
                    f"for {len(pictures)} image(s), got {len(spots)} and {have}; build them with lm.encode(prompt, images=...)"
                )
            for spot, image in reversed(list(zip(spots, pictures))):  # expand each marker as the processor does
                ids = ids[:spot] + self._tokenize(self.image_marker, [image], False)[0] + ids[spot + 1 :]
        inputs["attention_mask"] = mx.ones((1, len(ids)), dtype=mx.int32)  # these ids' mask, not the marker's
        return self._prompt(ids, pictures, inputs, True)

    def _from_text(self, text: str, images: list[Any]) -> Prompt:
        pictures = self._load(images)
        found = text.count(self.image_marker)
        if pictures and found != len(pictures):
            raise ValueError(
                f"prompt: with raw=True put one {self.image_marker!r} marker per image in the text; "
                f"expected {len(pictures)}, got {found}"
            )
        bos = self.tokenizer.bos_token
        ids, inputs = self._tokenize(text, pictures, bos is None or not text.startswith(bos))
        return self._prompt(ids, pictures, inputs, True)

    def _from_messages(self, messages: list[dict[str, Any]], images: list[Any]) -> Prompt:
        from mlx_vlm.prompt_utils import get_chat_template
        from mlx_vlm.utils import should_add_special_tokens

        formatted, sources = format_messages(self.model_type, messages, images)
        pictures = self._load(sources)
        with _quiet_transformers():
            text = get_chat_template(self.processor, formatted, add_generation_prompt=True)
        ids, inputs = self._tokenize(text, pictures, should_add_special_tokens(self.model_type, self.processor))
        return self._prompt(ids, pictures, inputs, False)

    # -- internals ---------------------------------------------------------------
    def _load(self, sources: list[Any]) -> list[Any]:
        if self.max_images is not None and len(sources) > self.max_images:
            raise ValueError(
                f"images: {self.name} takes at most {self.max_images} image(s) per prompt, got {len(sources)}"
            )
        return [load_image(s) for s in sources]

    def _tokenize(self, text: str, images: list[Any], special: bool) -> tuple[list[int], dict[str, Any]]:
        """The processor's token ids for ``text`` with ``images`` (placeholders expanded) and its other outputs."""
        from mlx_vlm.utils import prepare_inputs

        try:
            with _quiet_transformers():
                inputs = prepare_inputs(
                    self.processor,
                    images=images or None,
                    prompts=text,
                    add_special_tokens=special,
                    image_token_index=min(image_token_ids(self.vlm.config), default=None),
                )
        except ValueError as err:
            raise ValueError(f"images: the processor rejected the input: {str(err).splitlines()[0][:200]}") from None
        ids = int_list(inputs.pop("input_ids")[0])
        if not ids:
            raise ValueError("prompt: expected at least one token, got an empty prompt")
        return ids, dict(inputs)

    def _prompt(self, ids: list[int], images: list[Any], inputs: dict[str, Any], continuation: bool) -> Prompt:
        digests = tuple(image_digest(i) for i in images)
        with mx.stream(generation_stream()):
            out = self._features.embed(
                ids, inputs if images else {"attention_mask": inputs.get("attention_mask")}, digests
            )
        return Prompt(tuple(ids), continuation, out.embeddings, digests, out.positions, out.rope_delta)


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


def load_vision(
    name: str,
    path: Path,
    config: dict[str, Any],
    *,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    loader: Any = None,
) -> VisionLM:
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
    from mlx_vlm.utils import load as vlm_load

    start = time.perf_counter()
    tokenizer = load_tokenizer(path, _eos_ids(path, config))
    kwargs: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        with _quiet_transformers():
            vlm, processor = vlm_load(str(path), **kwargs)
    except ValueError as err:
        if "not supported" in str(err):
            raise ValueError(
                f"unsupported vision architecture {config.get('model_type')!r}: mlx-vlm has no model class for it"
            ) from None
        raise
    except (OSError, RuntimeError) as err:
        raise ValueError(
            f"could not read the model in {path} (corrupt or incomplete?): {str(err).splitlines()[0][:200]}"
        ) from None
    stored = cast_weights(vlm, config, dtype)
    return VisionLM(vlm, processor, tokenizer, config, name, path, time.perf_counter() - start, stored, loader)


def _eos_ids(path: Path, config: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    sources = [config.get("eos_token_id"), (config.get("text_config") or {}).get("eos_token_id")]
    gen = path / "generation_config.json"
    if gen.exists():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):  # a damaged extra file: use the others
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids
