"""Tiny random-weight vision-language models built offline, for tests and benchmarks.

Each model is made with mlx-vlm's own architecture classes, a real byte-level
BPE tokenizer carrying the architecture's special tokens and a chat template
that renders image parts the way the real checkpoints do, and the image
processor configuration the real checkpoints ship. Saved in the Hugging Face /
MLX folder layout, it goes through the real ``nbllm.load`` and
``mlx_vlm.load`` paths. The weights are random: the text is noise, the
machinery (image processing, placeholder expansion, merged embeddings, mRoPE,
sliding-window caches) is real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .text import build_tokenizer
from .vision_specs import VISION_ARCHITECTURES

__all__ = ["VISION_ARCHITECTURES", "make_vision_model", "make_image"]


def make_image(width: int = 64, height: int = 48, seed: int = 0) -> Any:
    """A small deterministic RGB test image (smooth gradients plus noise).

    Returns:
        A ``PIL.Image.Image``.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    pixels = (base + rng.integers(0, 60, size=base.shape)).clip(0, 255).astype("uint8")
    return Image.fromarray(pixels, "RGB")


def make_vision_model(
    path: str | Path,
    arch: str = "qwen2_vl",
    *,
    seed: int = 0,
    vocab_size: int = 512,
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Build a tiny random-weight vision-language model folder.

    Args:
        path: Folder to create (reused if it already holds a model).
        arch: One of ``VISION_ARCHITECTURES`` (``qwen2_vl``, ``qwen2_5_vl``, ``gemma3``, ``qwen3_vl``).
        seed: Seed for the random weights.
        vocab_size: Target BPE vocabulary size.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the stored weights.
        overrides: Extra top-level config fields (e.g. ``max_position_embeddings``).

    Returns:
        The folder path, loadable by ``nbllm.load`` and ``mlx_vlm.load``.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    if arch not in VISION_ARCHITECTURES:
        raise ValueError(f"arch: expected one of {sorted(VISION_ARCHITECTURES)}, got {arch!r}")
    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    spec = VISION_ARCHITECTURES[arch]
    tokenizer = build_tokenizer(
        path,
        vocab_size,
        specials=spec["specials"],
        bos=spec["bos"],
        eos=spec["eos"],
        pad=spec["pad"],
        template=spec["template"],
        extra_special_tokens=spec.get("extra_special_tokens", {}),
    )

    config = json.loads(json.dumps(spec["config"]))
    config.update(overrides or {})
    vocab = len(tokenizer)
    config["vocab_size"] = vocab
    if "text_config" in config:
        config["text_config"]["vocab_size"] = vocab
    for key, token in spec["token_ids"].items():
        config[key] = tokenizer.convert_tokens_to_ids(token)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in spec.get("stop", [spec["eos"]])]
    config["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    for name, content in spec["files"].items():
        (path / name).write_text(json.dumps(content, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))

    # Build the config objects the way mlx_vlm.load_model does.
    module, _ = get_model_and_args(dict(config))
    cfg = json.loads(json.dumps(config))
    for part in ("text_config", "vision_config", "audio_config"):
        cfg.setdefault(part, {})
    model_config = module.ModelConfig.from_dict(cfg)
    model_config = update_module_configs(
        model_config, module, cfg, ["text", "vision", "perceiver", "projector", "audio"]
    )
    mx.random.seed(seed)
    model = module.Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    # Default init gives near-uniform next-token distributions; a larger output
    # layer makes them peaked and varied, more like a trained model's.
    for key in [k for k in weights if k.endswith("lm_head.weight")]:
        weights[key] = weights[key] * 6.0
    target = getattr(mx, dtype)
    weights = {k: v.astype(target) for k, v in weights.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path
