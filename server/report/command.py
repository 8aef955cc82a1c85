"""``xrayfed report``: the handler (arguments: :mod:`xrayfed.server.commands`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xrayfed.common.errors import UserError
from xrayfed.common.security.atrest import load_key
from xrayfed.server.report.build import (
    build_federation_report,
    build_hospital_report,
    resolve_ledger,
)
from xrayfed.server.report.render import (
    headline,
    parse_formats,
    plain_words,
    summary_table,
    write_report,
)
from xrayfed.server.report.schema import json_schema


def report_cmd(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return 0
    formats = parse_formats(args.format)
    if args.run_dir is None and not args.ledger:
        raise UserError("report: give a run directory (xrayfed report RUN_DIR) or a ledger (--ledger FILE)")

    key = load_key(getattr(args, "atrest_key_file", None))
    if args.run_dir is not None:
        report = build_federation_report(args.run_dir, args.ledger, atrest_key=key,
                                         ledger_key_file=args.ledger_key_file)
        out = args.out or Path(args.run_dir) / "report"
    else:
        report = build_hospital_report(list(args.ledger), atrest_key=key, ledger_key_file=args.ledger_key_file)
        out = args.out or resolve_ledger(args.ledger[0]).parent / "privacy-report"
    files = write_report(report, out, formats)
    print(f"# {report.title}\n")
    for line in plain_words(report):
        print(f"- {line}")
    print()
    print(summary_table(report))
    print()
    for line in headline(report):
        print(line)
    for f in report.findings:
        if f.level != "info":
            print(f"  {f.level.upper()}: {f.hospital + ': ' if f.hospital else ''}{f.message}")
    print("wrote: " + ", ".join(str(p) for p in files if p.suffix != ".png"))
    return 1 if args.strict and report.count("critical") else 0
