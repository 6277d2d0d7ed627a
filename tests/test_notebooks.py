"""The teaching notebooks: committed clean, each runs top to bottom in a fresh kernel, and shows what it says.

Execution goes through ``nbllm.lab.execute_notebook`` (what ``nbllm lab --execute``
runs), on the embedded models, offline. After a notebook's own cells, a probe cell
reads its results (the greedy text, the probability of " Paris", the schema
value, the effect of a stepper choice, the cache's reuse count...) and the test
compares them with the values expected here; ``SHOWN`` lists text the cells must
print. No timing asserts: per-notebook times are printed by ``nbllm lab
--execute`` and ``scripts/check_binder``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import pytest

from nbllm.lab import execute_notebook, list_notebooks, notebooks_dir

NOTEBOOKS = list_notebooks(notebooks_dir())
TEACHING = [
    "01_first_tokens.ipynb",
    "02_next_token_distributions.ipynb",
    "03_decoding_loop.ipynb",
    "04_kv_cache.ipynb",
    "05_structured_output.ipynb",
    "06_chat.ipynb",
    "07_vision.ipynb",
    "08_beyond_one_machine.ipynb",
    "09_inside_the_model.ipynb",
    "10_surprise_and_comparison.ipynb",
    "11_speculative_decoding.ipynb",
    "12_teach_the_model.ipynb",
]
MARK = "NBLLM-PROBE "
# Per notebook: an expression over the notebook's variables, evaluated after its last cell.
PROBES: dict[str, str] = {
    "01_first_tokens": """{
        "pieces": [lm.decode([i]) for i in ids],
        "first": [tokens[0].piece, round(tokens[0].prob, 2)],
        "continuation": "".join(t.text for t in tokens),
        "ends_with_eos": tokens[-1].special and tokens[-1].finish_reason == "stop",
        "cut": [cut.text, cut.finish_reason],
        "story_seeded": story.text,
        "mia": completion.text,
    }""",
    "02_next_token_distributions": """{
        "fact_top": [lm.decode([int(np.argmax(fact))]), round(float(np.exp(fact.max())), 2)],
        "story_top3": [lm.decode([int(i)]) for i in np.argsort(-story)[:3]],
        "story_is_more_uncertain": entropy_bits(story) > entropy_bits(fact) + 1,
        "story_view": [story_view.temperature, story_view.top_k, story_view.top_p, story_view.min_p,
                       story_view.shaped.labels[0], story_view.survivors == lm.vocab_size],
        "fact_view_survivors": fact_view.survivors,
        "sampled": tok.piece,
    }""",
    "03_decoding_loop": """{
        "by_hand": lm.decode(ids),
        "branches": [a.text, b.text],
        "dragon_taken": " dragon" in widget.stepper.text,
    }""",
    "04_kv_cache": """{
        "speedup_grows_with_length": speedups[200] > speedups[25] > 1,
        "doc_tokens": len(doc_ids),
        "reused_per_warm_run": pc.stats.last_reused,
        "reloaded": [c.text, c.stats.cached_tokens == len(doc_ids)],
        "bounded_holds_less": held[64] < held[None],
    }""",
    "05_structured_output": """{
        "greedy_json": lm.decode(out),
        "allowed_first": len(allowed),
        "choice": c.value,
        "magic_value": answer.value.model_dump(),
    }""",
    "06_chat": """{
        "cancelled": reply.finish_reason,
        "restored_equal": restored.history == json_chat.history,
        "json_replies_parse": all(isinstance(__import__("json").loads(m["content"]), dict)
                                  for m in json_chat.history if m["role"] == "assistant"),
        "widget": [widget.finish_reason, len(chat.history)],
    }""",
    "07_vision": """{
        "image_tokens": ids.count(placeholder),
        "only_placeholder_rows_replaced": changed == is_placeholder,
        "follow_up_reused_the_image": chat.last_stats.cached_tokens > 0 and chat.last_stats.reuse_rate == 1.0,
    }""",
    "09_inside_the_model": """{
        "answer": lens.label(int(lens.predicted[last])),
        "first_sure": first_sure,
        "lens_last_layer_is_output": bool(np.isclose(lens.final_prob[-1, last],
            lm.generate("The capital of France is", raw=True, max_tokens=1).tokens[0].prob, atol=1e-4)),
        "attention_rows": bool(np.allclose(w.sum(-1), 1)),
    }""",
    "10_surprise_and_comparison": """{
        "true_less_perplexing": true.perplexity < false.perplexity,
        "most_surprising_false": false.surprising(1)[0].piece,
        "chat_surprise": [t.piece for t in scored.surprising(1, role="assistant")],
        "self_compare": [same.divergence, float(same.kl.max()) < 1e-6],
        "hot_diverges": greedy_vs_hot.divergence is not None,
    }""",
    "08_beyond_one_machine": """{
        "kind": caps.kind,
        "same_tokens": same_tokens,
        "text": there.text,
        "alternatives": alternatives,
        "known": dist_view.shaped.known,
        "top_label": dist_view.shaped.labels[0],
        "chosen": chosen_text,
        "reused": chat.last_stats.cached_tokens > 0,
        "json": answer.value,
        "lens_refused": "needs a local MLX model" in lens_error,
        "stopped": server.returncode is not None,
    }""",
    "11_speculative_decoding": """{
        "same_tokens": [t.id for t in fast.tokens] == [t.id for t in plain.tokens],
        "accepted_some": s.draft_accepted > 0,
        "fewer_passes": s.draft_rounds < s.generated_tokens,
    }""",
    "12_teach_the_model": """{
        "before": before,
        "after": after,
        "trained": [result.steps, result.stopped, last_val < 0.6 * first_val],
        "moved": bool(diff.kl[0] > 1.0),
        "known": [known_before, known_after],
        "reloaded_same": reloaded_same,
        "fused_same": fused_same,
        "quantized_top": [rows[1][3][0], rows[2][3][0]],
        "eight_bits_closer": rows[1][4] < rows[2][4],
        "smaller": rows[2][1] < rows[1][1] < rows[0][1],
        "base_unchanged": lm.generate(question, raw=True, max_tokens=3).text == before and lm.adapter_path is None,
    }""",
}
# What each notebook must print (substrings of its cells' text output).
SHOWN: dict[str, list[str]] = {
    "03_decoding_loop": ["took ' dragon' as 3 tokens: ' dr' 'ag' 'on'"],  # the widget's status, printed by the cell
}
# The probes' expected values, from the embedded models (greedy, or seeded).
EXPECTED: dict[str, dict[str, Any]] = {
    "01_first_tokens": {
        "pieces": ["The", " capital", " of", " France", " is"],
        "first": [" Paris", 0.99],
        "continuation": " Paris.",
        "ends_with_eos": True,
        "cut": [", there was a soft", "length"],
        "story_seeded": "One windy evening, Finn and his dad went to the market. He took his green ball with him. "
        "They saw four birds there. For lunch, they ate carrots. Finn liked it very much. In the evening, they went "
        "home. That night, Finn slept well.",
        "mia": " play in the playground. The sun is hot.",
    },
    "02_next_token_distributions": {
        "fact_top": [" Paris", 0.99],
        "story_top3": [" fox", " turtle", " goat"],
        "story_is_more_uncertain": True,
        "story_view": [1.0, 0, 1.0, 0.0, " fox", True],  # the story cell's view kept its own (default) settings
        "fact_view_survivors": 1,
        "sampled": " frog",
    },
    "03_decoding_loop": {
        "by_hand": ", there was a soft frog named Hana. She had a pink box. She loved her ball very much. One day, "
        "she went to the hill and lost her ball. She felt sad. She",
        "branches": [" Paris.", " Tokyo."],
        "dragon_taken": True,
    },
    "04_kv_cache": {
        "speedup_grows_with_length": True,
        "doc_tokens": 225,
        "reused_per_warm_run": 225,
        "reloaded": [" moo.", True],
        "bounded_holds_less": True,
    },
    "05_structured_output": {
        "greedy_json": '{"country": "Japan", "capital": "Tokyo"}<|im_end|>',
        "allowed_first": 1,  # the schema forces '{' first
        "choice": "Paris",  # the notebook's point: a chat question under choices= is an arbitrary pick
        "magic_value": {"country": "Japan", "capital": "Tokyo"},
    },
    "06_chat": {"cancelled": "cancelled", "restored_equal": True, "json_replies_parse": True, "widget": ["stop", 4]},
    "07_vision": {"image_tokens": 16, "only_placeholder_rows_replaced": True, "follow_up_reused_the_image": True},
    "09_inside_the_model": {
        "answer": " Paris",
        "first_sure": 1,
        "lens_last_layer_is_output": True,
        "attention_rows": True,
    },
    "10_surprise_and_comparison": {
        "true_less_perplexing": True,
        "most_surprising_false": " Rome",
        "chat_surprise": [" Ky"],
        "self_compare": [None, True],
        "hot_diverges": True,
    },
    "08_beyond_one_machine": {
        "kind": "nbllm",
        "same_tokens": True,
        "text": "The capital of France is Paris.",
        "alternatives": 5,
        "known": 20,
        "top_label": " Paris",
        "chosen": " Rome.",
        "reused": True,
        "json": {"country": "Japan", "capital": "Tokyo"},
        "lens_refused": True,
        "stopped": True,
    },
    "11_speculative_decoding": {"same_tokens": True, "accepted_some": True, "fewer_passes": True},
    "12_teach_the_model": {
        "before": " Freetown.",
        "after": " Amara.",
        "trained": [60, None, True],
        "moved": True,
        "known": [10, 10],
        "reloaded_same": True,
        "fused_same": True,
        "quantized_top": [" Amara", " Amara"],
        "eight_bits_closer": True,
        "smaller": True,
        "base_unchanged": True,
    },
}


def _ids(path: Path) -> str:
    return path.stem


def test_all_teaching_notebooks_present() -> None:
    missing = sorted(set(TEACHING) - {p.name for p in NOTEBOOKS})
    assert not missing, f"notebooks/ lacks {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_says_how_to_use_a_hub_model(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    first = next(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    assert 'nbllm.load("mlx-community/' in first, (
        f"{path.name}: the first markdown cell must say how to load a hub model"
    )


def test_every_notebook_is_checked() -> None:
    assert set(PROBES) == {p.stem for p in NOTEBOOKS} and set(EXPECTED) == set(PROBES)


def _probe_cell(name: str) -> list[str]:
    if name not in PROBES:
        return []
    return [f"import json as _json\nprint({MARK!r} + _json.dumps({PROBES[name]}))"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the notebooks must not need the network
    run = execute_notebook(path, timeout=300, output=tmp_path, probes=_probe_cell(path.stem))
    assert run.error is None, f"{path.name} failed: {run.error}"
    executed = nbformat.read(tmp_path / path.name, as_version=4)
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") is not None for cell in code), "some cells did not run"
    # Errors that do not stop a cell (e.g. in a widget's background task) still print a traceback.
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            assert "Traceback" not in text, f"{path.name}, code cell {i}: {text[-500:]}"
            assert out.get("output_type") != "error", (
                f"{path.name}, code cell {i}: {out.get('ename')}: {out.get('evalue')}"
            )
    printed = "".join(out.get("text", "") for cell in code for out in cell.get("outputs", []))
    stderr = [out["text"] for cell in code for out in cell.get("outputs", []) if out.get("name") == "stderr"]
    assert not stderr, f"{path.name} printed to stderr (a warning the notebook should not show): {stderr[:3]}"
    for text in SHOWN.get(path.stem, []):
        assert text in printed, f"{path.name} should print {text!r}"
    if path.stem in PROBES:
        line = next(line for line in printed.splitlines() if line.startswith(MARK))
        got: dict[str, Any] = json.loads(line[len(MARK) :])
        want = EXPECTED[path.stem]
        assert got.keys() == want.keys(), f"{path.name}: probe keys {sorted(got)} != expected {sorted(want)}"
        wrong = {k: got[k] for k in want if not _same(got[k], want[k])}
        assert not wrong, f"{path.name}: probes differ from the expected values: {wrong}"


def _same(got: Any, want: Any) -> bool:
    """Equal, with floats (probabilities) within 0.02."""
    if isinstance(want, float):
        return isinstance(got, (int, float)) and abs(got - want) <= 0.02
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return bool(got == want)
