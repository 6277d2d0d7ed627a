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
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(README.read_text(encoding="utf-8"))]


def test_the_readme_has_python_and_ipython_blocks() -> None:
    kinds = [lang or ("ipython" if body.lstrip().startswith("%") else "plain") for lang, body in blocks()]
    assert kinds.count("python") >= 4 and kinds.count("ipython") >= 2 and "bash" in kinds


def test_python_blocks_run_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (a saved prompt cache)
    namespace: dict[str, Any] = {}
    for lang, body in blocks():
        if lang == "python":
            exec(compile(body, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert namespace["c"].text and namespace["chat"].history and out


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
