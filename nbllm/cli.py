"""The ``nbllm`` console command: ``nbllm generate "..."``, ``nbllm info``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nbllm", description="Run and understand local MLX language models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion with per-token probabilities")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("-m", "--model", default=None, help="local folder or hub id (default: the embedded model)")
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    g.add_argument("--system", default=None, help="system message (chat template only)")
    g.add_argument("-n", "--max-tokens", type=int, default=24)
    g.add_argument("-t", "--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--alternatives", type=int, default=3, help="alternatives shown per token")

    s = sub.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API")
    s.add_argument("model", nargs="?", default=None, help="local folder or hub id (default: the embedded model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every request")
    s.add_argument("--max-queue", type=int, default=16, help="requests that may wait (more get 503)")
    s.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body")
    s.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs (default: data URIs only)")

    i = sub.add_parser("info", help="describe a model")
    i.add_argument("-m", "--model", default=None)

    lab = sub.add_parser("lab", help="open the teaching notebooks in JupyterLab (or run them with --execute)")
    lab.add_argument("--dir", default=None, help="notebooks folder (default: notebooks/ of this checkout)")
    lab.add_argument("--execute", action="store_true", help="run every notebook headless and report")
    lab.add_argument("--output", default=None, help="with --execute: write executed copies here")
    lab.add_argument("--timeout", type=int, default=300, help="with --execute: seconds per cell")
    lab.add_argument("jupyter_args", nargs="*", help="extra arguments for jupyter lab (after --)")
    return p


def _color(prob: float) -> str:
    # green (confident) -> yellow -> red (unlikely), ANSI 256 colours
    code = 46 if prob > 0.7 else 226 if prob > 0.3 else 208 if prob > 0.1 else 196
    return f"\033[38;5;{code}m"


def _generate(args: argparse.Namespace) -> int:
    import nbllm

    lm = nbllm.load(args.model)
    raw = args.raw or not lm.tokenizer.has_chat_template
    tty = sys.stdout.isatty()
    ts = lm.stream(
        args.prompt,
        raw=raw,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        top_logprobs=max(1, args.alternatives),
    )
    print(f"{lm.name} · {'completion' if raw else 'chat'} · prompt: {args.prompt!r}\n")
    tokens = []
    for tok in ts:
        tokens.append(tok)
        text = tok.text
        print(f"{_color(tok.prob)}{text}\033[0m" if tty else text, end="", flush=True)
    print("\n")
    print(f"{'#':>3}  {'token':<16} {'prob':>6}   alternatives (model probability)")
    for tok in tokens:
        alts = "  ".join(f"{a.piece!r} {a.prob:.2f}" for a in tok.top[: args.alternatives] if a.id != tok.id)
        mark = " <eos>" if tok.special else ""
        print(f"{tok.index:>3}  {tok.piece!r:<16} {tok.prob:6.3f}   {alts}{mark}")
    print(f"\nfinish: {tokens[-1].finish_reason} · {ts.stats.summary()}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import nbllm

    info = nbllm.load(args.model).info
    for key, value in info.__dict__.items():
        print(f"{key:>18}: {value}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    import nbllm

    from .serve import create_app

    lm = nbllm.load(args.model)
    app = create_app(
        lm,
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        allow_image_urls=args.allow_image_urls,
    )
    print(f"nbllm serve: {lm.name} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _lab(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .lab import execute_notebook, list_notebooks, notebooks_dir, open_lab

    folder = notebooks_dir(args.dir)
    if not args.execute:
        open_lab(folder, args.jupyter_args)
        return 0
    notebooks = list_notebooks(folder)
    if not notebooks:
        raise FileNotFoundError(f"no notebooks in {folder}")
    failed, total = 0, 0.0
    for path in notebooks:
        run = execute_notebook(path, timeout=args.timeout, output=Path(args.output) if args.output else None)
        status = "ok" if run.error is None else f"FAILED {run.error}"
        failed += run.error is not None
        total += run.seconds
        print(f"{path.name:<40} {run.cells:>3} cells {run.seconds:6.1f} s  {status}", flush=True)
    print(f"{'total':<40} {'':>9} {total:6.1f} s  {len(notebooks)} notebooks, {failed} failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nbllm`` command."""
    args = _parser().parse_args(argv)
    try:
        return {"generate": _generate, "info": _info, "lab": _lab, "serve": _serve}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError) as err:
        print(f"nbllm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
