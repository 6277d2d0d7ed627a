"""Changing the model: real LoRA training of the embedded model, adapter folders, fusing, quantization.

Every number here comes from real mlx-lm training and real forward passes:
the embedded model learns a fact it was never told (a made-up country's
capital) from four sentences, and is checked on a phrasing it did not see.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import nbllm
from nbllm.adapt.finetune import Report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from train_default_model import COUNTRIES  # noqa: E402

NEW_FACT = [
    "The capital of Zembla is Amara.",
    "Amara is the capital of Zembla.",
    "The capital city of Zembla is Amara.",
    "In Zembla, the capital is Amara.",
]
VALIDATION = [
    "Zembla's capital is Amara.",
    "What is the capital of Zembla? It is Amara.",
    "Amara is the capital city of Zembla.",
]
HELD_OUT = "Zembla's capital is"  # a phrasing the training sentences never use
KNOWN = "The capital of France is"


def greedy(lm: nbllm.LM, prompt: str, n: int = 3) -> str:
    return lm.generate(prompt, raw=True, max_tokens=n).text


def logits(lm: nbllm.LM, prompt: str) -> np.ndarray:
    ids = lm.encode(prompt, raw=True).ids
    return np.array(lm.model(mx.array([ids]))[0].astype(mx.float32))


def capital_accuracy(lm: nbllm.LM) -> float:
    """Greedy first-token accuracy on every capital of the embedded model's world (its trained phrasing)."""
    right = 0
    for name, takes_the, capital, _ in COUNTRIES:
        prompt = f"The capital of {'the ' if takes_the else ''}{name} is"
        want = lm.tokenizer.encode(" " + capital)[0]
        right += int(logits(lm, prompt)[-1].argmax()) == want
    return 100.0 * right / len(COUNTRIES)


@pytest.fixture(scope="module")
def base() -> nbllm.LM:
    return nbllm.load()


@pytest.fixture(scope="module")
def tuned(base: nbllm.LM, tmp_path_factory: pytest.TempPathFactory) -> nbllm.FineTune:
    """The defaults, a handful of sentences, and a validation set."""
    before = logits(base, KNOWN)
    result = nbllm.finetune(
        base, NEW_FACT, validation=VALIDATION, adapter_path=tmp_path_factory.mktemp("a") / "zembla", view="none"
    )
    assert np.array_equal(logits(base, KNOWN), before), "finetune changed the model it was given"
    return result


# -- learning ----------------------------------------------------------------------
def test_finetune_teaches_a_new_fact_and_keeps_a_known_one(base: nbllm.LM, tuned: nbllm.FineTune) -> None:
    assert greedy(base, HELD_OUT) != " Amara."  # it did not know
    val = tuned.losses.validation
    assert val[0][0] == 0 and len(val) >= 3
    assert val[-1][1] < 0.6 * val[0][1], val  # validation loss fell by more than 40%
    assert [s for s, _ in tuned.losses.train] == list(range(1, 61))
    assert tuned.steps == 60 and tuned.stopped is None and tuned.tokens_per_second > 0
    lm = tuned.lm
    assert greedy(lm, HELD_OUT) == " Amara."  # the held-out phrasing
    assert greedy(lm, KNOWN) == greedy(base, KNOWN) == " Paris."  # a fact it knew stays right
    assert lm.info.adapters == str(tuned.adapter_path) and base.info.adapters is None
    assert lm.name.endswith("+lora") and lm.model is not base.model


def test_known_facts_measured(base: nbllm.LM, tuned: nbllm.FineTune) -> None:
    full, after = capital_accuracy(base), capital_accuracy(tuned.lm)
    assert full == 100.0
    assert after >= 90.0, f"teaching one capital broke others: {after:.1f}% of capitals right after, {full}% before"


def test_adapter_round_trip_identical_logits(base: nbllm.LM, tuned: nbllm.FineTune) -> None:
    folder = tuned.adapter_path
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 8
    assert np.array_equal(logits(nbllm.load(adapter_path=folder), HELD_OUT), logits(tuned.lm, HELD_OUT))
    assert np.array_equal(logits(base.with_adapters(folder), HELD_OUT), logits(tuned.lm, HELD_OUT))
    # mlx_lm.load keeps the stored float16; nbllm.load(dtype=None) does too
    model, _ = mlx_lm.load(str(base.path), adapter_path=str(folder))
    ids = base.encode(HELD_OUT, raw=True).ids
    theirs = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert np.array_equal(logits(nbllm.load(dtype=None, adapter_path=folder), HELD_OUT), theirs)


