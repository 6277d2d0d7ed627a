"""Every code block of the README runs as written, offline, on the embedded models.

Python blocks run in order in one namespace (as a reader would paste them);
IPython blocks (``%load_ext``, ``%llm``, ``%%llm``) run in a real
``InteractiveShell``. Shell blocks are the two commands, which CI runs itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```([\w ]*)\n(.*?)^```", re.S | re.M)
HUB = "python hub"  # a block that needs a hub model (none ships for it); shown, not run


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(README.read_text(encoding="utf-8"))]


def test_the_readme_has_python_and_ipython_blocks() -> None:
    kinds = [lang or ("ipython" if body.lstrip().startswith("%") else "plain") for lang, body in blocks()]
    assert kinds.count("python") >= 4 and kinds.count("ipython") >= 2 and "bash" in kinds
    assert kinds.count(HUB) <= 1, "only the vision block may need the hub"


def test_python_blocks_run_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (a saved prompt cache)
    namespace: dict[str, Any] = {}
    for lang, body in blocks():
        if lang == "python":  # not HUB
            exec(compile(body, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    # The examples ask the embedded model what its world holds, and it answers sensibly.
    assert "' Paris' 0.99" in out  # the first block's stream: the token and its probability
    assert namespace["c"].value.model_dump() == {"country": "Japan", "capital": "Tokyo"}
    history = namespace["chat"].history
    assert history[0]["content"] == "What is the capital of Italy?" and "Rome" in history[1]["content"]
    assert "The capital of Japan is Tokyo." in out and "The capital of France is Paris." in out
    assert "The capital of Italy is Rome." in out
    assert namespace["lens"].final_prob[-1, -1] > 0.9 and namespace["scored"].surprising(1)[0].piece == " Rome"
    assert namespace["served"].text == "The capital of France is Paris."  # through nbllm serve and connect
    assert namespace["remote"].caps.kind == "nbllm"
    assert "' Paris' 0.99 [' Paris'," in out  # the remote stream, with the server's alternatives
    fast = namespace["fast"]
    assert fast.stats.acceptance_rate > 0.3 and fast.text.startswith(", there was")


def test_ipython_blocks_run_in_a_shell(capsys: pytest.CaptureFixture) -> None:
    shell = InteractiveShell.instance()
    try:
        for lang, body in blocks():
            if lang == "" and body.lstrip().startswith("%"):
                result = shell.run_cell(body)
                assert result.error_in_exec is None and result.error_before_exec is None, body
        assert capsys.readouterr().out.strip()
    finally:
        shell.run_line_magic("unload_ext", "nbllm")
