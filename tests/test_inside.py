"""Inside the model: logit lens, attention, surprise, comparison, speculative decoding, on real fixtures."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import nbllm
from nbllm.inside.hooks import capture_layers, decoder_of
from nbllm.testing import make_model

PROMPT = "The model cache prompt is the capital of France and the river in the city"


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> nbllm.LM:
    """gemma3 with an 8-token sliding window, so a 20-token prompt crosses it."""
    return nbllm.load(make_model(tmp_path_factory.mktemp("win") / "g", "gemma3", overrides={"sliding_window": 8}))


def _plain_logprobs(lm: nbllm.LM, ids: list[int]) -> np.ndarray:
    logits = lm.model(mx.array(ids)[None])[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def test_logit_lens_last_layer_is_the_model_output(any_lm: nbllm.LM) -> None:
    lens = any_lm.logit_lens(PROMPT, raw=True)
    ids = list(any_lm.encode(PROMPT, raw=True).ids)
    lp = _plain_logprobs(any_lm, ids)
    assert lens.n_layers == len(any_lm.model.layers) and lens.final_prob.shape == (lens.n_layers, len(ids))
    assert (lens.predicted == lp.argmax(-1)).all()
    np.testing.assert_allclose(lens.final_prob[-1], np.exp(lp[np.arange(len(ids)), lens.predicted]), atol=2e-5)
    assert (lens.final_rank[-1] == 0).all()
    entropy = -(np.exp(lp) * lp).sum(-1)
    np.testing.assert_allclose(lens.entropy[-1], entropy, atol=2e-4)
    top = lens.top(-1, 3)
    assert top[0].id == lens.predicted[3] and [a.prob for a in top] == sorted((a.prob for a in top), reverse=True)
    assert len(any_lm.model.layers) == lens.n_layers  # the layers were put back


def test_logit_lens_reads_every_layers_residual_stream(lm: nbllm.LM) -> None:
    """Each lens row is the final norm and head applied to that layer's output (recomputed here directly)."""
    ids = list(lm.encode(PROMPT, raw=True).ids)
    lens = lm.logit_lens(ids)
    decoder = decoder_of(lm.model)
    with capture_layers(decoder) as streams:
        lm.model(mx.array(ids)[None])
    for layer, h in enumerate(streams):
        logits = lm.model.lm_head(lm.model.model.norm(h))[0].astype(mx.float32)
        probs = np.array(mx.softmax(logits, axis=-1))
        np.testing.assert_allclose(lens.final_prob[layer], probs[np.arange(len(ids)), lens.predicted], atol=2e-5)


