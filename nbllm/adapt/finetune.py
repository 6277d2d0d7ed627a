"""``finetune``: LoRA / DoRA training over mlx-lm's own trainer, checked up front, stoppable, interrupt-safe.

mlx-lm does the work: ``linear_to_lora_layers`` adds the adapters,
``tuner.trainer.train`` runs the compiled steps and validation. This module
adds what a notebook needs around it: every argument and record checked
before anything is written, the given ``lm`` left as it was (training runs on
a copy of its module tree over the same weights), the losses kept as data,
the adapters written whole every few steps, and a clean end on Stop or Ctrl-C
that keeps the adapters so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .adapters import base_signature, copy_model, derive, write_adapters, write_config
from .plan import Plan, knobs, plan_training
from .result import FineTune, Losses, Report

__all__ = ["FineTune", "Losses", "Report", "finetune", "train"]


def finetune(
    lm: Any,
    data: Any,
    *,
    steps: int = 60,
    learning_rate: float = 1e-4,
    rank: int = 8,
    layers: int | None = None,
    batch_size: int | None = None,
    validation: Any = None,
    seed: int = 0,
    dora: bool = False,
    scale: float = 20.0,
    dropout: float = 0.0,
    mask_prompt: bool = False,
    eval_every: int | None = None,
    save_every: int = 10,
    adapter_path: str | os.PathLike[str] | None = None,
    on_report: Callable[[Report], None] | None = None,
    view: str = "auto",
) -> FineTune:
    """Teach ``lm`` from examples with LoRA (or DoRA) adapters, over mlx-lm's trainer.

    Args:
        lm: A local text model (``nbllm.load``). It is not changed.
        data: Plain texts, ``(prompt, completion)`` pairs, chat message lists (the last
            message the assistant's), mlx-lm records, or a ``.jsonl`` path of records.
        steps: Optimizer steps (default 60).
        learning_rate: Adam's rate (default 1e-4: with mlx-lm's LoRA scale of 20, enough for a handful of examples).
        rank: LoRA rank (default 8). ``scale`` (20.0) and ``dropout`` (0.0) are mlx-lm's LoRA settings.
        layers: How many of the last transformer blocks get adapters (default: all).
        batch_size: Examples per step (default: up to 4).
        validation: Held-out examples (same formats) for the validation loss, or ``None``.
        seed: Seeds the adapters' initial values and the batch order.
        dora: DoRA instead of LoRA.
        mask_prompt: Learn only the reply of chats and pairs (mlx-lm's ``mask_prompt``).
        eval_every: Steps between validation losses (default: about ten over the run).
        save_every: Steps between adapter saves (each written whole); also saved at the end.
        adapter_path: The new adapter folder (must not exist or be empty); default: a new temporary folder.
        on_report: Called with a ``Report`` after every step (an exception it raises ends
            training and propagates; ``KeyboardInterrupt`` counts as an interrupt).
        view: ``"auto"`` shows a live view (losses, tokens/s, Stop) in a notebook and a
            progress bar elsewhere; ``"widget"``, ``"bar"`` or ``"none"`` choose.

    Returns:
        A ``FineTune``. Under the live view training runs in the background (so Stop can
        be clicked) and ``.lm`` / ``.wait()`` wait for it; otherwise it has ended. Stop
        (the button, ``stop()``) and Ctrl-C end training after the current step and return
        normally, with ``stopped`` set and the adapters so far in the folder and on ``.lm``.
    """
    if view not in ("auto", "widget", "bar", "none"):
        raise ValueError(f"view: expected 'auto', 'widget', 'bar' or 'none', got {view!r}")
    plan = plan_training(lm, data, **knobs(locals()))
    if view == "widget" or (view == "auto" and _in_kernel()):
        from ..widgets.training import TrainingView

        if plan.folder is None:  # named now, so the result knows its folder before the thread makes it
            plan = dataclasses.replace(plan, folder=Path(tempfile.mkdtemp(prefix="nbllm-adapters-")))
        result = FineTune(lm, plan.folder or Path(), plan.steps)
        result.view = TrainingView(result, lambda report: train(plan, on_report=report, result=result))
        return result.view.start(on_report)
    progress = _bar(plan.steps) if view in ("auto", "bar") else contextlib.nullcontext(None)
    with progress as bar:
        return train(plan, on_report=_chain(on_report, bar))


def train(plan: Plan, *, on_report: Callable[[Report], None] | None = None, result: FineTune | None = None) -> FineTune:
    """Run a checked ``Plan`` on this thread (``finetune`` without the view); returns when training ends."""
    import mlx.core as mx

    from ..mlx_engine import generation_stream

    result = result or FineTune(plan.lm, plan.folder or Path(), plan.steps)
    try:
        # All of it on this thread's own stream: MLX ties streams to threads (Metal needs it; mlx-lm #1090)
        with mx.stream(generation_stream()):
            return _train(plan, on_report, result)
    except BaseException as err:
        result.error = err
        raise
    finally:
        result._done.set()


def _train(plan: Plan, on_report: Callable[[Report], None] | None, result: FineTune) -> FineTune:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lm = plan.lm
    mx.random.seed(plan.seed)
    np.random.seed(plan.seed)  # mlx-lm's batch order (as mlx_lm.lora does)
    model = copy_model(lm.model)
    model.freeze()
    linear_to_lora_layers(model, plan.layers, plan.lora, use_dora=plan.dora)
    config = {
        "fine_tune_type": "dora" if plan.dora else "lora",
        "num_layers": plan.layers,
        "lora_parameters": plan.lora,
        "model": str(lm.path),
        "iters": plan.steps,
        "batch_size": plan.batch_size,
        "learning_rate": plan.learning_rate,
        "seed": plan.seed,
        "mask_prompt": plan.mask_prompt,
        "nbllm_base": base_signature(lm),
    }
    snapshot = dict(tree_flatten(model.trainable_parameters()))
    folder = _new_folder(plan.folder, config, snapshot)
    result.adapter_path = folder
    state: dict[str, Any] = {"snapshot": snapshot, "step": 0, "saved": 0, "val": None}
    adapters_now = _reader(model, list(snapshot))
    scratch = tempfile.mkdtemp(prefix="nbllm-train-")

    def on_val(info: dict[str, Any]) -> None:
        state["val"] = float(info["val_loss"])
        result.losses.validation.append((int(info["iteration"]), state["val"]))

    def on_train(info: dict[str, Any]) -> None:
        step = int(info["iteration"])
        state["snapshot"], state["step"] = adapters_now(), step
        result.steps = step
        result.losses.train.append((step, float(info["train_loss"])))
        if step % plan.save_every == 0:
            write_adapters(folder, state["snapshot"], step)
            state["saved"] = step
        report = Report(
            step, plan.steps, float(info["train_loss"]), state["val"], float(info["tokens_per_second"]),
            float(info["learning_rate"]),
        )  # fmt: skip
        state["val"] = None
        state.setdefault("rates", []).append(report.tokens_per_second)
        if on_report is not None:
            on_report(report)
        if result._stop.is_set():
            raise _Stopped

    args = TrainingArgs(
        batch_size=plan.batch_size,
        iters=plan.steps,
        val_batches=-1,
        steps_per_report=1,
        steps_per_eval=plan.eval_every,
        steps_per_save=plan.steps + 1,  # saved by on_train, whole
        adapter_file=os.path.join(scratch, "adapters.safetensors"),
        max_seq_length=plan.max_seq_length,
    )
    start = time.perf_counter()
    try:
        with _quiet_trainer():
            mlx_train(
                model=model,
                optimizer=optim.Adam(learning_rate=plan.learning_rate),
                train_dataset=plan.train.dataset(lm.tokenizer, plan.mask_prompt),
                val_dataset=plan.validation.dataset(lm.tokenizer, plan.mask_prompt) if plan.validation else None,
                args=args,
                training_callback=_Callback(on_train, on_val),  # type: ignore[arg-type]
            )
    except _Stopped:
        result.stopped = "stopped"
    except KeyboardInterrupt:
        result.stopped = "interrupted"
    finally:
        result.seconds = time.perf_counter() - start
        shutil.rmtree(scratch, ignore_errors=True)
    if state["saved"] != state["step"]:
        write_adapters(folder, state["snapshot"], state["step"])
    rates = state.get("rates") or [0.0]
    result.tokens_per_second = sum(rates) / len(rates)
    # The trained module tree becomes the result's, holding the saved (consistent) adapters: an interrupt may
    # have landed mid-step, but the base weights are frozen and the adapters are exactly the file's.
    tuned = model
    tuned.load_weights(list(state["snapshot"].items()), strict=False)
    tuned.eval()
    mx.eval(tuned.parameters())  # now, on this thread: a view's worker thread (and its stream) ends
    done_at = result.losses.validation[-1][0] if result.losses.validation else None
    if plan.validation is not None and done_at != result.steps:  # mlx-lm's last one runs before the last step
        from mlx_lm.tuner.trainer import evaluate

        val = plan.validation.dataset(lm.tokenizer, plan.mask_prompt)
        loss = evaluate(tuned, val, plan.batch_size, num_batches=-1, max_seq_length=plan.max_seq_length)
        result.losses.validation.append((result.steps, float(loss)))
    result._lm = derive(lm, tuned, "lora", adapters=folder)
    return result


def _reader(model: Any, keys: list[str]) -> Callable[[], dict[str, Any]]:
    """The adapter arrays as they are now, read from their modules (walking the whole tree each step costs
    milliseconds on a 30-layer model; the optimizer replaces the arrays in the same slots)."""
    modules = dict(model.named_modules())
    found = [(k, modules.get(k.rpartition(".")[0]), k.rpartition(".")[2]) for k in keys]
    slots = [(k, m, a) for k, m, a in found if m is not None and a in m]
    if len(slots) != len(keys):
        from mlx.utils import tree_flatten

        return lambda: dict(tree_flatten(model.trainable_parameters()))
    return lambda: {k: m[a] for k, m, a in slots}


class _Stopped(Exception):
    """Raised from the trainer's callback to end training at a step boundary."""


class _Callback:
    def __init__(self, on_train: Callable[[dict[str, Any]], None], on_val: Callable[[dict[str, Any]], None]):
        self.on_train_loss_report, self.on_val_loss_report = on_train, on_val


class _SilentUI:
    """Stands in for mlx-lm's console UI (``TrainUI``): nbllm draws its own bar or view."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __enter__(self) -> _SilentUI:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name == "val_task":
            return lambda total: contextlib.nullcontext(lambda: None)
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _quiet_trainer() -> Iterator[None]:
    import mlx_lm.tuner.trainer as trainer

    ui = trainer.TrainUI
    trainer.TrainUI = _SilentUI  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        trainer.TrainUI = ui  # type: ignore[misc]


def _new_folder(folder: Path | None, config: dict[str, Any], weights: dict[str, Any]) -> Path:
    """The adapter folder with its config and the initial adapters (LoRA's B is zero: the base's outputs),
    built beside its final name and moved there whole, so it is loadable from the first moment it exists."""
    folder = folder or Path(tempfile.mkdtemp(prefix="nbllm-adapters-"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_config(tmp, config)
        write_adapters(tmp, weights, 0)
        if folder.exists():
            folder.rmdir()  # empty (checked by plan_training)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _chain(*callbacks: Callable[[Report], None] | None) -> Callable[[Report], None] | None:
    live = [c for c in callbacks if c is not None]
    if not live:
        return None

    def each(report: Report) -> None:
        for c in live:
            c(report)

    return each


@contextlib.contextmanager
def _bar(steps: int) -> Iterator[Callable[[Report], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="finetune", unit="step", leave=False)

    def report(r: Report) -> None:
        bar.update(r.step - bar.n)
        bar.set_postfix(loss=f"{r.train_loss:.3f}", tok_s=f"{r.tokens_per_second:,.0f}", refresh=False)

    try:
        yield report
    finally:
        bar.close()
