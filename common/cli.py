"""The ``xrayfed`` command line: one entry point, one sub-command per use.

Each role has one ``commands`` module (:mod:`xrayfed.server.commands`,
:mod:`xrayfed.client.commands`) that defines its sub-commands' arguments; a command's handler
module is imported only when that command runs, so ``xrayfed --help`` stays fast. This is the
one module of ``xrayfed.common`` that reaches up into the roles (the entry point).
Bad input ends as one line ``xrayfed: error: ...`` (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# The role's command modules (argument definitions only; handlers are imported when run).
COMMAND_MODULES = ("xrayfed.server.commands", "xrayfed.client.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xrayfed",
        description="Privacy-preserving federated training of chest X-ray classifiers, "
        "with encrypted inference and privacy-budget reports.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from xrayfed.common.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    from xrayfed.common.logs import configure_logging

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
