"""A live progress bar for training: step, loss, rate, ETA, and memory against the budget."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Context manager around rich's progress bar; `quiet` prints nothing at all."""

    def __init__(self, total: int, budget_bytes: int, quiet: bool = False):
        self.total, self.budget, self.quiet = total, budget_bytes, quiet
        self._bar: RichProgress | None = None

    def __enter__(self) -> Progress:
        if not self.quiet:
            console = Console(file=sys.stderr)
            self._bar = RichProgress(
                TextColumn("[bold]fit"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("mem {task.fields[mem]}"), console=console,
            )  # fmt: skip
            self._bar.__enter__()
            self._task = self._bar.add_task("fit", total=self.total, loss="-", mem="-", rate="-")
        return self

    def advance_to(self, step: int) -> None:
        if self._bar:
            self._bar.update(self._task, completed=step)

    def update(self, step: int, loss: float, peak_bytes: int | None) -> None:
        if not self._bar:
            return
        mem = f"{peak_bytes / 2**20:.0f}/{self.budget / 2**20:.0f} MiB" if peak_bytes else "-"
        speed = self._bar.tasks[0].speed
        rate = f"{speed:.1f} step/s" if speed else "-"
        self._bar.update(self._task, completed=step, loss=f"{loss:.3f}", mem=mem, rate=rate)

    def note(self, text: str, always: bool = False) -> None:
        """A line above the bar (never wrapped); `always`: on stderr even when quiet."""
        if self._bar:
            self._bar.console.print(text, soft_wrap=True, highlight=False)
        elif always:
            print(text, file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar:
            self._bar.__exit__(*exc)
