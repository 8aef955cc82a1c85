"""Every command the README and the docs print still parses: a reader who copies a benchmark
command gets the benchmark, not ``error: unrecognized arguments``, and an ``xrayfed`` command is
written with today's names, not an old spelling that only warns (nothing is run; parsing stops
before any handler)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GUIDES = [*DOCS, *sorted((ROOT / "deploy").glob("*.md"))]


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


def documented_xrayfed_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for each complete ``xrayfed …`` line in a fenced block of the README,
    docs/ and deploy/ (``\\`` continuations joined, trailing ``# comments`` and a ``$ `` prompt
    dropped). Lines that elide (``...``) or show optional or alternative arguments (``[``, ``|``)
    are not commands."""
    out = []
    for path in GUIDES:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text(), re.S | re.M):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.split(r"\s#\s", line)[0].strip().removeprefix("$ ")
                if line.startswith("xrayfed ") and not any(c in line for c in ("...", "[", "|")):
                    out.append((path.name, line))
    return out


def test_the_docs_show_xrayfed_commands():
    names = {c.split()[1] for _, c in documented_xrayfed_commands()}
    assert {"server", "client", "serve-inference", "serve-crypto-provider", "predict", "certs", "token"} <= names


@pytest.mark.parametrize("where,command", documented_xrayfed_commands(), ids=lambda v: v[:60])
def test_documented_xrayfed_command_parses_with_current_names(where, command):
    from xrayfed.common.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit as e:
            pytest.fail(f"{where}: `{command}` does not parse (exit {e.code}): {err.getvalue().strip()}")
    assert "WARNING" not in err.getvalue(), f"{where}: `{command}` uses an old spelling: {err.getvalue().strip()}"