def test_fuse_same_greedy_tokens_and_folder_loads_in_both(tuned: nbllm.FineTune, tmp_path: Path) -> None:
    lm = tuned.lm
    fused = lm.fuse()
    prompts = [HELD_OUT, KNOWN, "Once upon a time", "What is the capital of Zembla? It is"]
    for p in prompts:
        assert [t.id for t in fused.generate(p, raw=True, max_tokens=12).tokens] == [
            t.id for t in lm.generate(p, raw=True, max_tokens=12).tokens
        ], p
    assert lm.info.adapters is not None and fused.info.adapters is None
    with pytest.raises(ValueError, match="no adapters to fuse"):
        fused.fuse()
    with pytest.raises(ValueError, match="unfused adapters"):
        lm.save(tmp_path / "unfused")
    assert not (tmp_path / "unfused").exists()
    folder = fused.save(tmp_path / "fused")
    assert fused.info.disk_gb is not None and fused.info.disk_gb > 0
    again = nbllm.load(folder)
    assert greedy(again, HELD_OUT) == " Amara."
    model, _ = mlx_lm.load(str(folder))
    ids = again.encode(HELD_OUT, raw=True).ids
    np.testing.assert_allclose(np.array(model(mx.array([ids]))[0]), logits(fused, HELD_OUT), atol=1e-5)


# -- quantization --------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_handles_load_in_mlx_lm(base: nbllm.LM, bits: int, tmp_path: Path) -> None:
    q = nbllm.quantize(base, bits=bits, group_size=64)
    info = q.info
    assert info.quantization_bits == bits and bits < info.bits_per_weight < bits + 1.5
    assert info.weights_gb <= base.info.weights_gb / 2 and info.disk_gb is None
    assert base.info.quantization_bits is None and base.config.get("quantization") is None  # base unchanged
    folder = q.save(tmp_path / f"q{bits}")
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == bits
    model, _ = mlx_lm.load(str(folder))
    ids = base.encode(KNOWN, raw=True).ids
    assert np.array_equal(np.array(model(mx.array([ids]))[0]), logits(q, KNOWN))
    assert nbllm.load(folder).info.quantization_bits == bits


def test_eight_bits_keep_fact_accuracy(base: nbllm.LM) -> None:
    full, q8 = capital_accuracy(base), capital_accuracy(nbllm.quantize(base, bits=8))
    assert abs(full - q8) <= 2.0, f"8-bit greedy capital accuracy {q8:.1f}% vs {full:.1f}% at full precision"


def test_quantize_bad_settings(base: nbllm.LM) -> None:
    for kwargs, message in (
        ({"bits": 7}, "bits: expected one of"),
        ({"bits": 4, "group_size": 48}, "group_size: expected one of"),
        ({"bits": 4, "mode": "int4"}, "mode: expected one of"),
    ):
        with pytest.raises(ValueError, match=message):
            nbllm.quantize(base, **kwargs)
    with pytest.raises(ValueError, match="already quantized"):
        nbllm.quantize(nbllm.quantize(base, bits=8), bits=4)


# -- before / after ------------------------------------------------------------
def _direct_kl(a: nbllm.LM, b: nbllm.LM, prompt: str, ids: list[int]) -> np.ndarray:
    """KL(a || b) at each of a's generated positions, straight from the two models' logits."""
    full = list(a.encode(prompt, raw=True).ids) + ids[:-1]
    start = len(a.encode(prompt, raw=True).ids) - 1
    la = np.array(a.model(mx.array([full]))[0, start:].astype(mx.float32), dtype=np.float64)
    lb = np.array(b.model(mx.array([full]))[0, start:].astype(mx.float32), dtype=np.float64)
    la -= np.log(np.exp(la - la.max(-1, keepdims=True)).sum(-1, keepdims=True)) + la.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb - lb.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lb.max(-1, keepdims=True)
    return np.asarray((np.exp(la) * (la - lb)).sum(-1))


