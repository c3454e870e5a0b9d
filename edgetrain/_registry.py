"""One small registry type used for devices, models and methods: name -> entry, glob lookup."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Generic, TypeVar

from edgetrain.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Ordered name -> entry map with `list('resnet*')`-style filtering and close-match errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
