"""One small registry type for every kind of plug-in (adapters, pruners, benchmarks, calibration sets, trackers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry(dict):
    """Name -> factory. ``key`` is the config key that selects an entry, used in error messages."""

    def __init__(self, key: str, error: type[Exception] = KeyError):
        super().__init__()
        self.key = key
        self.error = error

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(factory):
            if name in self:
                raise ValueError(f"{self.key}={name!r} is registered twice ({self[name]} and {factory})")
            self[name] = factory
            return factory

        return decorator

    def get_factory(self, name: str) -> Any:
        if name not in self:
            raise self.error(f"{self.key}={name!r} is not registered; known: {sorted(self)}")
        return self[name]
