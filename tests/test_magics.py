"""``%%llm`` / ``%llm`` in a real IPython ``InteractiveShell`` on the tiny fixture models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import nbllm
from nbllm.magics import LLMMagics


@pytest.fixture(scope="module")
def shell(model_dir: Path) -> Iterator[InteractiveShell]:
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbllm")
    sh.run_line_magic("llm", f"load {model_dir / 'llama'}")
    yield sh
    sh.run_line_magic("unload_ext", "nbllm")


@pytest.fixture()
def magics(shell: InteractiveShell) -> Iterator[LLMMagics]:
    m = next(c for c in shell.configurables if isinstance(c, LLMMagics))
    saved = {name: getattr(m, name) for name in m.trait_names() if m.trait_metadata(name, "config")}
    yield m
    for name, value in saved.items():
        setattr(m, name, value)


def cell(shell: InteractiveShell, line: str, body: str = "Hello there") -> Any:
    return shell.run_cell_magic("llm", line, body)


def error_of(shell: InteractiveShell, source: str) -> BaseException | None:
    return shell.run_cell(source).error_in_exec


def test_cell_streams_the_same_text_as_generate(
    shell: InteractiveShell, lm: nbllm.LM, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    cell(shell, "-n 12 -o out")
    printed = capsys.readouterr().out
    completion = shell.user_ns["out"]
    reference = nbllm.generate(lm, "Hello there", max_tokens=12)
    assert isinstance(completion, nbllm.Completion) and completion.text == reference.text
    assert len(completion.tokens) == 12 and printed.startswith(reference.text)
    assert "finish: length" in printed


def test_sampling_flags_reach_the_sampler(shell: InteractiveShell, lm: nbllm.LM) -> None:
    cell(shell, "-n 16 -t 1.2 --top-k 20 --top-p 0.95 --min-p 0.01 --seed 7 -o a")
    cell(shell, "-n 16 -t 1.2 --top-k 20 --top-p 0.95 --min-p 0.01 --seed 7 -o b")
    cell(shell, "-n 16 -t 1.2 --seed 8 -o c")
    ref = nbllm.generate(lm, "Hello there", max_tokens=16, temperature=1.2, top_k=20, top_p=0.95, min_p=0.01, seed=7)
    a, b, c = (shell.user_ns[k] for k in "abc")
    assert a.text == b.text == ref.text and [t.id for t in c.tokens] != [t.id for t in a.tokens]


def test_raw_system_and_stop(shell: InteractiveShell, lm: nbllm.LM) -> None:
    cell(shell, "--raw -n 3 -o r", "Once upon a time")
    assert shell.user_ns["r"].stats.prompt_tokens == len(list(lm.encode("Once upon a time", raw=True).ids))
    cell(shell, '-s "You are terse." -n 3 -o s')
    assert shell.user_ns["s"].stats.prompt_tokens == len(list(lm.encode("Hello there", system="You are terse.").ids))
    full = nbllm.generate(lm, "Hello there", max_tokens=30).text
    stop = next(
        full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2]
    )
    cell(shell, f"-n 30 --stop {stop!r} -o st")
    st = shell.user_ns["st"]
    assert st.finish_reason == "stop_string" and st.text == full[: full.index(stop)]


def test_config_sets_defaults(shell: InteractiveShell, magics: LLMMagics) -> None:
    shell.run_line_magic("config", "LLMMagics.max_tokens = 4")
    shell.run_line_magic("config", "LLMMagics.temperature = 0.9")
    shell.run_line_magic("config", "LLMMagics.seed = 5")
    cell(shell, "-o d")
    d = shell.user_ns["d"]
    assert len(d.tokens) == 4 and magics.temperature == 0.9
    assert (
        d.text
        == nbllm.generate(
            magics.registry.models[magics.registry.current], "Hello there", max_tokens=4, temperature=0.9, seed=5
        ).text
    )
    cell(shell, "-n 2 -o e")  # a flag beats the default
    assert len(shell.user_ns["e"].tokens) == 2


def test_probs_shows_each_token_with_its_probability(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    cell(shell, "--probs -n 5 -o p")
    out = capsys.readouterr().out
    p = shell.user_ns["p"]
    assert all(len(t.top) == 8 for t in p.tokens)
    assert f"{p.tokens[0].prob:7.2%} {p.tokens[0].piece!r}" in out


@pytest.mark.parametrize(
    "source, message",
    [
        ("%%llm --bogus\nhi", "unrecognized arguments: --bogus"),
        ("%%llm -t hot\nhi", "argument -t/--temperature: invalid float value"),
        ("%%llm -t -1\nhi", "temperature: expected a finite float >= 0"),
        ("%%llm --top-p 2\nhi", "top_p: expected a float in (0, 1]"),
        ("%%llm -n 0\nhi", "max_tokens: expected an integer in [1, 10000000]"),
        ("%%llm -o 1x\nhi", "-o: expected a Python variable name"),
        ("%%llm --schema nothing_here\nhi", "no variable 'nothing_here'"),
        ("%%llm --json --regex a+\nhi", "expected at most one of"),
        ("%%llm --image /no/such.png\nhi", "is a text-only model"),
        ("%%llm -m /no/such/model\nhi", "no model folder"),
        ("%%llm\n   ", "expected a prompt in the cell body"),
        ("%llm use nobody", "expected the name of a loaded model"),
        ("%llm dance", "expected one of info, load"),
    ],
)
def test_user_mistakes_are_one_line_usage_errors(shell: InteractiveShell, source: str, message: str) -> None:
    err = error_of(shell, source)
    assert isinstance(err, UsageError) and message in str(err) and "\n" not in str(err).strip()


def test_help_lists_the_flags(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    cell(shell, "--help", "anything")
    out = capsys.readouterr().out
    for flag in (
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--max-tokens",
        "--seed",
        "--system",
        "--stop",
        "--schema",
        "--json",
        "--regex",
        "--image",
        "--chat",
        "--probs",
        "--step",
        "--output",
        "--raw",
    ):
        assert flag in out
    shell.run_line_magic("llm", "--help")
    out = capsys.readouterr().out
    assert "%llm [" in out and "%%llm [" in out


def test_line_magic_load_use_list_info(
    shell: InteractiveShell, magics: LLMMagics, model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    first = magics.registry.current
    lm = shell.run_line_magic("llm", f"load {model_dir / 'qwen3'} --as q")
    assert magics.registry.current == "q" and lm.info.architecture == "qwen3"
    cell(shell, "-n 2 -o qo")
    assert shell.user_ns["qo"].stats.prompt_tokens == len(list(lm.encode("Hello there").ids))
    cell(shell, f"-m {first} -n 2 -o lo")  # -m for one cell, selection unchanged
    assert magics.registry.current == "q"
    capsys.readouterr()
    shell.run_line_magic("llm", "list")
    assert "* q:" in capsys.readouterr().out
    shell.run_line_magic("llm", f"use {first}")
    assert shell.run_line_magic("llm", "info") is magics.registry.models[first]
    shell.run_line_magic("llm", "unload q")
    assert "q" not in magics.registry.models


def test_step_opens_a_stepper_on_the_real_model(shell: InteractiveShell, lm: nbllm.LM) -> None:
    cell(shell, "--step -t 0 -o st")
    stepper = shell.user_ns["st"]
    assert isinstance(stepper, nbllm.Stepper) and stepper.tokens == []
    token = stepper.step()
    assert token.id == nbllm.generate(lm, "Hello there", max_tokens=1).tokens[0].id


def test_chat_continues_the_notebook_conversation(shell: InteractiveShell, magics: LLMMagics) -> None:
    shell.run_line_magic("llm", "reset")
    cell(shell, "--chat -n 4 -o c1", "Hi")
    cell(shell, "--chat -n 4 -o c2", "And again")
    chat = magics.registry.chat
    assert [m["role"] for m in chat.history] == ["user", "assistant"] * 2
    assert chat.history[1]["content"] == shell.user_ns["c1"].text
    assert shell.user_ns["c2"].stats.cached_tokens > 0
    widget = shell.run_line_magic("llm", "chat")
    assert widget.chat is chat and widget.n_messages == 4
    cell(shell, '--chat -s "Be terse." -n 2', "Third")
    assert chat.system == "Be terse." and len(chat.history) == 6
    shell.run_line_magic("llm", "reset")
    assert chat.history == []
    err = error_of(shell, "%%llm --chat --raw\nhi")
    assert isinstance(err, UsageError) and "--raw" in str(err)


def test_structured_output_flags(shell: InteractiveShell) -> None:
    cell(shell, "--regex '[0-9]{{3}}' -o r", "Three digits")  # IPython expands {...} in the line
    r = shell.user_ns["r"]
    assert len(r.text) == 3 and r.text.isdigit() and r.value == r.text
    cell(shell, "--choices red,green,blue -o ch", "Pick a colour")
    assert shell.user_ns["ch"].value in {"red", "green", "blue"}
    shell.user_ns["Point"] = {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "required": ["x"],
        "additionalProperties": False,
    }
    cell(shell, "--schema Point -n 60 -o pt", "A point")
    assert isinstance(shell.user_ns["pt"].value["x"], int)


def test_widget_view_streams_into_a_stream_view(
    shell: InteractiveShell, magics: LLMMagics, lm: nbllm.LM, monkeypatch: pytest.MonkeyPatch
) -> None:
    shell.run_line_magic("config", "LLMMagics.view = 'widget'")
    shown: list[Any] = []
    monkeypatch.setattr(magics, "_display", lambda obj, display_id=False: shown.append(obj))
    cell(shell, "--probs -n 6 -o w")
    view = shown[0]
    assert view.text == shell.user_ns["w"].text == nbllm.generate(lm, "Hello there", max_tokens=6).text
    assert view.n_tokens == 6 and view.colored and view.status == "done"
    cell(shell, "--step")
    assert type(shown[-1]).__name__ == "StepperWidget"


def test_a_saved_notebook_keeps_an_html_fallback(model_dir: Path, lm: nbllm.LM) -> None:
    """Executed headless (nbclient, a real kernel, no widget frontend), the output still reads as HTML and text."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(f"%load_ext nbllm\n%llm load {model_dir / 'llama'}"),
        nbformat.v4.new_code_cell("%%llm --probs -n 8\nHello there"),
    ]
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    outputs = [o for o in nb.cells[1].outputs if o.output_type == "display_data"]
    assert len(outputs) == 1  # the live view, updated in place at the end
    data = outputs[0]["data"]
    text = nbllm.generate(lm, "Hello there", max_tokens=8).text
    assert "application/vnd.jupyter.widget-view+json" in data and data["text/plain"] == text
    assert (
        data["text/html"].count('class="t') == 8
        and 'title="' in data["text/html"]
        and "finish: length" in data["text/html"]
    )


