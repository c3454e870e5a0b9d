"""How much a plan may change training (`--allow`), least first: torch-free, so that the CLI can
offer the levels without importing torch. The methods say which level each config is at."""

from __future__ import annotations

from edgetrain.errors import ConfigError

# exact: the same training (checkpoint, step-in-backward); lossy: the same layers, trained a little
# differently (compression, half precision, micro-batches with BatchNorm); architecture: other
# layers (low-rank). Never the architecture unless asked.
CHANGE_LEVELS = ("exact", "lossy", "architecture")
DEFAULT_ALLOW = "lossy"


def check_allow(allow: str) -> str:
    """`allow` itself, or one line saying which levels there are."""
    if allow not in CHANGE_LEVELS:
        raise ConfigError(f"--allow must be one of {', '.join(CHANGE_LEVELS)} (how much the plan may change the "
                          f"training), got {allow!r}")  # fmt: skip
    return allow
