"""What the role's ``commands`` modules share: the parser class, a handler that imports its
module only when its command runs (so ``xrayfed --help`` imports no torch, flwr or CrypTen),
old spellings of commands and options that still work with one warning line, and the
checkpoint argument (``--model``) every command that reads a checkpoint takes."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

_warned: set[str] = set()


def warn_deprecated(old: str, new: str) -> None:
    """One line on stderr, once per process for each old spelling: ``old`` still works, ``new``
    is its name now."""
    if old in _warned:
        return
    _warned.add(old)
    print(f"xrayfed: WARNING: {old} is deprecated; use {new}", file=sys.stderr, flush=True)


def forget_warnings() -> None:
    """Warn again for old spellings already warned about (a fresh command line)."""
    _warned.clear()


class Handler:
    """``function`` of ``module``, imported when the command runs (:meth:`resolve` imports it
    without running it)."""

    def __init__(self, module: str, function: str) -> None:
        self.module, self.function = module, function

    def resolve(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.function)

    def __call__(self, args: argparse.Namespace):
        return self.resolve()(args)

    def __repr__(self) -> str:
        return f"handler({self.module!r}, {self.function!r})"


def handler(module: str, function: str) -> Handler:
    """``function`` of ``module``, imported when the command runs."""
    return Handler(module, function)


class SubCommands(argparse._SubParsersAction):
    """Sub-commands with hidden old names: an old name warns once and then parses as its new
    command (:meth:`deprecate`), or with its own hidden parser (:meth:`add_hidden_parser`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deprecated: dict[str, tuple[str, str | None]] = {}  # old name -> (what to use, new name)

    def _words(self, name: str) -> str:
        """``name`` as typed after ``xrayfed`` (``certs export-model``)."""
        prefix = self._prog_prefix.split(" ", 1)
        return f"{prefix[1]} {name}" if len(prefix) > 1 else name

    def deprecate(self, old: str, new: str) -> None:
        """``old`` is a hidden name of the sub-command ``new`` (not listed in --help)."""
        self._name_parser_map[old] = self._name_parser_map[new]
        self.deprecated[old] = (self._words(new), new)

    def add_hidden_parser(self, old: str, use: str, **kwargs) -> argparse.ArgumentParser:
        """A sub-command kept for old command lines, with its own arguments, not listed in
        --help; ``use`` says what replaces it."""
        kwargs.pop("help", None)
        parser = self.add_parser(old, **kwargs)
        self.deprecated[old] = (use, None)
        return parser

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        name = values[0]
        if name in self.deprecated:
            use, new = self.deprecated[name]
            warn_deprecated(self._words(name), use)
            if new is not None:
                values = [new, *values[1:]]
        super().__call__(parser, namespace, values, option_string)


def sub_commands(sub: argparse._SubParsersAction, name: str) -> SubCommands:
    """The sub-commands of the command ``name`` that another role's ``commands`` module made
    (``certs``), so that this role adds its own commands to the group."""
    parser = sub.choices[name]
    return next(a for a in parser._actions if isinstance(a, SubCommands))


class Parser(argparse.ArgumentParser):
    """The ``xrayfed`` parser and its sub-commands' parsers: sub-commands may have hidden old
    names, and checks registered with :meth:`after_parse` run once the command line is parsed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", SubCommands)
        self._after: list[Callable[[Parser, argparse.Namespace], None]] = []

    def after_parse(self, check: Callable[["Parser", argparse.Namespace], None]) -> None:
        self._after.append(check)

    def _check_value(self, action, value) -> None:
        if isinstance(action, SubCommands) and value not in action.choices:  # list the current names only
            names = ", ".join(repr(c.dest) for c in action._choices_actions)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {names})")
        super()._check_value(action, value)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self._after:
            check(self, namespace)
        return namespace, extras


class _OldOption(argparse.Action):
    """A hidden old spelling of an option: warns once, then does what the new option does."""

    def __init__(self, option_strings, dest, new: argparse.Action, **kwargs) -> None:
        super().__init__(option_strings, new.dest, nargs=new.nargs, const=new.const, default=argparse.SUPPRESS,
                         type=new.type, choices=new.choices, help=argparse.SUPPRESS, metavar=new.metavar)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        preferred = next((s for s in self.new.option_strings if s.startswith("--")), self.new.option_strings[0])
        warn_deprecated(option_string, preferred)
        self.new(parser, namespace, values, preferred)


def old_option(parser: argparse.ArgumentParser, new: argparse.Action, *old: str) -> argparse.Action:
    """Accept the old spellings ``old`` of the option ``new`` (hidden from --help, warn once)."""
    return parser.add_argument(*old, action=_OldOption, new=new)


def add_model_argument(parser: Parser, *, help: str, required: bool = True,
                       old_positional: bool = False) -> argparse.Action:
    """``--model CHECKPOINT``, the checkpoint a command reads. With ``old_positional``, a
    positional CHECKPOINT (the command's old form) is still accepted, with one warning line."""
    if not old_positional:
        return parser.add_argument("--model", type=Path, metavar="CHECKPOINT", required=required, help=help)
    # argparse cannot require --model here (the old positional may give it): checked after parsing
    action = parser.add_argument("--model", type=Path, metavar="CHECKPOINT",
                                 help=help + (" (required)" if required else ""))
    parser.add_argument("_old_model", nargs="?", type=Path, help=argparse.SUPPRESS)

    def check(p: Parser, ns: argparse.Namespace) -> None:
        old = ns.__dict__.pop("_old_model", None)
        if old is not None:
            if ns.model is not None:
                p.error(f"the checkpoint is given twice ({old} and --model {ns.model}); give it once with --model")
            warn_deprecated("a positional CHECKPOINT", "--model CHECKPOINT")
            ns.model = old
        if required and ns.model is None:
            p.error("the following arguments are required: --model")

    parser.after_parse(check)
    return action