def test_image_flag_with_a_vision_model(shell: InteractiveShell, magics: LLMMagics, tmp_path: Path) -> None:
    from nbllm.testing import make_image, make_vision_model

    folder = make_vision_model(tmp_path / "qwen2_vl", "qwen2_vl")
    make_image(64, 48).save(tmp_path / "a.png")
    first = magics.registry.current
    vlm = shell.run_line_magic("llm", f"load {folder} --as vision")
    try:
        cell(shell, f"--image {tmp_path / 'a.png'} -n 4 -o vi", "What is in this picture?")
        reference = nbllm.generate(vlm, "What is in this picture?", images=[str(tmp_path / "a.png")], max_tokens=4)
        vi = shell.user_ns["vi"]
        assert [t.id for t in vi.tokens] == [t.id for t in reference.tokens]
        assert (
            vi.stats.prompt_tokens
            == reference.stats.prompt_tokens
            > len(list(vlm.encode("What is in this picture?").ids))
        )
        err = error_of(shell, f"%%llm --image {tmp_path / 'missing.png'}\nhi")
        assert isinstance(err, UsageError) and "\n" not in str(err).strip()
    finally:
        shell.run_line_magic("llm", "unload vision")
        shell.run_line_magic("llm", f"use {first}")


def test_without_a_selected_model_the_embedded_default_loads(shell: InteractiveShell, magics: LLMMagics) -> None:
    from nbllm.loading import DEFAULT_MODEL_PATH

    assert (DEFAULT_MODEL_PATH / "config.json").exists()
    selected = magics.registry.current
    magics.registry.current = None
    try:
        cell(shell, "-n 5 -o dm", "What is the capital of France?")
        assert magics.registry.current == "nbllm/default-model"
        reference = nbllm.generate(nbllm.load(), "What is the capital of France?", max_tokens=5)
        assert [t.id for t in shell.user_ns["dm"].tokens] == [t.id for t in reference.tokens]
    finally:
        magics.registry.models.pop("nbllm/default-model", None)
        magics.registry.current = selected


