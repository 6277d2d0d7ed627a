"""Tiny random-weight models built offline, for tests, benchmarks and demos.

Each model is made with mlx-lm's own architecture classes and a real
byte-level BPE tokenizer from the ``tokenizers`` library, then saved in the
usual Hugging Face / MLX folder layout so it goes through the real ``load``
path. The weights are random: the text is noise, the machinery is real.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHITECTURES",
    "BENCH_SHAPE",
    "SMOLLM2_135M",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "make_model",
    "sample_corpus",
]

# ChatML, the template most small open models use; supports a system turn and
# add_generation_prompt like real checkpoints do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "model",
    "token",
    "cache",
    "prompt",
    "sample",
    "logit",
    "probability",
    "temperature",
    "capital",
    "France",
    "Paris",
    "Italy",
    "Rome",
    "Spain",
    "Madrid",
    "Japan",
    "Tokyo",
    "river",
    "mountain",
    "city",
    "red",
    "green",
    "blue",
    "yellow",
    "cat",
    "dog",
    "bird",
    "sings",
    "barks",
    "meows",
    "apple",
    "banana",
    "café",
    "naïve",
    "über",
    "東京",
    "смысл",
    "🙂",
    '{"name":',
    '"value",',
    '"n":',
    "42}",
    "[1,",
    "2,",
    "3]",
    "Hello",
    "world!",
    "How",
    "are",
    "you?",
    "I",
    "am",
    "fine,",
    "thank",
    "you.",
    "What",
    "is",
    "the",
    "answer?",
]

# Small shapes: a forward pass costs well under a millisecond of compute, so
# tests exercise the real code paths in seconds.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "qwen3": {
        "model_type": "qwen3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "sliding_window": 512,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 4096,
    },
}


# A 25.7M-parameter llama: big enough that compute, not Python, dominates a decode step (benchmarks).
BENCH_SHAPE: dict[str, Any] = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}

# SmolLM2-135M(-Instruct)'s config.json, less the token ids: the real model's shape (speed benchmarks).
SMOLLM2_135M: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


def sample_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Return ``n_lines`` of varied text (ASCII, accents, CJK, emoji, JSON)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n_lines)]


def build_tokenizer(
    path: Path,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
    *,
    specials: Sequence[str] = SPECIAL_TOKENS,
    bos: str | None = None,
    eos: str = "<|im_end|>",
    pad: str = "<|endoftext|>",
    template: str = CHAT_TEMPLATE,
    extra_special_tokens: dict[str, str] | None = None,
) -> Any:
    """Train a byte-level BPE tokenizer and save it, with a chat template, at ``path``.

    The keyword arguments set the special tokens and template (ChatML by
    default; vision fixtures pass their model family's).

    Returns:
        The ``transformers.PreTrainedTokenizerFast`` that was saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or sample_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        **({"extra_special_tokens": extra_special_tokens} if extra_special_tokens is not None else {}),
    )
    fast.chat_template = template
    fast.save_pretrained(str(path))
    return fast


def make_model(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int = 512,
    dtype: str = "float32",
    chat_template: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Build a tiny random-weight model folder loadable by ``mlx_lm.load``.

    Args:
        path: Folder to create (reused if it already holds a model).
        arch: One of ``ARCHITECTURES`` (``llama``, ``qwen3``, ``gemma3``).
        seed: Seed for the random weights.
        vocab_size: Target BPE vocabulary size.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the stored weights.
        chat_template: Whether the tokenizer carries a chat template.
        overrides: Extra config fields (e.g. larger ``hidden_size`` for benchmarks).

    Returns:
        The folder path.
    """
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown fixture architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, vocab_size=vocab_size)
    if not chat_template:
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("chat_template", None)
        cfg_file.write_text(json.dumps(cfg, indent=2))
        (path / "chat_template.jinja").unlink(missing_ok=True)

    config = dict(ARCHITECTURES[arch], **(overrides or {}))
    config["vocab_size"] = len(tokenizer)
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    args = module.ModelArgs.from_dict(config)
    mx.random.seed(seed)
    model = module.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    # mlx's default init gives near-uniform next-token distributions; a larger
    # output layer makes them peaked and varied, more like a trained model's.
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = weights["lm_head.weight"] * 6.0
    target = getattr(mx, dtype)
    weights = {k: v.astype(target) for k, v in weights.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
