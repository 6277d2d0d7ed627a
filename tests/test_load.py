"""nbllm.load: local folders, the hub path, LM.info, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import nbllm
from nbllm.testing import make_model


def test_info_describes_the_model(lm: nbllm.LM) -> None:
    info = lm.info
    assert info.architecture == "llama"
    assert info.parameters > 100_000
    assert info.vocab_size == lm.vocab_size == len(lm.tokenizer._tokenizer)
    assert info.context_length == 4096
    assert info.has_chat_template is True
    assert info.is_vision is False
    assert info.dtype == "float32"
    assert info.quantization_bits is None
    html = lm._repr_html_()
    assert "<table" in html and "llama" in html and str(info.parameters) in html


def test_every_fixture_architecture_loads(any_lm: nbllm.LM) -> None:
    assert any_lm.info.architecture in {"llama", "qwen3", "gemma3_text"}
    assert len(list(any_lm.encode("Hello").ids)) > 0


def test_half_precision_is_cast_to_fp32_on_cpu(tmp_path: Path) -> None:
    path = make_model(tmp_path / "bf16", "llama", dtype="bfloat16")
    assert nbllm.load(path).info.dtype == "float32"
    assert nbllm.load(path, dtype=None).info.dtype == "bfloat16"


def test_quantized_model_reports_bits(tmp_path: Path, model_dir: Path) -> None:
    from mlx_lm import convert

    out = tmp_path / "q4"
    convert(str(model_dir / "qwen3"), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32)
    info = nbllm.load(out).info
    assert info.quantization_bits == 4
    assert nbllm.load(out).generate("hi", max_tokens=3).tokens


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        nbllm.load(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no model folder"):
        nbllm.load("./relative/missing")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a model folder: expected config.json"):
        nbllm.load(tmp_path)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ValueError, match="expected a model folder, got a file"):
        nbllm.load(f)


def test_unsupported_architecture(tmp_path: Path, model_dir: Path) -> None:
    dst = tmp_path / "weird"
    shutil.copytree(model_dir / "llama", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "not_a_real_arch"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'not_a_real_arch'"):
        nbllm.load(dst)


def test_corrupt_weights(tmp_path: Path, model_dir: Path) -> None:
    dst = tmp_path / "corrupt"
    shutil.copytree(model_dir / "llama", dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        nbllm.load(dst)


def test_custom_code_needs_trust_remote_code(tmp_path: Path, model_dir: Path) -> None:
    dst = tmp_path / "custom"
    shutil.copytree(model_dir / "llama", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_file"] = "evil.py"
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "evil.py").write_text("raise SystemExit('must not run')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        nbllm.load(dst)


def test_hub_id_offline_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache: nothing to fall back to
    with pytest.raises(ConnectionError, match=r"offline\? pass a local path"):
        nbllm.load("mlx-community/definitely-not-cached-model")


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="dtype: expected"):
        nbllm.load(None, dtype="float64")


def test_fast_blas_is_loaded_on_linux() -> None:
    import sys

    from nbllm.blas import blas_status

    status = blas_status()
    if sys.platform.startswith("linux") and Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0").exists():
        assert status["loaded"] is True, status
    else:
        assert status["loaded"] is False


def test_importing_mlx_first_warns_that_fast_blas_is_off(model_dir: Path) -> None:
    import subprocess
    import sys

    if not (sys.platform.startswith("linux") and Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0").exists()):
        pytest.skip("fast BLAS applies to Linux with OpenBLAS installed")
    code = f"import mlx.core, nbllm; nbllm.load({str(model_dir / 'llama')!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "mlx.core was imported before nbllm, so the fast BLAS is off" in out.stderr
    ok = subprocess.run(
        [sys.executable, "-c", code.replace("import mlx.core, nbllm", "import nbllm, mlx.core")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fast BLAS is off" not in ok.stderr