@pytest.mark.parametrize("bug", [TypeError, ZeroDivisionError])
def test_a_bug_inside_generation_shows_its_traceback(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch, bug: type[Exception]
) -> None:
    import importlib

    mlx_generate = importlib.import_module("mlx_lm.generate")  # the module (the package's name is a function)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise bug("a bug deep inside the decode loop")
        yield  # a generator, like generate_step

    monkeypatch.setattr(mlx_generate, "generate_step", broken)
    err = error_of(shell, "%%llm -n 3\nHello there")
    assert type(err) is bug and "a bug deep inside" in str(err)  # the real exception, not a UsageError
    monkeypatch.undo()
    assert error_of(shell, "%%llm -n 3\nHello there") is None  # and the magics still work


def test_step_shows_prefill_progress_for_a_long_prompt(
    shell: InteractiveShell, magics: LLMMagics, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbllm.widgets import StepperWidget
    from nbllm.widgets.progress import PrefillBar

    shown: list[Any] = []
    monkeypatch.setattr(magics, "_display", lambda obj, display_id=False: shown.append(obj))
    magics.view, magics.max_rate = "widget", 10_000.0
    seen: list[tuple[int, int]] = []
    real_call = PrefillBar.__call__
    monkeypatch.setattr(
        PrefillBar, "__call__", lambda bar, done, total: (seen.append((done, total)), real_call(bar, done, total))
    )
    cell(shell, "--step --raw", "the model cache prompt " * 300)  # ~1,200 tokens: several CPU prefill chunks
    bar, widget = shown
    assert isinstance(bar, PrefillBar) and isinstance(widget, StepperWidget)  # the bar comes first, above the stepper
    during = [done for done, total in seen if done < total]
    assert len(during) >= 2 and during == sorted(during) and bar.max >= 1000  # it moved, chunk by chunk
    assert bar.layout.display == "none"  # and is gone once the stepper is ready
