"""The layering runs one way: a module imports only from its own layer or the layers below.

Read from the source with `ast` (every import, inside functions too: a lazy import is still an
arrow), so the test fails on the line that added an arrow back up, not on a cycle at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgetrain"

# Bottom to top. A module's layer is its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    ("edgetrain.errors", "edgetrain._registry", "edgetrain.progress", "edgetrain.levels", "edgetrain.runtime"),
    ("edgetrain.core",),
    ("edgetrain.devices",),
    ("edgetrain.memory",),
    ("edgetrain.methods",),
    ("edgetrain.models",),
    ("edgetrain.planning",),
    ("edgetrain.train", "edgetrain.export", "edgetrain.deploy"),
    ("edgetrain.fleet",),
    ("edgetrain.cli",),
    ("edgetrain",),  # the package's public API (lazy wrappers over everything)
]
TORCH = ("torch", "torchvision")


def rank(module: str) -> int:
    best = (-1, -1)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                best = max(best, (len(p), i))
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for b in node.body for n in ast.walk(b)}  # fmt: skip
    here = module_name(path).split(".")
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this file is in
                pkg = here if path.name == "__init__.py" else here[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            # `from edgetrain.methods import lowrank` imports the submodule edgetrain.methods.lowrank
            out += [(node.lineno, f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base) for a in node.names]
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_import_runs_down_the_layers():
    wrong = []
    for path in SOURCES:
        me = module_name(path)
        for line, target in imports(path):
            if not target.startswith("edgetrain") or target == "edgetrain":
                continue  # third-party, or `from edgetrain import __version__` (the root holds only that)
            if rank(target) > rank(me):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} (layer {rank(me)}) imports {target} (layer {rank(target)})")  # fmt: skip
    assert not wrong, "imports that run back up the layers:\n" + "\n".join(wrong)


def test_the_root_is_imported_only_for_its_version():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "edgetrain" and node.level == 0:
                names = {a.name for a in node.names}
                assert names <= {"__version__"} or all(_is_module(f"edgetrain.{n}") for n in names), (path, names)


def _closure(start: set[str]) -> dict[str, set[str]]:
    """Every edgetrain module reachable by import from `start`, with its third-party imports."""
    by_name = {module_name(p): p for p in SOURCES}
    seen: dict[str, set[str]] = {}
    todo = list(start)
    while todo:
        m = todo.pop()
        if m in seen or m not in by_name:
            continue
        targets = [t for _, t in imports(by_name[m])]
        seen[m] = {t.split(".")[0] for t in targets if not t.startswith("edgetrain")}
        todo += [t for t in targets if t.startswith("edgetrain.")]
        todo += [".".join(m.split(".")[:i]) for i in range(2, len(m.split(".")))]  # parent packages run too
    return seen


def test_the_runtime_never_imports_torch_directly_or_through_edgetrain():
    runtime = {module_name(p) for p in SOURCES if module_name(p).startswith("edgetrain.runtime")}
    reached = _closure(runtime)
    assert runtime <= set(reached)
    with_torch = {m: sorted(mods & set(TORCH)) for m, mods in reached.items() if mods & set(TORCH)}
    assert not with_torch, f"the runtime reaches torch through {with_torch}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from edgetrain.planning import plan_for\n", "upward"),
        ("def f():\n    from edgetrain.cli.main import main\n", "upward"),
        ("from edgetrain.core.step import train_step\n", "fine"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edgetrain.train.recipe import fit\n", "fine"),
    ],
)
def test_the_check_catches_an_arrow_back_up(tmp_path, monkeypatch, source, expected):
    """The checker itself: a memory module importing planning (even lazily) is caught."""
    fake = PACKAGE / "memory" / "_layering_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else _read(self, *a, **k))
    up = [t for _, t in imports(fake) if t.startswith("edgetrain.") and rank(t) > rank("edgetrain.memory")]
    assert bool(up) == (expected == "upward")


_read = Path.read_text


def test_torch_in_the_runtime_would_be_caught(monkeypatch):
    """A runtime module that imports an edgetrain module that imports torch is caught."""
    target = PACKAGE / "runtime" / "data.py"
    original = target.read_text()
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: (
            original + "\nfrom edgetrain.core import step\n" if self == target else _read(self, *a, **k)
        ),
    )
    reached = _closure({"edgetrain.runtime.data"})
    assert "torch" in reached["edgetrain.core.step"]
