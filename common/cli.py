"""The ``xrayfed`` command line: one entry point, one sub-command per use.

Each feature module registers its own sub-command(s) through ``register(subparsers)`` and keeps
heavy imports (torch, flwr, crypten) inside its handler, so ``xrayfed --help`` stays fast.
Bad input ends as one line ``xrayfed: error: ...`` (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands (each has ``register(subparsers)``).
COMMAND_MODULES = (
    "xrayfed.server.superlink",  # xrayfed server
    "xrayfed.client.supernode",  # xrayfed client
    "xrayfed.server.demo",  # xrayfed demo
    "xrayfed.server.report",  # xrayfed report
    "xrayfed.client.inference_service",  # xrayfed serve-inference, issue-token
    "xrayfed.server.ttp",  # xrayfed serve-ttp
    "xrayfed.common.patient",  # xrayfed predict
    "xrayfed.common.certs",  # xrayfed certs init | add-hospital
)


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
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a feature module not present in this build
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from .errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    from .logs import configure_logging

    configure_logging(verbose=args.verbose, timestamps=True)
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"xrayfed: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValidationError as e:
        from .config import format_validation_error

        print(f"xrayfed: error: {format_validation_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xrayfed: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
