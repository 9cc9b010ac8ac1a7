"""One small registry type for every kind of plug-in (adapters, pruners, benchmarks, calibration sets, trackers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry(dict):
    """Name -> factory. ``key`` is the config key that selects an entry (``pruner.name``), used in error
    messages; its first part is the config group."""

    def __init__(self, key: str, error: type[Exception] = KeyError):
        super().__init__()
        self.key = key
        self.error = error

    @property
    def group(self) -> str:
        return self.key.split(".")[0]

    def register(self, name: str, schema: type | None = None) -> Callable[[Any], Any]:
        """Register a factory under ``name``; ``schema`` is the dataclass of the method's own config knobs.

        A method thus lives in one module and one YAML (``defaults: [/schema/<group>@_here_: <name>]``): the
        schema goes into Hydra's ConfigStore here, with no edit of ``config/schema.py``.
        """

        def decorator(factory):
            if name in self:
                raise ValueError(f"{self.key}={name!r} is registered twice ({self[name]} and {factory})")
            if schema is not None:
                from mmprune_exp.config.schema import register_schema

                register_schema(self.group, name, schema)
            self[name] = factory
            return factory

        return decorator

    def get_factory(self, name: str) -> Any:
        if name not in self:
            raise self.error(f"{self.key}={name!r} is not registered; known: {sorted(self)}")
        return self[name]
