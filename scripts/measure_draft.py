#!/usr/bin/env python
"""Measure speculative decoding of the default model with the draft model, through nbllm's API.

    python scripts/measure_draft.py [--model DIR] [--draft DIR] [--runs 7]

Loads both folders with ``nbllm.load``, generates greedily with and without
``draft_model=`` (runs alternate, in one process; the figures are medians),
checks that the tokens are the same, and writes ``speculative.json`` (with a
markdown table for the draft's MODEL_CARD.md) into the draft folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import nbllm  # before mlx: fast BLAS on Linux

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "nbllm" / "assets"
PROMPTS = [  # (prompt, raw)
    ("Once upon a time", True),
    ("Tell me a story about a cat.", False),
    ("What is the capital of Japan?", False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ASSETS / "default-model"))
    ap.add_argument("--draft", default=str(ASSETS / "default-draft"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-draft-tokens", type=int, default=None)
    a = ap.parse_args()
    lm, draft = nbllm.load(a.model), nbllm.load(a.draft)
    extra = {} if a.num_draft_tokens is None else {"num_draft_tokens": a.num_draft_tokens}
    rows = []
    for prompt, raw in PROMPTS:
        kw = dict(raw=raw, max_tokens=a.max_tokens)
        lm.generate(prompt, **kw)  # warm-up of both paths
        lm.generate(prompt, draft_model=draft, **kw, **extra)
        plain, spec = [], []
        for _ in range(a.runs):
            p = lm.generate(prompt, **kw)
            s = lm.generate(prompt, draft_model=draft, **kw, **extra)
            plain.append(p)
            spec.append(s)
        same = all([t.id for t in s.tokens] == [t.id for t in p.tokens] for p, s in zip(plain, spec))
        row = {
            "prompt": prompt, "raw": raw, "tokens": len(plain[0].tokens), "same_tokens": same,
            "text": plain[0].text,
            "acceptance_rate": round(spec[0].stats.acceptance_rate, 4),
            "tokens_per_pass": round(spec[0].stats.tokens_per_pass, 3),
            "draft_proposed": spec[0].stats.draft_proposed, "draft_accepted": spec[0].stats.draft_accepted,
            "plain_tok_s": round(statistics.median(c.stats.generation_tps for c in plain), 1),
            "draft_tok_s": round(statistics.median(c.stats.generation_tps for c in spec), 1),
        }
        row["speedup"] = round(row["draft_tok_s"] / row["plain_tok_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    n_draft = a.num_draft_tokens or 3
    md = [f"Measured with `scripts/measure_draft.py` (nbllm {nbllm.__version__}, greedy, max_tokens="
          f"{a.max_tokens}, num_draft_tokens={n_draft}, median of {a.runs} alternating runs in one process, "
          f"{lm.info.device.upper()}, weights in {lm.info.dtype}, stored as {lm.info.stored_dtype}):", "",
          "| prompt | same tokens as without the draft | acceptance rate | tokens per pass | "
          "decode tok/s without / with the draft | speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| `{r['prompt']}`{' (raw)' if r['raw'] else ' (chat)'} | {'yes' if r['same_tokens'] else 'NO'} | "
                  f"{r['acceptance_rate']:.2f} ({r['draft_accepted']}/{r['draft_proposed']}) | "
                  f"{r['tokens_per_pass']:.2f} | {r['plain_tok_s']:.0f} / {r['draft_tok_s']:.0f} | "
                  f"{r['speedup']:.2f}x |")
    out = {"rows": rows, "runs": a.runs, "max_tokens": a.max_tokens, "num_draft_tokens": n_draft,
           "nbllm_version": nbllm.__version__,
           "markdown": "\n".join(md)}
    Path(a.draft, "speculative.json").write_text(json.dumps(out, indent=1) + "\n")
    print(out["markdown"])
    if not all(r["same_tokens"] for r in rows):
        sys.exit("speculative tokens differ from plain greedy tokens")


if __name__ == "__main__":
    main()
