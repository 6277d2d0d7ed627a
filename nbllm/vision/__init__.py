"""Vision-language models through the same engine as text models.

``model`` holds ``VisionLM`` (prompts with images) and ``load_vision``;
``embed`` the merged embeddings and the per-image feature cache; ``adapter``
mlx-vlm's language model behind mlx-lm's call, and the engine that feeds it;
``images`` reading image sources and placing them in chat messages.
"""

from .embed import ImageCacheStats
from .images import load_image
from .model import VisionLM, load_vision

__all__ = ["VisionLM", "ImageCacheStats", "load_vision", "load_image"]
