"""Tiny random-weight models built offline, for tests, benchmarks and demos.

``make_model`` (text: mlx-lm's llama, qwen3, gemma3 classes) and
``make_vision_model`` (mlx-vlm's qwen2_vl, qwen2_5_vl, gemma3, qwen3_vl) write a
model folder with a real byte-level BPE tokenizer; ``make_image`` draws a test
picture; ``build_tokenizer`` trains and saves the tokenizer alone.
"""

from .text import ARCHITECTURES, BENCH_SHAPE, CHAT_TEMPLATE, build_tokenizer, make_model, sample_corpus
from .vision import VISION_ARCHITECTURES, make_image, make_vision_model

__all__ = [
    "make_model",
    "make_vision_model",
    "make_image",
    "build_tokenizer",
    "sample_corpus",
    "ARCHITECTURES",
    "BENCH_SHAPE",
    "VISION_ARCHITECTURES",
    "CHAT_TEMPLATE",
]
