"""Every benchmark command the README and docs/ print still parses: a reader who copies one gets
the benchmark, not ``error: unrecognized arguments`` (nothing is run; parsing stops the script)."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_bench_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for each complete ``./dev bench NAME …`` line: in fenced blocks (with
    ``\\`` continuations joined and trailing ``# comments`` dropped) and in one-line inline code.
    Where a line elides the arguments shown before it (``./dev bench federated ... --merge``), the
    ``...`` stands for ``--data DATA`` (the one argument every benchmark requires), so the flags
    it does show are checked. Lines that show optional ones (``[--flag]``) are not commands."""
    out = []
    for path in DOCS:
        text = path.read_text()
        lines = []
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
            lines += re.sub(r"\\\n\s*", " ", block).splitlines()
        lines += re.findall(r"`(\./dev bench [^`\n]+)`", text)
        for line in lines:
            line = re.split(r"\s#\s", line)[0].strip()
            if line.startswith("./dev bench ") and "[" not in line:
                out.append((path.name, line.replace(" ... ", " --data DATA ")))
    return out


class _Parsed(Exception):
    pass


def test_the_docs_show_benchmark_commands():
    names = {c.split()[2] for _, c in documented_bench_commands()}
    assert {"federated", "sweep", "heldout"} <= names


@pytest.mark.parametrize("where,command", documented_bench_commands(), ids=lambda v: v[:60])
def test_documented_benchmark_command_parses(where, command, monkeypatch):
    argv = shlex.split(command)[2:]
    script = ROOT / "bench" / f"{argv[0]}.py"
    assert script.is_file(), f"{where}: {command}: no bench/{argv[0]}.py"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)  # an unknown or malformed argument exits here (status 2)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [str(script), *argv[1:]])
    monkeypatch.syspath_prepend(str(script.parent))
    with pytest.raises(_Parsed):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            pytest.fail(f"{where}: `{command}` does not parse (exit {e.code})")
