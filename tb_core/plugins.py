"""Named extension points: a registry filled in-process or by installed packages' entry points.

The framework finds pluggable parts (feature extractors, image sources) by name without importing the
code that provides them: a package declares `NAME = module:attr` under an entry-point group in its
metadata (the demo does, in setup.cfg), and a script may register one in its own process. In-process
registrations win over declared ones of the same name.
"""
from __future__ import annotations

import importlib.metadata
from typing import Any


class Registry:
    """Named objects of one kind: `register(name, obj)` in-process, or declared under `group`."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._registered: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> None:
        self._registered[name] = obj

    def names(self) -> list[str]:
        declared = (ep.name for ep in importlib.metadata.entry_points(group=self.group))
        return sorted({*self._registered, *declared})

    def get(self, name: str) -> Any | None:
        """The object registered or declared as `name` (its module imported now), or None."""
        if name in self._registered:
            return self._registered[name]
        for ep in importlib.metadata.entry_points(group=self.group):
            if ep.name == name:
                return ep.load()
        return None


__all__ = ["Registry"]
