"""Changing the model: LoRA / DoRA fine-tuning, adapter folders, fusing and quantization, over mlx-lm.

``finetune`` (``finetune.py``) trains adapters with mlx-lm's trainer (``result.py``: its records); ``data.py``
checks the examples; ``adapters.py`` reads and writes adapter folders and
derives new handles (with adapters, fused, saved); ``quantize.py`` quantizes
with mlx-lm's ``quantize_model``. Every function returns a new handle: the one
it was given is never changed.
"""

from .adapters import fuse, save_folder, with_adapters
from .finetune import FineTune, Losses, Report, finetune
from .quantize import quantize

__all__ = ["finetune", "FineTune", "Losses", "Report", "with_adapters", "fuse", "save_folder", "quantize"]
