"""A llama-architecture model folder written as GGUF, for testing against llama.cpp's server offline.

No torch and no hub: the safetensors weights and the byte-level BPE tokenizer
go straight into the file with the ``gguf`` package (llama.cpp's own Python
writer, on PyPI). It writes what llama.cpp's ``convert_hf_to_gguf.py`` writes
for such a model: the same keys, q/k rows permuted for GGML's RoPE layout,
1-D norms in float32. Only what nbllm's own models use is handled (llama,
byte-level BPE with the GPT-2 split); anything else is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_gguf"]

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def write_gguf(folder: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """Write the llama model in ``folder`` to ``out`` (``dtype``: ``f16`` or ``f32`` for the matrices).

    Raises:
        ValueError: Not a llama with a byte-level BPE tokenizer (what this writer knows).
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    if config.get("model_type") != "llama" or config.get("rope_scaling"):
        raise ValueError(f"write_gguf: expected a llama model without rope scaling, got {config.get('model_type')!r}")
    if tok["model"]["type"] != "BPE" or tok.get("pre_tokenizer") != _BYTE_LEVEL:
        raise ValueError("write_gguf: expected a byte-level BPE tokenizer with the GPT-2 split")
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype: expected 'f16' or 'f32', got {dtype!r}")

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type("model")
    writer.add_name(folder.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, gguf, config, tok, tok_config)

    weights = load_file(str(folder / "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    matrix = np.float16 if dtype == "f16" else np.float32
    for name in sorted(weights):
        array = weights[name]
        if name.endswith("q_proj.weight"):
            array = _rope_rows(array, heads)
        elif name.endswith("k_proj.weight"):
            array = _rope_rows(array, kv_heads)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"write_gguf: no GGUF name for tensor {name!r}")
        writer.add_tensor(target, np.ascontiguousarray(array.astype(np.float32 if array.ndim == 1 else matrix)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _rope_rows(w: Any, heads: int) -> Any:
    """Hugging Face's rotate-half q/k row order as GGML's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(writer: Any, gguf: Any, config: dict[str, Any], tok: dict[str, Any], tok_config: dict[str, Any]) -> None:
    by_id = {i: s for s, i in tok["model"]["vocab"].items()}
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, kinds = [], []
    for i in range(config["vocab_size"]):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            kinds.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            kinds.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 split ("gpt2" fails to load)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    eos = config["eos_token_id"]
    index = {t: i for i, t in enumerate(tokens)}
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(index.get(str(tok_config.get("eos_token")), eos[0] if isinstance(eos, list) else eos))
    if config.get("pad_token_id") is not None:
        writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])
