"""Checkpoints that survive power loss: written atomically, verified by checksum, two kept.

File layout: b"EDGETRAIN-CKPT1\n" + sha256 hex of the payload + b"\n" + payload (torch.save).
`save` writes a temp file, fsyncs it, keeps the previous checkpoint as `.prev`, renames, and
fsyncs the directory. `load` verifies the checksum and falls back to `.prev` when it fails.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import torch

from edgetrain.errors import EdgetrainError

MAGIC = b"EDGETRAIN-CKPT1\n"


class CheckpointError(EdgetrainError):
    """No readable checkpoint: every candidate is missing or corrupt."""


def save(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def save_weights(state_dict: dict[str, Any], path: str | Path) -> Path:
    """A plain `torch.save` file (what `torch.load` and `--init` read), written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state_dict, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _read(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 65:
        raise ValueError("not an edgetrain checkpoint")
    digest, payload = raw[len(MAGIC) : len(MAGIC) + 64].decode(), raw[len(MAGIC) + 65 :]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError("checksum mismatch")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def load(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path`, or its previous version when it is corrupt (said on stderr)."""
    path = Path(path)
    problems = []
    for candidate in (path, path.with_name(path.name + ".prev")):
        if not candidate.is_file():
            problems.append(f"{candidate.name}: missing")
            continue
        try:
            state = _read(candidate)
        except (ValueError, OSError, RuntimeError, EOFError) as e:
            problems.append(f"{candidate.name}: {e}")
            continue
        if candidate != path:
            print(
                f"edgetrain: {path.name} is corrupt ({problems[0].split(': ', 1)[1]}); using {candidate.name}",
                file=sys.stderr,
            )
        return state
    raise CheckpointError(
        f"no usable checkpoint in {path.parent} ({'; '.join(problems)}): start a new run without --resume"
    )


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
