"""``%%llm`` and ``%llm``: run a local model from a notebook cell.

Load with ``%load_ext nbllm``. The magics parse flags and route them to the
core (``nbllm.stream``, ``nbllm.Stepper``, ``nbllm.chat.Chat``) and the views
(``nbllm.widgets``); user mistakes become one-line ``UsageError`` messages.
Defaults are traitlets, so ``%config LLMMagics.temperature = 0.7`` works.
"""

from __future__ import annotations

import html
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Enum, Float, Int, Unicode

from .engine import InUseError
from .magic_registry import Registry

__all__ = ["LLMMagics", "load_ipython_extension", "unload_ipython_extension"]

# What the core raises for the user's mistakes while checking a request or loading a model (before
# anything runs): shown as one line. Anything raised while generating is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ConnectionError, PermissionError, InUseError)


@magics_class
class LLMMagics(Magics):
    """``%%llm`` (prompt in the cell) and ``%llm`` (load / use / info / chat / reset)."""

    model = Unicode("", help="Model loaded on first use when none is selected ('' = nbllm's embedded default).").tag(
        config=True
    )
    temperature = Float(0.0, help="Default temperature (0 = greedy).").tag(config=True)
    top_k = Int(0, help="Default top-k (0 = off).").tag(config=True)
    top_p = Float(1.0, help="Default top-p (1 = off).").tag(config=True)
    min_p = Float(0.0, help="Default min-p (0 = off).").tag(config=True)
    max_tokens = Int(256, help="Default most tokens per cell.").tag(config=True)
    seed = Int(None, allow_none=True, help="Default random seed (None = not fixed).").tag(config=True)
    system = Unicode(None, allow_none=True, help="Default system prompt.").tag(config=True)
    top_logprobs = Int(8, help="Alternatives kept per token with --probs / --step.").tag(config=True)
    view = Enum(
        ["auto", "widget", "text"], "auto", help="Output: live widget, plain text, or auto (widget in a kernel)."
    ).tag(config=True)
    max_rate = Float(30.0, help="Most live redraws per second.").tag(config=True)
    stats = Bool(True, help="Show the stats line under each output.").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self.registry = Registry()
        self.last: Any = None

    # -- %llm ---------------------------------------------------------------
    @magic_arguments("llm")
    @argument(
        "action", nargs="?", default="info", help="info | load | connect | use | list | unload | chat | reset | help"
    )
    @argument("target", nargs="?", help="model path or hub id (load), or a loaded model's name (use, unload)")
    @argument("--as", dest="alias", help="name to register a loaded model under")
    @argument("-h", "--help", action="store_true", help="show this help and the %%llm flags")
    @line_magic
    def llm(self, line: str) -> Any:
        """Manage models and the notebook's conversation.

        ``%llm load PATH_OR_ID`` load and select a model · ``%llm connect URL``
        use a model on an OpenAI-compatible server · ``%llm use NAME``
        select a loaded one · ``%llm`` / ``%llm info`` show the model ·
        ``%llm list`` · ``%llm unload NAME`` · ``%llm chat`` open the chat
        widget on the notebook's conversation · ``%llm reset`` forget it.
        """
        args = _parse(self.llm, line)
        action = args.action
        if action == "help" or args.help:
            print(self.llm.parser.format_help() + "\n" + self._help())
        elif action == "load":
            if not args.target:
                raise UsageError("%llm load: expected a model path or hub id, got nothing")
            lm = self.registry.add(self._load(args.target), args.alias)
            self.registry.current = args.alias or lm.name
            return lm
        elif action == "connect":
            if not args.target or not args.target.startswith(("http://", "https://")):
                raise UsageError(f"%llm connect: expected a server URL (http://host:port), got {args.target!r}")
            lm = self.registry.add(self._load(args.target), args.alias or args.target)
            self.registry.current = args.alias or args.target
            return lm
        elif action == "use":
            self.registry.select(args.target)
        elif action == "info":
            if self.registry.current is None:
                print(
                    "no model selected: %%llm loads " + (self.model or "the embedded default model") + " on first use"
                )
                return None
            return self.registry.models[self.registry.current]
        elif action == "list":
            for name, lm in self.registry.models.items():
                print(("* " if name == self.registry.current else "  ") + f"{name}: {lm!r}")
        elif action == "unload":
            self.registry.unload(args.target)
        elif action == "reset":
            if self.registry.chat is not None:
                _user_errors(self.registry.chat.reset)
            print("conversation reset")
        elif action == "chat":
            from .widgets import ChatWidget

            chat = _user_errors(lambda: self.registry.conversation(self._lm(None), None))
            return _user_errors(lambda: ChatWidget(chat, max_rate=self.max_rate))
        else:
            raise UsageError(
                f"%llm: expected one of info, load, connect, use, list, unload, chat, reset, help; got {action!r}"
            )
        return None

    # -- %%llm ---------------------------------------------------------------
    @magic_arguments("%llm")
    @argument("-m", "--model", help="model path, hub id or loaded name (this cell only)")
    @argument("-t", "--temperature", type=float, help="temperature (0 = greedy)")
    @argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    @argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")
    @argument("--min-p", type=float, help="drop tokens below min-p x the top probability (0 = off)")
    @argument("-n", "--max-tokens", type=int, help="most tokens to generate")
    @argument("--seed", type=int, help="random seed")
    @argument("-s", "--system", help="system prompt")
    @argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    @argument("--raw", action="store_true", help="plain completion, no chat template")
    @argument("--schema", metavar="VAR", help="structured output: a Pydantic class or JSON Schema held in VAR")
    @argument("--json", action="store_true", help="structured output: any JSON object")
    @argument("--regex", metavar="PATTERN", help="structured output: text matching PATTERN")
    @argument("--choices", metavar="A,B,..", help="structured output: exactly one of these comma-separated strings")
    @argument("--image", action="append", metavar="PATH", help="image for a vision model (repeatable)")
    @argument("--chat", action="store_true", help="continue the notebook's conversation")
    @argument("--probs", action="store_true", help="colour tokens by probability; hover/click for alternatives")
    @argument("--step", action="store_true", help="open the stepper instead of running")
    @argument("--lens", action="store_true", help="show the logit lens of the prompt (what each layer predicts)")
    @argument("--attention", action="store_true", help="show the prompt's attention weights, by layer and head")
    @argument("--score", action="store_true", help="score the cell's text: how surprising each token is")
    @argument("--draft", metavar="MODEL", help="speculative decoding with this draft model (path or loaded name)")
    @argument("-o", "--output", metavar="VAR", help="store the Completion (the Stepper with --step) in VAR")
    @argument("-h", "--help", action="store_true", help="show this help")
    @cell_magic("llm")  # type: ignore[arg-type]  # IPython types the named form loosely
    def llm_cell(self, line: str, cell: str) -> None:
        """Run the cell body as a prompt and stream the reply into the output.

        The prompt goes through the model's chat template unless ``--raw``.
        Defaults come from ``%config LLMMagics``; ``%llm load PATH`` selects the
        model. IPython expands ``$var`` and ``{expr}`` in this line: write
        ``{{`` ``}}`` for literal braces (``--regex '[0-9]{{3}}'``). ``%llm --help``
        prints this too (IPython runs a cell magic only when the cell has a body).
        """
        args = _parse(self.llm_cell, line)
        if args.help:
            print(self._help())
            return
        prompt = cell.strip()
        if not prompt:
            raise UsageError("%%llm: expected a prompt in the cell body, got an empty cell")
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o: expected a Python variable name, got {args.output!r}")
        lm = self._lm(args.model)
        options = self._options(args)
        inside = [f for f in ("lens", "attention", "score") if getattr(args, f)]
        if inside:
            return self._inside(lm, prompt, inside, args)
        if args.step:
            self._step(lm, prompt, args, options)
        elif args.chat:
            self._run_chat(lm, prompt, args, options)
        else:
            self._run(lm, prompt, args, options)

    # -- routes ---------------------------------------------------------------
    def _run(self, lm: Any, prompt: str, args: Any, options: dict[str, Any]) -> None:
        from .generate import TokenStream
        from .request import make_request

        view = self._view(args.probs)
        request = _user_errors(
            lambda: make_request(
                lm,
                prompt,
                max_tokens=self._pick(args.max_tokens, self.max_tokens),
                top_logprobs=self.top_logprobs if args.probs else 0,
                stop=args.stop,
                system=self._pick(args.system, self.system),
                raw=args.raw,
                images=args.image,
                progress=view.progress,
                **options,
            )
        )
        self._show(TokenStream(lm, request), view, args)

    def _inside(self, lm: Any, prompt: str, which: list[str], args: Any) -> None:
        from .inside.run import needs_local
        from .widgets import AttentionView, LogitLensView, SurpriseView

        if len(which) > 1 or args.step or args.chat:
            raise UsageError(f"expected one of --lens/--attention/--score/--step/--chat, got {', '.join(which)}")
        encode = {"raw": args.raw, "system": self._pick(args.system, self.system), "images": args.image}
        _user_errors(lambda: needs_local(lm, f"--{which[0]}"))  # a model on a server: one line, no traceback
        if which == ["score"]:
            record = _user_errors(lambda: lm.score(prompt, raw=True))
            view: Any = SurpriseView(record)
        else:
            _user_errors(lambda: lm.encode(prompt, **encode))  # the user's part: the prompt and its images
            record = lm.logit_lens(prompt, **encode) if which == ["lens"] else lm.attention(prompt, **encode)
            view = LogitLensView(record) if which == ["lens"] else AttentionView(record)
        if args.output:
            self._ns[args.output] = record
        self._display(view)

    def _run_chat(self, lm: Any, prompt: str, args: Any, options: dict[str, Any]) -> None:
        if args.raw:
            raise UsageError("--chat: expected a chat prompt, got --raw (a conversation always uses the chat template)")
        chat = _user_errors(lambda: self.registry.conversation(lm, self._pick(args.system, self.system)))
        send: dict[str, Any] = {"max_tokens": self._pick(args.max_tokens, self.max_tokens)}
        if args.probs:
            send["top_logprobs"] = self.top_logprobs
        if args.stop:
            send["stop"] = args.stop
        if args.image:
            send["images"] = args.image
        reply = _user_errors(lambda: chat.send(prompt, **send, **options))
        self._show(reply, self._view(args.probs), args)

    def _step(self, lm: Any, prompt: str, args: Any, options: dict[str, Any]) -> None:
        from .request import make_request
        from .stepper import Stepper
        from .widgets import StepperWidget

        settings = dict(
            top_logprobs=max(self.top_logprobs, 1),
            system=self._pick(args.system, self.system),
            raw=args.raw,
            images=args.image,
            **options,
        )
        _user_errors(lambda: make_request(lm, prompt, **settings))  # the checks; then the stepper keeps its text
        bar = self._prefill_bar()
        stepper = Stepper(lm, prompt, progress=bar, **settings)
        bar(1, 1)  # done: hide it
        if args.output:
            self._ns[args.output] = stepper
        self._display(StepperWidget(stepper))

    def _show(self, stream: Any, view: Any, args: Any) -> None:
        from .structured import StructuredOutputError

        handle = self._display(view, display_id=True) if self._widgets() else None
        error = None
        try:
            completion = view.consume(stream)
        except KeyboardInterrupt:
            completion = stream.partial()
            print(f"\ninterrupted after {len(completion.tokens)} tokens", file=sys.stderr)
        except StructuredOutputError as err:  # e.g. structured output cut short by max_tokens
            completion, error = stream.partial(), err
        finally:
            if handle is not None:
                handle.update(view)  # refresh the HTML fallback kept in the saved notebook
        self.last = completion
        if args.output:
            self._ns[args.output] = completion
        if error is not None:
            raise UsageError(_one_line(error))

    # -- helpers ---------------------------------------------------------------
    def _options(self, args: Any) -> dict[str, Any]:
        options: dict[str, Any] = {
            "temperature": self._pick(args.temperature, self.temperature),
            "top_k": self._pick(args.top_k, self.top_k),
            "top_p": self._pick(args.top_p, self.top_p),
            "min_p": self._pick(args.min_p, self.min_p),
            "seed": self._pick(args.seed, self.seed),
        }
        if args.draft:
            options["draft_model"] = self._lm(args.draft)
        given = [f for f in ("schema", "json", "regex", "choices") if getattr(args, f)]
        if len(given) > 1:
            raise UsageError(
                f"expected at most one of --schema/--json/--regex/--choices, got {', '.join('--' + g for g in given)}"
            )
        if args.schema:
            if args.schema not in self._ns:
                raise UsageError(
                    f"--schema: expected the name of a variable holding a Pydantic class or JSON Schema, no variable {args.schema!r}"
                )
            options["schema"] = self._ns[args.schema]
        elif args.json:
            options["json"] = True
        elif args.regex:
            options["regex"] = args.regex
        elif args.choices:
            options["choices"] = [c.strip() for c in args.choices.split(",") if c.strip()]
        return options

    @property
    def _ns(self) -> dict[str, Any]:
        assert self.shell is not None, "LLMMagics needs an IPython shell"
        return self.shell.user_ns  # type: ignore[no-any-return]

    @staticmethod
    def _pick(flag: Any, default: Any) -> Any:
        return default if flag is None else flag

    def _lm(self, name: str | None) -> Any:
        return self.registry.model(name, self._load, self.model or None)

    def _load(self, target: str | None) -> Any:
        from .loading import load

        if target is not None and target.startswith(("http://", "https://")):
            return self._connect(target)
        label = target or "the embedded default model"
        status = self._status(f"loading {label}…")
        lm = _user_errors(lambda: load(target))
        self._status(f"loaded {lm.name} in {lm.info.load_seconds:.1f} s", status)
        return lm

    def _connect(self, url: str) -> Any:
        from .remote import connect

        status = self._status(f"connecting to {url}…")
        lm = _user_errors(lambda: connect(url))
        caps = _user_errors(lambda: lm.caps)  # ask now, so a wrong URL fails here in one line
        self._status(f"connected: {caps.model} on a {caps.kind} server at {lm.client.base_url}", status)
        return lm

    def _widgets(self) -> bool:
        if self.view != "auto":
            return self.view == "widget"
        return getattr(self.shell, "kernel", None) is not None

    def _view(self, probs: bool) -> Any:
        if not self._widgets():
            from .widgets import TextView

            return TextView(probs=probs, stats=self.stats, max_rate=self.max_rate)
        from .widgets import StreamView

        return StreamView(colored=probs, max_rate=self.max_rate)

    def _prefill_bar(self) -> Any:
        """A prefill progress callback: a bar in the cell (widgets), or tqdm in a terminal."""
        if not self._widgets():
            from .progress import progress_bar

            return progress_bar(desc="prompt", min_total=256)
        from .widgets.progress import PrefillBar

        bar = PrefillBar(min_total=256, max_rate=self.max_rate)
        self._display(bar)
        return bar

    def _display(self, obj: Any, display_id: bool = False) -> Any:
        from IPython.display import display

        return display(obj, display_id=display_id)

    def _status(self, text: str, handle: Any = None) -> Any:
        if not self._widgets():
            print(text)
            return None
        from IPython.display import HTML, display

        message = HTML(f"<span class='nbllm-foot' style='color:#888'>{html.escape(text)}</span>")
        if handle is None:
            return display(message, display_id=True)
        handle.update(message)
        return handle

    def _help(self) -> str:
        return str(self.llm_cell.parser.format_help())


def _parse(magic: Any, line: str) -> Any:
    """Parse flags with shell quoting (quotes removed, unlike IPython's own splitter); ``#`` starts a comment."""
    try:
        argv = shlex.split(line, comments=True)
    except ValueError as err:
        raise UsageError(f"could not split the flags: {err}") from None
    return magic.parser.parse_args(argv)


def _user_errors(call: Any) -> Any:
    """Run ``call`` (a check or a load); the user's mistakes become a one-line ``UsageError``."""
    try:
        return call()
    except UsageError:
        raise
    except _USER_ERRORS as err:
        raise UsageError(_one_line(err)) from None


def _one_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbllm``: register ``%llm`` / ``%%llm`` and their ``%config`` settings."""
    ipython.register_magics(LLMMagics(shell=ipython))


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbllm``: remove the magics."""
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("llm", None)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, LLMMagics)]
