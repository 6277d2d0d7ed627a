"""Cost of the live token view: decode tok/s with and without ``StreamView``, in one run.

    python bench/bench_widgets.py                 # in a real ipykernel (comm messages really sent)
    python bench/bench_widgets.py --in-process    # no kernel: widget state is built but not sent
    python bench/bench_widgets.py --model PATH    # also bench this model folder
    python bench/bench_widgets.py --models tiny --tokens 3000   # long output, fastest decode

For each model and view (plain text; coloured with 8 alternatives per token) the
same stream is consumed raw (``for t in stream``) and through a live
``StreamView`` (coalesced redraws), alternating, median of ``--repeats`` runs.
Target: the live view costs <= 10% of decode speed.

Inside the kernel the widget's updates go out as real comm messages on iopub;
this script is the client and drains them, like a frontend would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "Tell me a story about a river and a city."


def measure(path: str, n: int, repeats: int) -> list[dict]:
    """Run in the process that owns the widgets (a kernel, or this one)."""
    import nbllm
    from nbllm.widgets import StreamView

    class TimedView(StreamView):
        """Counts the wall time spent in the view (feeding, redrawing, sending)."""

        spent = 0.0

        def feed(self, token):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            super().feed(token)
            self.spent += time.perf_counter() - t

        def finish(self, stats, reason=None):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            super().finish(stats, reason)
            self.spent += time.perf_counter() - t

    lm = nbllm.load(path)
    bias = {i: -1e9 for i in lm.tokenizer.eos_token_ids}  # always n tokens
    rows = []
    for label, k, colored in (("plain text", 0, False), ("coloured, 8 alternatives", 8, True)):

        def stream():
            return nbllm.stream(lm, PROMPT, max_tokens=n, top_logprobs=k, temperature=0.8, seed=0, logit_bias=bias)

        def raw() -> float:
            ts = stream()
            t = time.perf_counter()
            count = sum(1 for _ in ts)
            return count / (time.perf_counter() - t)

        def live() -> tuple[float, float, TimedView]:
            view = TimedView(colored=colored)
            ts = stream()
            t = time.perf_counter()
            view.consume(ts)
            wall = time.perf_counter() - t
            return view.n_tokens / wall, view.spent / wall, view

        raw()  # warm up (compile, caches)
        raws, lives, shares = [], [], []
        for _ in range(repeats):  # alternate, so load changes hit both alike
            raws.append(raw())
            rate, share, view = live()
            lives.append(rate)
            shares.append(share)
        r, v = statistics.median(raws), statistics.median(lives)
        rows.append(
            {
                "model": Path(path).name,
                "view": label,
                "tokens": n,
                "raw": r,
                "live": v,
                "cost": 1 - v / r,
                "share": statistics.median(shares),
                "redraws": view._throttle.redraws,
                "html_kb": len(view._html.value) / 1024,
            }
        )
    return rows


def in_kernel(paths: list[str], n: int, repeats: int) -> list[dict]:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", env=dict(os.environ, HF_HUB_OFFLINE="1"))
    stats = {"messages": 0}
    try:
        kc.execute(f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_widgets as _b")
        code = (
            f"import json; print('RESULT' + json.dumps([r for p in {paths!r} for r in _b.measure(p, {n}, {repeats})]))"
        )
        msg_id = kc.execute(code)
        out, done = [], threading.Event()
        while not done.is_set():
            msg = kc.get_iopub_msg(timeout=1800)
            stats["messages"] += 1
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                raise RuntimeError("\n".join(msg["content"]["traceback"]))
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                done.set()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    text = "".join(out)
    rows = json.loads(text[text.index("RESULT") + 6 :].splitlines()[0])
    print(f"(drained {stats['messages']} iopub messages from the kernel)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="extra model folder (repeatable)")
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="tiny,bench,default", help="which built-in models: tiny,bench,default")
    parser.add_argument("--in-process", action="store_true", help="no kernel (widget messages are not sent)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import nbllm  # noqa: F401  (fast BLAS before mlx)
    from nbllm.loading import DEFAULT_MODEL_PATH
    from nbllm.testing import BENCH_SHAPE, make_model

    with tempfile.TemporaryDirectory() as tmp:
        chosen = set(args.models.split(","))
        paths = []
        if "tiny" in chosen:
            paths.append(str(make_model(Path(tmp) / "tiny-llama", "llama")))
        if "bench" in chosen:
            paths.append(str(make_model(Path(tmp) / "bench-llama", "llama", overrides=BENCH_SHAPE)))
        if "default" in chosen and (DEFAULT_MODEL_PATH / "config.json").exists():
            paths.append(str(DEFAULT_MODEL_PATH))
        paths += args.model
        if args.in_process:
            rows = [r for p in paths for r in measure(p, args.tokens, args.repeats)]
        else:
            rows = in_kernel(paths, args.tokens, args.repeats)
    where = "in-process (no comm sends)" if args.in_process else "in an ipykernel, comm messages sent to this client"
    print(f"\nLive StreamView vs raw stream, {args.tokens} tokens, median of {args.repeats}, {where}")
    print("view share = wall time spent inside the view (feed, render, send) / wall time of the live run")
    print(
        f"{'model':<12} {'view':<25} {'raw tok/s':>9} {'live tok/s':>10} {'tok/s diff':>10} {'view share':>10} "
        f"{'redraws':>7} {'html KB':>7}"
    )
    for r in rows:
        flag = "" if r["share"] <= 0.10 else "  > 10% target"
        print(
            f"{r['model']:<12} {r['view']:<25} {r['raw']:>9.1f} {r['live']:>10.1f} {r['cost']:>10.1%} "
            f"{r['share']:>10.1%} {r['redraws']:>7d} {r['html_kb']:>7.0f}{flag}"
        )


if __name__ == "__main__":
    main()
