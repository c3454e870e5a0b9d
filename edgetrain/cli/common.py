"""What every CLI verb shares: the Verb base class and output helpers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table


def _console() -> Console:
    """A console on the current stdout; wide when it is not a terminal (pipes, logs, tests)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


class Verb:
    """One CLI verb: a name, a help line, examples, its arguments, and `run` (returns exit code)."""

    name = ""
    help = ""
    examples: tuple[str, ...] = ()

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError

    def epilog(self) -> str:
        return "examples:\n" + "\n".join(f"  {e}" for e in self.examples) if self.examples else ""


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c.endswith(("MiB", "%", "x", "s")) else "left")
    for r in rows:
        t.add_row(*(str(v) for v in r))
    _console().print(t)
