"""End to end: a real JupyterLab, a real kernel, headless Chromium driving %%llm, the stepper and the chat.

Screenshots go to ``artifacts/browser/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbllm

pytest.importorskip("playwright.sync_api")
from labserver import CHROMIUM, CHROMIUM_ARGS, Lab, start_lab, write_notebook
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"
N_TOKENS = 300
PROMPT = "Hello from the browser"

# Records each distinct text length of any token stream view, to prove the
# output grew while the cell was still running (live streaming, not one update).
WATCH_JS = """() => {
  window.__nbllmLengths = [];
  const seen = window.__nbllmLengths;
  new MutationObserver(() => {
    document.querySelectorAll('.nbllm-stream').forEach(el => {
      const n = el.textContent.length;
      if (seen[seen.length - 1] !== n) seen.push(n);
    });
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def _requirements() -> None:
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # CI installs it (scripts/setup --test): a missing browser is a failure there
            pytest.fail(f"no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def seed(lm: nbllm.LM) -> int:
    """A seed whose sampled reply runs to max_tokens on the fixture model (no early EOS)."""
    for s in range(50):
        if nbllm.generate(lm, PROMPT, max_tokens=N_TOKENS, temperature=0.8, seed=s).finish_reason == "length":
            return s
    raise AssertionError("no seed runs to max_tokens")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, seed: int) -> Iterator[Lab]:
    _requirements()
    home = tmp_path_factory.mktemp("jupyter-home")
    root = tmp_path_factory.mktemp("lab-root")
    write_notebook(
        root / "demo.ipynb",
        [
            f"%load_ext nbllm\nlm = %llm load {model_dir / 'llama'}\nlm",
            f"%%llm --probs -n {N_TOKENS} -t 0.8 --seed {seed} -o out\n{PROMPT}",
            "%%llm --step -t 0\nStep with me",
            "from nbllm.widgets import ChatWidget\neos = next(iter(lm.tokenizer.eos_token_ids))\n"
            "chat = ChatWidget(lm, max_tokens=100_000, logit_bias={eos: -1e9})\nchat",
            "s = chat.chat.last_stats\nprint('after-stop', s.finish_reason, len(chat.chat.history), s.generated_tokens)",
            "%%llm --lens --raw -o lens\nThe model cache prompt",
            "%%llm --attention --raw\nThe model cache prompt",
            "import nbllm\nrun = nbllm.finetune(lm, ['a b c d', 'e f g h'], steps=1_000_000, validation=['a b c d'], batch_size=1)",
            "run.wait(); print('train-stop', run.stopped, run.steps, run.view.state)",
        ],
    )
    write_notebook(
        root / "nb7.ipynb",
        [
            f"%load_ext nbllm\nlm = %llm load {model_dir / 'llama'}",
            f"%%llm --probs -n 40 -t 0.8 --seed {seed}\n{PROMPT}",
            "%%llm --step -t 0\nStep with me",
        ],
    )
    write_notebook(
        root / "remote.ipynb",
        [
            "%load_ext nbllm\nimport nbllm\nfrom nbllm.serve import start\n"
            f"local = nbllm.load({str(model_dir / 'llama')!r})\nserver = start(local)\n"
            "remote = %llm connect {server.url}",
            "%%llm --step -t 0\nStep with me",
            "from nbllm.widgets import ChatWidget\neos = next(iter(local.tokenizer.eos_token_ids))\n"
            "chat = ChatWidget(remote, max_tokens=100_000, logit_bias={eos: -1e9})\nchat",
            "s = chat.chat.last_stats\nprint('after-stop', s.finish_reason, len(chat.chat.history))\nserver.stop()",
        ],
    )
    server = start_lab(home, root)
    try:
        yield server
    finally:
        server.stop()
        assert server.process.poll() is not None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    expect.set_options(timeout=60_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_notebook(browser: Any, lab: Lab, url: str, path: str) -> Any:
    """A new page on ``url``, once the notebook's kernel is connected and idle."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(60_000)
    pg.goto(url)
    pg.wait_for_selector(".jp-Notebook .jp-Cell", state="visible")
    lab.wait_for_kernel(path)
    return pg


@pytest.fixture(scope="module")
def page(browser: Any, lab: Lab) -> Iterator[Any]:
    """The demo notebook in JupyterLab."""
    pg = open_notebook(browser, lab, lab.page_url("demo.ipynb"), "demo.ipynb")
    try:
        run_cell(pg, 0).locator("table.nbllm-info").wait_for()  # %load_ext nbllm, %llm load: every test needs it
        yield pg
    finally:
        pg.screenshot(path=str(ARTIFACTS / "99-lab-final.png"), full_page=True)
        pg.close()


def cell(page: Any, i: int) -> Any:
    return page.locator(".jp-Notebook .jp-Cell").nth(i)


def run_cell(page: Any, i: int, timeout: float = 60_000) -> Any:
    """Select cell ``i``, press Shift+Enter, wait until its prompt shows an execution count.

    A keypress that lands while the frontend is still wiring the kernel is
    dropped (the prompt stays ``[ ]``); press again then.
    """
    c = cell(page, i)
    prompt = c.locator(".jp-InputArea-prompt")
    for _ in range(3):
        c.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Escape")
        page.keyboard.press("Shift+Enter")
        try:
            expect(prompt).not_to_have_text(re.compile(r"^\[ \]"), timeout=10_000)
            break
        except AssertionError:
            continue
    expect(prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=timeout)
    return c


def test_llm_cell_streams_tokens_live(page: Any, lm: nbllm.LM, seed: int) -> None:
    page.evaluate(WATCH_JS)
    c = run_cell(page, 1)
    stream = c.locator(".nbllm-stream")
    expect(c.locator(".nbllm-foot", has_text="finish: length")).to_be_visible()
    expected = nbllm.generate(lm, PROMPT, max_tokens=N_TOKENS, temperature=0.8, seed=seed).text
    assert stream.text_content() == expected
    assert stream.locator(".t").count() == N_TOKENS
    lengths = page.evaluate("window.__nbllmLengths")
    assert len([n for n in lengths if 0 < n < len(expected)]) >= 2, lengths  # grew in steps while running

    token = stream.locator(".t").nth(4)
    token.hover()
    popup = page.evaluate("el => getComputedStyle(el, '::after').content", token.element_handle())
    assert "chosen" in popup and "%" in popup
    token.click()
    page.mouse.move(5, 5)
    assert "chosen" in page.evaluate("el => getComputedStyle(el, '::after').content", token.element_handle())
    c.screenshot(path=str(ARTIFACTS / "01-stream.png"))


def test_stepper_buttons_step_the_model(page: Any) -> None:
    c = run_cell(page, 2)
    stepper = c.locator(".nbllm-stepper")
    stepper.wait_for()
    for name in ("Next", "Next ×N", "Back", "Reset"):
        assert stepper.get_by_role("button", name=name, exact=True).is_visible()
    label = stepper.locator(".nbllm-foot").first
    expect(label).to_contain_text("generated 0")
    stepper.get_by_role("button", name="Next", exact=True).click()
    expect(label).to_contain_text("generated 1")
    assert stepper.locator(".nbllm-stream .t").count() == 1
    # Choose the second most likely alternative: a branch off the greedy path.
    alternative = stepper.locator(".widget-hbox").filter(has_text="choose next:").locator("button").nth(1)
    chosen = re.match(r"'(.*)' ", alternative.text_content())
    alternative.click()
    expect(label).to_contain_text("generated 2")
    assert stepper.locator(".nbllm-stream .t").count() == 2 and chosen is not None
    # The sliders reshape the stored distribution in the kernel: greedy -> sampling -> top-k 3.
    caption = stepper.locator(".nbllm-dist caption")
    expect(caption).to_have_text("1 of 512 tokens can be sampled")
    stepper.locator(".widget-slider", has_text="temperature").locator(".noUi-handle").press("ArrowRight")
    expect(caption).to_have_text("512 of 512 tokens can be sampled")
    top_k = stepper.locator(".widget-slider", has_text="top-k").locator(".noUi-handle")
    for _ in range(3):
        top_k.press("ArrowRight")
    expect(caption).to_have_text("3 of 512 tokens can be sampled")
    expect(stepper.locator(".nbllm-dist tr[data-cut='top-k']")).to_have_count(5)  # 8 rows shown, 3 survive
    stepper.get_by_role("button", name="Back", exact=True).click()
    expect(label).to_contain_text("generated 1")
    expect(stepper.locator(".nbllm-stream .t")).to_have_count(1)
    c.screenshot(path=str(ARTIFACTS / "02-stepper.png"))


def test_chat_send_then_stop_mid_reply(page: Any) -> None:
    c = run_cell(page, 3)
    chat = c.locator(".nbllm-chat-widget")
    chat.wait_for()
    chat.locator("textarea").fill("Hello chat, tell me a long story")
    chat.get_by_role("button", name="Send").click()
    chat.locator(".nbllm-msg.pending").wait_for()  # the reply is streaming
    page.wait_for_timeout(300)
    c.screenshot(path=str(ARTIFACTS / "03-chat-streaming.png"))
    chat.get_by_role("button", name="Stop").click()
    expect(chat.locator(".nbllm-status")).to_have_text("stopped")
    expect(chat.locator(".nbllm-msg.pending")).to_have_count(0)
    expect(chat.locator(".nbllm-msg.user")).to_have_count(1)
    expect(chat.locator(".nbllm-msg.assistant")).to_have_count(1)
    expect(chat.locator(".nbllm-foot")).to_contain_text("finish: cancelled")
    c.screenshot(path=str(ARTIFACTS / "04-chat-stopped.png"))
    after = run_cell(page, 4)
    text = after.locator(".jp-OutputArea-output").text_content()
    m = re.search(r"after-stop cancelled 2 (\d+)", text)
    assert m and 0 < int(m.group(1)) < 100_000, text


def test_notebook7_streams_and_steps(browser: Any, lab: Lab, lm: nbllm.LM, seed: int) -> None:
    """The same views in Notebook 7 (its own app shell over JupyterLab's components)."""
    pg = open_notebook(browser, lab, f"{lab.url}/notebooks/nb7.ipynb?token={lab.token}", "nb7.ipynb")
    try:
        run_cell(pg, 0)
        c = run_cell(pg, 1)
        expect(c.locator(".nbllm-foot", has_text="finish: length")).to_be_visible()
        expected = nbllm.generate(lm, PROMPT, max_tokens=40, temperature=0.8, seed=seed).text
        assert c.locator(".nbllm-stream").text_content() == expected
        s = run_cell(pg, 2).locator(".nbllm-stepper")
        label = s.locator(".nbllm-foot").first
        expect(label).to_contain_text("generated 0")
        s.get_by_role("button", name="Next", exact=True).click()
        expect(label).to_contain_text("generated 1")
        pg.screenshot(path=str(ARTIFACTS / "05-notebook7.png"), full_page=True)
    finally:
        pg.close()


def test_inside_views_render_heatmaps_with_hovers(page: Any, lm: nbllm.LM) -> None:
    """The logit lens and attention heatmaps render in the browser, hovers show tokens, controls redraw in the kernel."""
    n = len(lm.encode("The model cache prompt", raw=True))
    c = run_cell(page, 5)
    lens = c.locator(".nbllm-lens-view")
    lens.wait_for()
    cells = lens.locator("td.lens-cell")
    expect(cells).to_have_count(len(lm.model.layers) * n)
    tip = cells.first.get_attribute("title") or ""
    assert "%" in tip and "final token" in tip and "entropy" in tip
    expect(lens.locator("caption")).to_contain_text("probability of the token the full model predicts")
    lens.get_by_role("button", name="entropy").click()
    expect(lens.locator("caption")).to_contain_text("entropy")
    c.screenshot(path=str(ARTIFACTS / "05-lens.png"))
    ac = run_cell(page, 6)
    a = ac.locator(".nbllm-attention-view")
    a.wait_for()
    expect(a.locator("table.nbllm-attention tr")).to_have_count(n + 1)
    first = a.locator("table.nbllm-attention td").first.get_attribute("title") or ""
    assert "→" in first and re.search(r"\d\.\d{3}", first)
    before = a.locator("table.nbllm-attention").inner_html()
    assert a.locator("svg.nbllm-attention-lines line").count() > 0
    a.locator("select").nth(1).select_option(label="head 0")
    for _ in range(100):  # the kernel redraws; the new table arrives
        if a.locator("table.nbllm-attention").inner_html() != before:
            break
        page.wait_for_timeout(100)
    assert a.locator("table.nbllm-attention").inner_html() != before  # one head is not the heads' mean
    ac.screenshot(path=str(ARTIFACTS / "06-attention.png"))


def test_the_views_on_a_model_behind_a_server(browser: Any, lab: Lab) -> None:
    """nbllm serve on loopback, started from the notebook: the stepper (top-k-only distribution) and chat Stop."""
    # Notebook 7's single-document page: a second JupyterLab page would share the demo page's workspace
    pg = open_notebook(browser, lab, f"{lab.url}/notebooks/remote.ipynb?token={lab.token}", "remote.ipynb")
    try:
        expect(run_cell(pg, 0).locator(".jp-OutputArea-output")).to_contain_text("connected: llama on a nbllm server")
        stepper = run_cell(pg, 1).locator(".nbllm-stepper")
        stepper.wait_for()
        label = stepper.locator(".nbllm-foot").first
        expect(label).to_contain_text("generated 0")
        expect(stepper.locator(".nbllm-dist caption")).to_contain_text("only the server's top 8 tokens are known")
        expect(stepper.locator(".nbllm-distribution")).to_contain_text("the server returned only its top 8 tokens")
        stepper.get_by_role("button", name="Next", exact=True).click()
        expect(label).to_contain_text("generated 1")
        stepper.get_by_role("button", name="Back", exact=True).click()
        expect(label).to_contain_text("generated 0")
        chat = run_cell(pg, 2).locator(".nbllm-chat-widget")
        chat.wait_for()
        chat.locator("textarea").fill("Tell me a long story")
        chat.get_by_role("button", name="Send").click()
        chat.locator(".nbllm-msg.pending").wait_for()
        pg.wait_for_timeout(300)
        chat.get_by_role("button", name="Stop").click()
        expect(chat.locator(".nbllm-status")).to_have_text("stopped")
        expect(chat.locator(".nbllm-foot")).to_contain_text("finish: cancelled")
        after = run_cell(pg, 3).locator(".jp-OutputArea-output")
        expect(after).to_contain_text("after-stop cancelled 2")
        pg.screenshot(path=str(ARTIFACTS / "07-remote.png"), full_page=True)
    finally:
        pg.close()


def test_finetune_live_view_draws_and_stops(page: Any) -> None:
    """nbllm.finetune in a kernel: the loss curve grows while the cell is idle, and Stop ends training cleanly."""
    c = run_cell(page, 7)
    view = c.locator(".nbllm-training-view")
    view.wait_for()
    expect(view.locator("svg.nbllm-losses polyline").first).to_be_visible()  # two or more steps drawn
    expect(view.locator(".nbllm-foot")).to_contain_text("training")
    c.screenshot(path=str(ARTIFACTS / "08-training.png"))
    view.get_by_role("button", name="Stop").click()
    expect(view.locator(".nbllm-foot")).to_contain_text("stopped")
    expect(view.get_by_role("button", name="Stop")).to_be_disabled()
    after = run_cell(page, 8)
    text = after.locator(".jp-OutputArea-output").text_content()
    m = re.search(r"train-stop stopped (\d+) stopped", text)
    assert m and 1 < int(m.group(1)) < 1_000_000, text
