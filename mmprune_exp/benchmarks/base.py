"""Benchmark interface and registry.

A benchmark yields records (a request for the model plus the target), scores one response at a time into
a JSON-able sample row, and aggregates rows into metrics. Rows are what ``samples.jsonl`` holds, so a run
can be re-aggregated (or resumed) from the file alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprune_exp.config.schema import BenchmarkConfig
from mmprune_exp.models.base import Request
from mmprune_exp.errors import DataError
from mmprune_exp.registry import Registry


class BenchmarkDataError(DataError, FileNotFoundError):
    """A benchmark's data files are missing or unreadable; the message names ``benchmark.path``."""


@dataclass
class Record:
    """One evaluation item: ``request`` goes to the model, ``target`` to the scorer."""

    id: str
    request: Request
    target: Any
    fields: dict[str, Any] = field(default_factory=dict)  # extra columns for samples.jsonl (e.g. question kind)


class Benchmark(ABC):
    name: str = ""

    def __init__(self, cfg: BenchmarkConfig):
        self.cfg = cfg

    @abstractmethod
    def load_records(self, limit: int | None) -> list[Record]:
        """The first ``limit`` records of the split (all of them for ``None``), in a fixed order."""

    @abstractmethod
    def score(self, record: Record, response: str) -> dict[str, Any]:
        """A sample row: at least ``score`` (float, 1.0 = fully right) and ``parsed`` (None when unparseable)."""

    @abstractmethod
    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics over sample rows; ``score`` is the headline number that recovery is computed from."""

    def records(self) -> list[Record]:
        return self.load_records(self.cfg.limit)

    def write_tables(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """Write the benchmark's own result files (e.g. per-subject tables) into ``out_dir``; default: none."""
        return []


BENCHMARKS = Registry("benchmark.name")


def register_benchmark(name: str):
    def decorator(cls):
        cls.name = name
        return BENCHMARKS.register(name)(cls)

    return decorator


def build_benchmark(cfg: BenchmarkConfig) -> Benchmark:
    return BENCHMARKS.get_factory(cfg.name)(cfg)
