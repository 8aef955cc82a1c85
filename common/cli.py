"""The ``xrayfed`` command line: one entry point, one sub-command per use.

Each role has one ``commands`` module (:mod:`xrayfed.server.commands`,
:mod:`xrayfed.client.commands`) that defines its sub-commands' arguments; a command's handler
module is imported only when that command runs, so ``xrayfed --help`` stays fast. This is the
one module of ``xrayfed.common`` that reaches up into the roles (the entry point).
``xrayfed --help`` lists the commands by who runs them (:data:`ROLES`).
Bad input ends as one line ``xrayfed: error: ...`` (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

from xrayfed.common.cli_args import Parser, SubCommands, forget_warnings

# The role's command modules (argument definitions only; handlers are imported when run).
COMMAND_MODULES = ("xrayfed.server.commands", "xrayfed.client.commands")

# Who runs which command: the sections of `xrayfed --help` (every command is in one of them).
ROLES: dict[str, tuple[str, ...]] = {
    "operator (the federation server)": (
        "server", "demo", "simulate", "report", "certs init", "certs add-hospital", "certs revoke-hospital",
        "certs atrest-key", "certs decrypt-checkpoint"),
    "hospital": (
        "client", "certs hospital-key", "data check", "audit", "export", "explain", "serve-inference", "token init-key",
        "token issue", "token revoke"),
    "crypto provider (the second computing party of encrypted inference)": ("serve-crypto-provider",),
    "patient": ("predict",),
}


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """Every listed command (``certs init``, not ``certs``; old names left out): its parser and
    its one-line help."""
    out: dict[str, tuple[argparse.ArgumentParser, str]] = {}
    for action in parser._actions:
        if isinstance(action, SubCommands):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                name = f"{prefix}{choice.dest}"
                out.update(commands(sub, name + " ") or {name: (sub, choice.help or "")})
    return out


def _by_role(parser: argparse.ArgumentParser) -> str:
    helps = {name: text for name, (_, text) in commands(parser).items()}
    width = 26
    lines = []
    for role, names in ROLES.items():
        lines.append(f"{role}:")
        for name in names:
            text = helps.get(name, "")
            first, *rest = textwrap.wrap(text, 96 - width) or [""]
            lines.append(f"  {name:<{width - 2}}{first}" if len(name) < width - 2 else f"  {name}\n{'':{width}}{first}")
            lines.extend(f"{'':{width}}{r}" for r in rest)
        lines.append("")
    lines.append("`xrayfed COMMAND --help` shows a command's options.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    forget_warnings()
    parser = Parser(
        prog="xrayfed",
        description="Privacy-preserving federated training of chest X-ray classifiers, "
        "with encrypted inference and privacy-budget reports.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The commands are listed by role in the epilog, not by argparse (help=SUPPRESS).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)
    sub.required = True
    parser.usage = "xrayfed [-h] [-v] COMMAND ..."  # set after add_subparsers: sub-commands' prog is `xrayfed NAME`
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    parser.epilog = "commands, by who runs them:\n\n" + _by_role(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from xrayfed.common.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    from xrayfed.common.flower_launch import no_telemetry_env
    from xrayfed.common.logs import configure_logging
    from xrayfed.common.procs import allocator_env

    os.environ.update(allocator_env())  # every process this command starts (hospital worker, ServerApp, …)
    os.environ.update(no_telemetry_env())  # Flower in this process (the Simulation Engine) and in every child

    configure_logging(verbose=args.verbose, timestamps=True)
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"xrayfed: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValidationError as e:
        from xrayfed.common.config import format_validation_error

        print(f"xrayfed: error: {format_validation_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xrayfed: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