def _direct_attention(lm: nbllm.LM, ids: list[int], window: int | None) -> np.ndarray:
    """Layer 0's weights from its own projections: q, k (norms where the model has them), RoPE, scale, mask."""
    model = lm.model.model
    x = model.embed_tokens(mx.array(ids)[None])
    if lm.config["model_type"].startswith("gemma"):
        x = x * mx.array(lm.config["hidden_size"] ** 0.5, mx.bfloat16).astype(x.dtype)
    layer = model.layers[0]
    attn = layer.self_attn
    xn = layer.input_layernorm(x)
    length = len(ids)
    q = attn.q_proj(xn).reshape(1, length, attn.n_heads, -1)
    k = attn.k_proj(xn).reshape(1, length, attn.n_kv_heads, -1)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = attn.rope(q.transpose(0, 2, 1, 3)), attn.rope(k.transpose(0, 2, 1, 3))
    k = mx.repeat(k, attn.n_heads // attn.n_kv_heads, axis=1)
    scores = np.array((q @ k.transpose(0, 1, 3, 2))[0].astype(mx.float32)) * attn.scale
    i, j = np.arange(length)[:, None], np.arange(length)[None]
    allowed = (j <= i) & ((j > i - window) if window else True)
    scores = np.where(allowed, scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("which", ["llama", "qwen3", "gemma3-window"])
def test_attention_weights_equal_a_direct_recomputation(which: str, model_dir: Path, windowed: nbllm.LM) -> None:
    lm = windowed if which == "gemma3-window" else nbllm.load(model_dir / which)
    ids = list(lm.encode(PROMPT, raw=True).ids)
    before = np.array(lm.model(mx.array(ids)[None]))
    amap = lm.attention(ids)
    after = np.array(lm.model(mx.array(ids)[None]))
    np.testing.assert_array_equal(before, after)  # capturing changed nothing, and was undone
    assert amap.n_layers == len(lm.model.layers) and amap.n_heads == lm.config["num_attention_heads"]
    for w in amap.layers:
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        assert np.triu(w, 1).max() == 0.0  # no position looks ahead
    window = 8 if which == "gemma3-window" else None
    np.testing.assert_allclose(amap.weights(0), _direct_attention(lm, ids, window), atol=2e-5)
    if window:  # the sliding layer sees only its window; the global one sees everything before
        assert amap.weights(0)[:, 15, :8].max() == 0.0 and amap.weights(1)[:, 15, :8].max() > 0.0
    assert amap.aggregate(0, "max").shape == (len(ids), len(ids))


def test_score_equals_a_plain_forward_pass_and_chunks_change_nothing(any_lm: nbllm.LM) -> None:
    ids = list(any_lm.encode(PROMPT, raw=True).ids)
    lp = _plain_logprobs(any_lm, ids)
    whole, chunked = any_lm.score(ids), any_lm.score(ids, chunk=5)
    expected = lp[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose([t.logprob for t in whole], expected, atol=2e-5)
    np.testing.assert_allclose([t.logprob for t in chunked], expected, atol=2e-4)
    assert [t.rank for t in whole] == [int((lp[i] > lp[i, ids[i + 1]]).sum()) for i in range(len(ids) - 1)]
    assert whole.perplexity == pytest.approx(float(np.exp(-expected.mean())), rel=1e-4)
    assert "".join(t.text for t in whole) == any_lm.decode(ids)[len(any_lm.decode(ids[:1])) :]
    assert whole.surprising(3)[0].logprob == min(t.logprob for t in whole)


def test_score_a_chat_transcript_marks_each_tokens_role(lm: nbllm.LM) -> None:
    chat = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    scored = lm.score(chat)
    assert len(scored.roles) == len(scored) and set(scored.roles) >= {"user", "assistant"}
    answer = "".join(t.text for t, r in zip(scored, scored.roles) if r == "assistant")
    assert "Paris." in answer and "capital" not in answer
    assert all(r == "assistant" for r in [scored.roles[i] for i, t in enumerate(scored) if t.text == "Paris"])
    assert scored.surprising(2, role="assistant")


def test_compare_with_itself_and_with_other_settings(lm: nbllm.LM) -> None:
    same = nbllm.compare(lm, lm, "Hello there", max_tokens=8)
    assert same.divergence is None and float(same.kl.max()) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(same.a_under_b, [t.prob for t in same.a], atol=1e-4)
    other = nbllm.compare(lm, (lm, {"temperature": 1.5, "seed": 3}), "Hello there", max_tokens=8)
    assert other.divergence is not None and other.labels[1].endswith("temperature=1.5, seed=3")
    assert float(other.kl.max()) > 0  # a tempered distribution is not the model's own


def test_compare_refuses_models_with_other_tokenizers(lm: nbllm.LM, tmp_path: Path) -> None:
    other = nbllm.load(make_model(tmp_path / "o", "llama", vocab_size=300))
    with pytest.raises(ValueError, match="share a tokenizer"):
        nbllm.compare(lm, other, "Hi")


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory) -> nbllm.LM:
    small = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    return nbllm.load(make_model(tmp_path_factory.mktemp("draft") / "d", "llama", seed=5, overrides=small))


def _no_eos(lm: nbllm.LM) -> dict[int, float]:
    return {int(e): -1e9 for e in lm.tokenizer.eos_token_ids}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_speculative_greedy_equals_plain_greedy(arch: str, model_dir: Path, draft: nbllm.LM, lm: nbllm.LM) -> None:
    target = lm if arch == "llama" else nbllm.load(model_dir / arch)
    for helper in (draft, target):  # a poor draft (random weights) and a perfect one (the model itself)
        plain = target.generate("Hello there", max_tokens=24, logit_bias=_no_eos(target))
        spec = target.generate("Hello there", max_tokens=24, logit_bias=_no_eos(target), draft_model=helper)
        assert [t.id for t in spec.tokens] == [t.id for t in plain.tokens]
        s = spec.stats
        assert s.draft_proposed > 0 and 0 <= s.draft_accepted <= s.draft_proposed
        assert sum(t.from_draft for t in spec.tokens) == s.draft_accepted
        assert all(t.accepted is True for t in spec.tokens if t.from_draft)
    assert s.acceptance_rate == 1.0 and s.tokens_per_pass == pytest.approx(4.0, abs=0.3)  # the model as its own draft


def test_speculative_decoding_reuses_a_prompt_cache_and_refuses_another_tokenizer(
    lm: nbllm.LM, draft: nbllm.LM, tmp_path: Path
) -> None:
    cache = nbllm.PromptCache(lm)
    first = lm.generate("Hello there", max_tokens=8, prompt_cache=cache, draft_model=draft)
    again = lm.generate("Hello there", max_tokens=8, prompt_cache=cache, draft_model=draft)
    assert again.stats.cached_tokens > 0 and [t.id for t in again.tokens] == [t.id for t in first.tokens]
    assert not cache.busy
    other = nbllm.load(make_model(tmp_path / "o", "llama", vocab_size=300))
    with pytest.raises(ValueError, match="same tokenizer"):
        lm.stream("Hi", draft_model=other)
    with pytest.raises(ValueError, match="num_draft_tokens: expected an integer in"):
        lm.stream("Hi", draft_model=draft, num_draft_tokens=0)
    assert [t.id for t in lm.stream("Hi", max_tokens=4, draft_model=str(draft.path))] == [
        t.id for t in lm.stream("Hi", max_tokens=4)
    ]


def test_inside_views_need_a_local_model(lm: nbllm.LM) -> None:
    class Remote:
        name = "a server"
        engine = object()
        vocab_size = lm.vocab_size

    for call in (nbllm.inside.logit_lens, nbllm.inside.attention, nbllm.inside.score):
        with pytest.raises(ValueError, match="needs a local MLX model"):
            call(Remote(), "Hi")


def test_inside_views_draw_their_records_and_redraw_on_their_controls(lm: nbllm.LM) -> None:
    from nbllm.widgets import AttentionView, CompareView, LogitLensView, SurpriseView

    lens = LogitLensView(lm.logit_lens("The capital of France is", raw=True))
    assert lens.chart.value.count("lens-cell") == lens.lens.n_layers * len(lens.lens.tokens)
    before = lens.chart.value
    lens.colour.value = "entropy"
    assert lens.chart.value != before and "entropy (green" in lens.chart.value
    assert "lens-cell" in lens._repr_mimebundle_()["text/html"] and lens.figure().axes
    amap = lm.attention("The capital of France is", raw=True)
    view = AttentionView(amap)
    mean = view.chart.value
    view.head.value = 1
    assert view.chart.value != mean and "<line" in view.chart.value and view.figure().axes
    scored = lm.score("The capital of France is a city")
    surprise = SurpriseView(scored)
    assert f"perplexity {scored.perplexity:.2f}" in surprise.children[0].value and surprise.figure().axes
    cmp = CompareView(nbllm.compare(lm, (lm, {"temperature": 1.5, "seed": 3}), "Hi", max_tokens=6))
    assert "diverges at token" in cmp.children[0].value and cmp.figure().axes


def test_magic_flags_show_the_inside_views(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbllm")
    try:
        shell.run_line_magic("llm", f"load {model_dir / 'llama'}")
        shell.run_cell_magic("llm", "--lens --raw -o lens", "The capital of France is")
        shell.run_cell_magic("llm", "--attention --raw -o att", "The capital of France is")
        shell.run_cell_magic("llm", "--score -o sc", "The capital of France is a city")
        assert isinstance(shell.user_ns["lens"], nbllm.LogitLens) and isinstance(
            shell.user_ns["att"], nbllm.AttentionMap
        )
        assert isinstance(shell.user_ns["sc"], nbllm.Scored)
        shell.run_cell_magic("llm", f"--draft {model_dir / 'llama'} -n 6 -o spec", "Hello there")
        assert all(t.from_draft or t.accepted is not True for t in shell.user_ns["spec"].tokens)
        assert shell.user_ns["spec"].stats.acceptance_rate == 1.0  # the model as its own draft
        with pytest.raises(UsageError, match="expected one of --lens/--attention/--score"):
            shell.run_cell_magic("llm", "--lens --score", "Hi")
    finally:
        shell.run_line_magic("unload_ext", "nbllm")
        capsys.readouterr()


def test_speculative_tokens_are_marked_in_the_stream_view(lm: nbllm.LM, draft: nbllm.LM) -> None:
    from nbllm import render

    tokens = lm.generate("Hello there", max_tokens=12, draft_model=lm, logit_bias=_no_eos(lm)).tokens
    html = render.tokens_html(tokens)
    assert html.count('class="t d"') == sum(t.from_draft for t in tokens) > 0
    assert "proposed by the draft model" in render.alternatives_text(next(t for t in tokens if t.from_draft))
    poor = lm.generate("Hello there", max_tokens=12, draft_model=draft, logit_bias=_no_eos(lm)).tokens
    assert any(t.accepted is False for t in poor) and ' r"' in render.tokens_html(poor)