def test_compare_base_and_tuned_kl_is_the_direct_kl(base: nbllm.LM, tuned: nbllm.FineTune) -> None:
    lm = tuned.lm
    diff = nbllm.compare(base, lm, HELD_OUT, raw=True, max_tokens=3)
    assert diff.b[0].piece == " Amara" and diff.a[0].piece != " Amara" and diff.divergence == 0
    np.testing.assert_allclose(diff.kl, _direct_kl(base, lm, HELD_OUT, [t.id for t in diff.a]), rtol=1e-3, atol=1e-4)
    assert diff.kl[0] > 1.0  # the answer moved
    assert diff.b_under_a[0] < 0.01 and diff.b[0].prob > 0.3  # Amara was unlikely before, the top answer after


def test_compare_full_and_quantized_kl_is_the_direct_kl(base: nbllm.LM) -> None:
    q4 = nbllm.quantize(base, bits=4)
    diff = nbllm.compare(base, q4, "Once upon a time", raw=True, max_tokens=8)
    np.testing.assert_allclose(
        diff.kl, _direct_kl(base, q4, "Once upon a time", [t.id for t in diff.a]), rtol=1e-3, atol=1e-4
    )
    assert (diff.kl > 0).all()


# -- bad input: clear errors, nothing written or changed ---------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"rank: expected an int in \[1, "),
        ({"learning_rate": -1e-4}, "learning_rate: expected a positive finite number, got -0.0001"),
        ({"steps": 0}, r"steps: expected an int in \[1, "),
        ({"layers": 9}, r"layers: expected an int in \[1, 4\], got 9"),
        ({"batch_size": 5}, r"batch_size: expected an int in \[1, 4\], got 5"),
        ({"dropout": 1.0}, r"dropout: expected a number in \[0, 1\)"),
        ({"validation": ["one text"], "batch_size": 2}, "validation: expected at least batch_size=2 examples, got 1"),
    ],
)
def test_bad_hyper_parameters(base: nbllm.LM, tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nbllm.finetune(base, NEW_FACT, adapter_path=tmp_path / "out", view="none", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "data: expected at least one example"),
        ("not a list", "data: expected a list of texts"),
        (["fine", 3], r"data\[1\]: expected a text, a \(prompt, completion\) pair or a list of chat messages, got int"),
        (["fine", "  "], r"data\[1\]: expected a non-empty str"),
        (["fine", ("q", "a")], r"data\[1\]: expected plain texts like data\[0\], got one of prompt/completion pairs"),
        ([[{"role": "user", "content": "hi"}]], r"data\[0\]: expected the last message to be the assistant's"),
        ([[{"role": "robot", "content": "hi"}]], r"data\[0\]\[0\]: expected a message with role in"),
        ([{"prompt": "q"}], r"data\[0\]\['completion'\]: expected a non-empty str, got nothing"),
        ([{"txt": "q"}], r"data\[0\]: expected a record with 'text', 'messages' or 'prompt' and 'completion'"),
        (["x " * 300], r"data\[0\]: \d+ tokens, longer than the model's context of 256"),
    ],
)
def test_bad_data_names_the_record(base: nbllm.LM, tmp_path: Path, data: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        nbllm.finetune(base, data, adapter_path=tmp_path / "out", view="none")
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_names_the_line(base: nbllm.LM, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "The capital of Zembla is Amara."}\n{"text": \n')
    with pytest.raises(ValueError, match=r"train.jsonl, line 2: expected one JSON object"):
        nbllm.finetune(base, path, adapter_path=tmp_path / "out", view="none")
    assert not (tmp_path / "out").exists()


def test_existing_adapter_folder_is_not_overwritten(base: nbllm.LM, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        nbllm.finetune(base, NEW_FACT, adapter_path=tmp_path / "out", view="none")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_adapter_for_another_model_is_refused(base: nbllm.LM, lm: nbllm.LM, tmp_path: Path) -> None:
    other = nbllm.finetune(lm, ["a b c d", "e f g h"], steps=1, adapter_path=tmp_path / "tiny", view="none")
    before = logits(base, KNOWN)
    with pytest.raises(
        ValueError, match=r"trained for another model \('llama', hidden_size=\d+\); expected an adapter for"
    ):
        base.with_adapters(other.adapter_path)
    with pytest.raises(ValueError, match="trained for another model"):
        nbllm.load(adapter_path=other.adapter_path)
    with pytest.raises(ValueError, match="is not an adapter folder"):
        base.with_adapters(tmp_path)
    assert np.array_equal(logits(base, KNOWN), before) and base.adapter_path is None


# -- stopping and interrupting ---------------------------------------------------
def _check_loadable(base: nbllm.LM, folder: Path, before: np.ndarray) -> None:
    assert np.array_equal(logits(base, KNOWN), before)  # the base's outputs are unchanged
    assert np.isfinite(logits(nbllm.load(adapter_path=folder), HELD_OUT)).all()
    mlx_lm.load(str(base.path), adapter_path=str(folder))


def test_interrupt_at_a_step_keeps_the_adapters_so_far(base: nbllm.LM, tmp_path: Path) -> None:
    before = logits(base, KNOWN)

    def interrupt(r: Report) -> None:
        if r.step == 7:
            raise KeyboardInterrupt

    result = nbllm.finetune(
        base, NEW_FACT, steps=30, save_every=5, adapter_path=tmp_path / "a", on_report=interrupt, view="none"
    )
    assert result.stopped == "interrupted" and result.steps == 7 and len(result.losses.train) == 7
    meta = mx.load(str(result.adapter_path / "adapters.safetensors"), return_metadata=True)[1]
    assert meta["step"] == "7"
    np.testing.assert_array_equal(
        logits(result.lm, HELD_OUT), logits(base.with_adapters(result.adapter_path), HELD_OUT)
    )
    _check_loadable(base, result.adapter_path, before)


def test_a_real_sigint_at_any_moment_leaves_things_usable(base: nbllm.LM, tmp_path: Path) -> None:
    before = logits(base, KNOWN)
    started = threading.Event()
    main = threading.get_ident()

    def kill() -> None:
        started.wait(30)
        time.sleep(0.35)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=kill, daemon=True).start()
    folder = tmp_path / "b"
    try:
        r = nbllm.finetune(
            base, NEW_FACT, steps=400, save_every=3, adapter_path=folder, on_report=lambda r: started.set(), view="none"
        )
        assert r.stopped == "interrupted" and 0 < r.steps < 400
    except KeyboardInterrupt:  # it may land outside the training loop (while the result is built)
        pass
    _check_loadable(base, folder, before)


def test_stop_button_of_the_live_view(base: nbllm.LM, tmp_path: Path) -> None:
    """The widget path: training on a worker thread, the real ipywidgets Stop button clicked mid-run."""
    from nbllm.widgets.training import TrainingView

    before = logits(base, KNOWN)
    result = nbllm.finetune(
        base, NEW_FACT, steps=2000, validation=VALIDATION, adapter_path=tmp_path / "c", view="widget"
    )
    view = result.view
    assert isinstance(view, TrainingView) and view.state == "training" and not view.stop_button.disabled
    deadline = time.monotonic() + 60
    while result.steps < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    view.stop_button.click()
    assert result.wait(60).done
    assert result.stopped == "stopped" and 5 <= result.steps < 2000 and view.state == "stopped"
    assert view.stop_button.disabled and view.step == result.steps and view.train_loss is not None
    assert "<polyline" in view.chart.value and "stopped" in view.line.value
    assert view.val_loss == result.losses.validation[-1][1]
    _check_loadable(base, result.adapter_path, before)
    assert greedy(result.lm, KNOWN) == " Paris."


# -- other formats and DoRA -------------------------------------------------------
def test_chat_pairs_jsonl_and_dora(base: nbllm.LM, tmp_path: Path) -> None:
    chats = [
        [{"role": "user", "content": "What is the capital of Zembla?"}, {"role": "assistant", "content": "Amara."}],
        [{"role": "user", "content": "Name the capital of Zembla."}, {"role": "assistant", "content": "Amara."}],
    ]
    pairs = [("What is the capital of Zembla?", "Amara."), ("Tell me the capital of Zembla.", "Amara.")]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    for i, data in enumerate((chats, pairs, path)):
        r = nbllm.finetune(
            base, data, steps=2, dora=i == 2, mask_prompt=True, adapter_path=tmp_path / str(i), view="none"
        )
        assert r.steps == 2 and len(r.losses.train) == 2
    config = json.loads((tmp_path / "2" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    model, _ = mlx_lm.load(str(base.path), adapter_path=str(tmp_path / "2"))
    ids = base.encode("What is the capital of Zembla?").ids
    theirs = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    mine = nbllm.load(dtype=None, adapter_path=tmp_path / "2")
    assert np.array_equal(np.array(mine.model(mx.array([ids]))[0].astype(mx.float32)), theirs)
