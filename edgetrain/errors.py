"""User-facing errors: each prints as one line that says what is wrong and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgetrainError(Exception):
    """Base class of every error edgetrain reports to a user (the CLI prints it as one line)."""

    exit_code = 2


class ProfileError(EdgetrainError):
    """A device profile file is malformed or incomplete."""


class UnknownNameError(EdgetrainError, KeyError):
    """A device, model or method name that no registry knows."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
        super().__init__(f"unknown {kind} '{name}': {hint}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(EdgetrainError, ValueError):
    """A bad argument: a non-positive batch, an input too small for the model, a bad method spec."""


class BudgetError(EdgetrainError):
    """A memory budget that cannot be met (e.g. smaller than the parameters themselves)."""


class EdgeOOMError(EdgetrainError, RuntimeError):
    """Raised by the budget guard when live tensor bytes would exceed the device budget."""

    exit_code = 3

    def __init__(self, message: str, live_bytes: int = 0, budget_bytes: int = 0):
        super().__init__(message)
        self.live_bytes = live_bytes
        self.budget_bytes = budget_bytes
