"""Where profiles live: built-in (packaged), the user's directory (XDG), and `--profiles DIR`."""

from __future__ import annotations

import fnmatch
import os
from importlib import resources
from pathlib import Path

from edgetrain.devices.profile import DeviceProfile, load_profile
from edgetrain.errors import ConfigError, UnknownNameError

_extra_dirs: list[Path] = []


def builtin_dir() -> Path:
    """The packaged profiles (the repo's top-level `profiles/`, installed as edgetrain._profiles)."""
    return Path(str(resources.files("edgetrain._profiles")))


def user_dir() -> Path:
    """`$XDG_CONFIG_HOME/edgetrain/profiles` (default ~/.config): where `profile --save` writes."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "edgetrain" / "profiles"


def add_profile_dir(path: str | Path) -> None:
    """Also search `path` (the CLI's `--profiles DIR`); later directories win on equal names."""
    if not Path(path).is_dir():
        raise ConfigError(f"--profiles {path}: no such directory (it should hold profile YAML files)")
    _extra_dirs.append(Path(path))


def search_dirs() -> list[Path]:
    return [builtin_dir(), user_dir(), *_extra_dirs]


def _files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in search_dirs():
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")):
                found[f.stem] = f
    return found


def list_devices(pattern: str = "*") -> list[str]:
    """Names of the known profiles matching a shell-style pattern, e.g. 'jetson*'."""
    return sorted(n for n in _files() if fnmatch.fnmatch(n, pattern))


def get_device(name: str | DeviceProfile) -> DeviceProfile:
    """The profile called `name` (a file name without .yaml), or a path to a YAML file."""
    if isinstance(name, DeviceProfile):
        return name
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return load_profile(name)
    files = _files()
    if name not in files:
        raise UnknownNameError("device", name, files)
    return load_profile(files[name])


def save_profile(profile: DeviceProfile, name: str | None = None, directory: Path | None = None) -> Path:
    """Write `profile` as `<name>.yaml` in the user directory (atomically)."""
    directory = directory or user_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name or profile.name}.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(profile.to_yaml())
    os.replace(tmp, path)
    return path
