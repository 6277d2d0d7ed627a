"""Chat: history, cache reuse across turns, undo/regenerate/edit, interruption, export, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

import nbllm
from nbllm import Chat
from nbllm.testing import make_model

SYSTEM = "You are a terse assistant."
TURNS = ["Hello there!", "What is the capital of France?", "And of Italy?", "Thank you."]


def ids(reply: Any) -> list[int]:
    return [t.id for t in reply]


def talk(chat: Chat, turns: list[str]) -> None:
    for text in turns:
        chat.send(text).completion()


def fresh(chat: Chat, **kw: Any) -> Chat:
    """A new session (new cache) holding the same history."""
    return Chat.from_json(chat.lm, chat.to_json(), **{**chat.settings, **kw})


def interrupt_at(n: int) -> Any:
    """A logits processor raising KeyboardInterrupt on its n-th call (inside a decode step)."""
    calls: list[int] = []

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return logits

    return processor


def test_reuses_the_cache_across_turns_including_replies(any_lm: nbllm.LM) -> None:
    chat = Chat(any_lm, SYSTEM, max_tokens=16)
    for i, text in enumerate(TURNS):
        reply = chat.send(text)
        tokens = list(reply)
        assert tokens[-1].finish_reason is not None and chat.history[-1]["content"] == reply.text
        s = chat.last_stats
        assert s is not None and s.prompt_tokens == len(reply.prompt_ids)
        if i == 0:
            assert s.reuse_rate is None and s.cached_tokens == 0
        else:  # everything from the previous turn, the reply's own tokens included
            assert s.context_tokens > 0 and s.cached_tokens == s.context_tokens and s.reuse_rate == 1.0
    assert len(chat.history) == 2 * len(TURNS)


def test_turns_match_a_fresh_session_with_the_same_history(any_lm: nbllm.LM) -> None:
    chat = Chat(any_lm, SYSTEM, max_tokens=16)
    talk(chat, TURNS[:3])
    new = fresh(chat)
    assert ids(chat.send(TURNS[3])) == ids(new.send(TURNS[3]))
    assert new.last_stats.cached_tokens == 0 and chat.last_stats.cached_tokens > 0  # type: ignore[union-attr]


def test_plain_history_is_rendered_by_the_chat_template(lm: nbllm.LM) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how are you?"}]
    chat = Chat(lm, SYSTEM, history=history, max_tokens=4)
    reply = chat.send("Fine.")
    assert reply.prompt_ids == list(lm.encode(history + [{"role": "user", "content": "Fine."}], system=SYSTEM).ids)
    reply.completion()


def test_a_template_that_rerenders_earlier_turns_falls_back(model_dir: Path) -> None:
    lm = nbllm.load(model_dir / "llama")
    # Like templates that strip reasoning: earlier assistant turns are shortened.
    lm.tokenizer._tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{{ m['content'][:3] }}{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = Chat(lm, max_tokens=12)
    talk(chat, TURNS[:2])
    s = chat.last_stats
    assert s is not None and s.reuse_rate is not None and 0 < s.reuse_rate < 1
    history = chat.history + [{"role": "user", "content": TURNS[2]}]
    reply = chat.send(TURNS[2])
    assert reply.prompt_ids == list(lm.encode(history).ids)  # the template's rendering, not the stale cache
    assert ids(reply) == [t.id for t in lm.generate(history, max_tokens=12).tokens]


def test_undo_drops_the_last_exchange_and_rewinds_the_cache(any_lm: nbllm.LM) -> None:
    chat = Chat(any_lm, SYSTEM, max_tokens=12)
    talk(chat, TURNS[:2])
    before = chat.history
    held = len(chat.cache.ids)
    chat.send(TURNS[2]).completion()
    user, reply = chat.undo()
    assert user == {"role": "user", "content": TURNS[2]} and reply["role"] == "assistant"
    # The cache is back to the remaining history (plus at most its closing "<|im_end|>\n").
    assert chat.history == before and held <= len(chat.cache.ids) <= held + 2
    rewound = chat.cache.ids
    same_history = fresh(chat)
    reply = chat.send("Another question?")
    assert reply.prompt_ids[: len(rewound)] == rewound
    assert ids(reply) == ids(same_history.send("Another question?"))
    assert chat.last_stats.cached_tokens == len(rewound)  # type: ignore[union-attr]


def test_undo_and_regenerate_past_a_sliding_window(tmp_path: Path) -> None:
    lm = nbllm.load(make_model(tmp_path / "g", "gemma3", overrides={"sliding_window": 32}))
    chat = Chat(lm, SYSTEM, max_tokens=12)
    talk(chat, TURNS)
    assert len(chat.cache.ids) > 32
    chat.undo()  # the sliding layers cannot be trimmed: rolled back to the snapshot instead
    same_history = fresh(chat)
    assert ids(chat.send(TURNS[3])) == ids(same_history.send(TURNS[3]))
    old = chat.history
    chat.regenerate().completion()  # greedy: the same reply, rebuilt from the snapshot onwards
    s = chat.cache.stats
    assert s.rebuilds == 0 and s.restores >= 2 and chat.last_stats.cached_tokens > 32  # type: ignore[union-attr]
    assert chat.history == old


def test_regenerate_replaces_the_last_reply(lm: nbllm.LM) -> None:
    chat = Chat(lm, SYSTEM, max_tokens=12)
    talk(chat, TURNS[:2])
    old = chat.history
    again = chat.regenerate()
    assert chat.history == old  # until the new reply arrives
    again.completion()
    assert chat.history == old  # greedy: the same reply
    assert chat.last_stats.cached_tokens > 0  # type: ignore[union-attr]
    chat.regenerate(temperature=1.0, seed=3, max_tokens=5).completion()
    assert chat.history[:-1] == old[:-1] and len(chat.history) == len(old)
    assert chat.history[-1]["content"] != old[-1]["content"]


def test_edit_changes_a_message_and_the_next_turn_follows_it(lm: nbllm.LM) -> None:
    chat = Chat(lm, SYSTEM, max_tokens=12)
    talk(chat, TURNS[:2])
    chat.edit(0, "Good morning!")
    chat.edit(-1, "Paris.")
    assert chat.history[0]["content"] == "Good morning!" and chat.history[-1]["content"] == "Paris."
    same_history = fresh(chat)
    assert ids(chat.send(TURNS[2])) == ids(same_history.send(TURNS[2]))


def test_changing_the_system_message_between_turns(lm: nbllm.LM) -> None:
    chat = Chat(lm, SYSTEM, max_tokens=12)
    talk(chat, TURNS[:2])
    chat.system = "You are a pirate."
    same_history = fresh(chat)
    assert same_history.system == "You are a pirate."
    assert ids(chat.send(TURNS[2])) == ids(same_history.send(TURNS[2]))
    with pytest.raises(TypeError, match="system"):
        chat.system = 3  # type: ignore[assignment]
    assert chat.system == "You are a pirate."


def test_reset_keeps_the_system_prompt_cached(lm: nbllm.LM) -> None:
    chat = Chat(lm, SYSTEM, max_tokens=8)
    talk(chat, TURNS[:2])
    chat.reset()
    kept = chat.cache.ids
    assert chat.history == [] and kept and list(lm.encode("x", system=SYSTEM).ids)[: len(kept)] == kept
    chat.send(TURNS[0]).completion()
    assert chat.last_stats.cached_tokens == len(kept)  # type: ignore[union-attr]


def test_keyboard_interrupt_leaves_the_history_as_it_was_and_a_consistent_cache(any_lm: nbllm.LM) -> None:
    chat = Chat(any_lm, SYSTEM, max_tokens=16)
    talk(chat, TURNS[:1])
    before, stats = chat.history, chat.last_stats
    reply = chat.send(TURNS[1], logits_processors=[interrupt_at(5)])
    with pytest.raises(KeyboardInterrupt):
        for _ in reply:
            pass
    assert len(reply.tokens) == 3 and reply.finish_reason == "interrupted"
    assert chat.history == before and chat.last_stats is stats and not chat.cache.busy
    same_history = fresh(chat)
    assert ids(chat.send(TURNS[2])) == ids(same_history.send(TURNS[2]))


def test_interrupt_before_the_first_token_leaves_the_history_unchanged(lm: nbllm.LM) -> None:
    chat = Chat(lm, SYSTEM, max_tokens=16)
    talk(chat, TURNS[:1])
    before = chat.history
    with pytest.raises(KeyboardInterrupt):
        list(chat.send(TURNS[1], logits_processors=[interrupt_at(1)]))
    assert chat.history == before
    same_history = fresh(chat)
    assert ids(chat.send(TURNS[1])) == ids(same_history.send(TURNS[1]))


def test_cancel_and_abandoned_replies_are_settled(lm: nbllm.LM) -> None:
    chat = Chat(lm, SYSTEM, max_tokens=16)
    reply = chat.send(TURNS[0])
    for i, token in enumerate(reply):
        if i == 2:
            reply.cancel()
    assert token.finish_reason == "cancelled" and len(reply.tokens) == 4
    assert chat.history[-1]["content"] == reply.text
    # A reply left half-read (e.g. Ctrl-C in the loop body) is kept when the next turn starts.
    reply = chat.send(TURNS[1])
    next(reply), next(reply)
    assert len(chat.history) == 2
    nxt = chat.send(TURNS[2])
    assert len(chat.history) == 4 and chat.history[-1]["content"] == reply.text and reply.done
    same_history = fresh(chat)
    assert ids(nxt) == ids(same_history.send(TURNS[2]))
    never = chat.send("Unread message")  # never iterated: dropped
    chat.send(TURNS[3]).completion()
    assert never.done and not never.tokens and "Unread message" not in json.dumps(chat.history)


def test_a_long_prefill_shows_a_progress_bar(lm: nbllm.LM, capsys: pytest.CaptureFixture[str]) -> None:
    long = " ".join(["the model cache prompt"] * 60)
    chat = Chat(
        lm,
        SYSTEM,
        history=[{"role": "user", "content": long}, {"role": "assistant", "content": long}],
        max_tokens=2,
        progress=True,
    )
    chat.send(TURNS[0]).completion()
    assert "prefill" in capsys.readouterr().err
    chat.send(TURNS[1]).completion()  # a short turn: no bar
    assert "prefill" not in capsys.readouterr().err


def test_a_cache_shared_with_a_running_stream_is_not_touched(lm: nbllm.LM) -> None:
    pc = nbllm.PromptCache(lm)
    chat = Chat(lm, SYSTEM, prompt_cache=pc, max_tokens=6)
    talk(chat, TURNS[:1])
    other = lm.stream("Elsewhere", max_tokens=20, prompt_cache=pc)
    next(other)
    # On the same thread, the unfinished stream is closed for the chat's own use of the cache.
    chat.undo()
    assert chat.history == [] and other.finish_reason == "cancelled" and not pc.busy


def test_export_to_json_and_markdown(lm: nbllm.LM) -> None:
    chat = Chat(lm, SYSTEM, max_tokens=6)
    talk(chat, TURNS[:2])
    data = json.loads(chat.to_json())
    assert data["system"] == SYSTEM and [m["content"] for m in data["messages"]][::2] == TURNS[:2]
    assert all("token_ids" in m for m in data["messages"][1::2])
    again = Chat.from_json(lm, chat.to_json())
    assert again.history == chat.history and again.system == SYSTEM
    # Token ids that do not spell the message (another tokenizer's) are ignored: the text is used.
    data["messages"][1]["token_ids"] = [7] * 5
    foreign = Chat.from_json(lm, json.dumps(data))
    del data["messages"][1]["token_ids"]
    text_only = Chat.from_json(lm, json.dumps(data))
    assert foreign.send("Next").prompt_ids == text_only.send("Next").prompt_ids
    md = chat.to_markdown()
    assert md.startswith(f"**System:** {SYSTEM}") and "### User\n\nHello there!" in md and "### Assistant" in md


def test_bad_input_is_refused_and_loses_nothing(lm: nbllm.LM, tmp_path: Path) -> None:
    chat = Chat(lm, SYSTEM, max_tokens=6)
    for call, err, match in [
        (lambda: chat.undo(), IndexError, "history is empty"),
        (lambda: chat.regenerate(), IndexError, "history is empty"),
    ]:
        with pytest.raises(err, match=match):
            call()
    talk(chat, TURNS[:1])
    snapshot, cached = chat.to_json(), chat.cache.ids
    cases = [
        (lambda: chat.send(""), ValueError, "non-empty message"),
        (lambda: chat.send("   "), ValueError, "non-empty message"),
        (lambda: chat.send(3), TypeError, "expected a str"),
        (lambda: chat.send("hi", temperature=-1), ValueError, "temperature"),
        (lambda: chat.send("hi", bogus=1), TypeError, "bogus"),
        (lambda: chat.edit(2, "x"), IndexError, r"index in \[-2, 2\)"),
        (lambda: chat.edit(True, "x"), TypeError, "integer index"),
        (lambda: chat.edit(0, ""), ValueError, "non-empty"),
        (lambda: Chat.from_json(lm, "{"), ValueError, "JSON"),
        (lambda: Chat(lm, system=3), TypeError, "system"),
        (lambda: Chat(lm, temperature="hot"), ValueError, "temperature"),
        (lambda: Chat(lm, history=[{"role": "assistant", "content": "x"}]), ValueError, "alternating"),
        (lambda: Chat(lm, history=[{"role": "user", "content": "x"}]), ValueError, "complete"),
    ]
    for call, err, match in cases:
        with pytest.raises(err, match=match):
            call()
        assert chat.to_json() == snapshot and chat.cache.ids == cached
    plain = nbllm.load(make_model(tmp_path / "plain", "llama", chat_template=False))
    with pytest.raises(ValueError, match="chat template"):
        Chat(plain)
