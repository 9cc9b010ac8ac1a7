"""Benchmark interface and registry.

A benchmark yields records (a request for the model plus the target), scores one response at a time into
a JSON-able sample row, and aggregates rows into metrics. Rows are what ``samples.jsonl`` holds, so a run
can be re-aggregated (or resumed) from the file alone.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprune_exp.config.schema import BenchmarkConfig
from mmprune_exp.errors import USER_ERROR_EXIT, DataError, UserError, where
from mmprune_exp.models.base import Request
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
        self._records: list[Record] | None = None

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
        """``load_records(cfg.limit)``, checked: at least one record, and no id twice.

        ``evaluation.py`` keys ``samples.jsonl`` rows by ``Record.id``, so a repeated id would let one row
        silently replace another. Read once per benchmark object: the run checks the data before the model
        loads and then evaluates the dense and the pruned model on the same records.
        """
        if self._records is not None:
            return self._records
        records = self.load_records(self.cfg.limit)
        source = f"benchmark {self.name!r}"
        path = getattr(self.cfg, "path", None)
        if path:
            source += f" (benchmark.path={str(path)!r})"
        if not records:
            raise BenchmarkDataError(f"{source}: no records to evaluate (the data holds none that can be used)")
        check_unique_ids(((i, r.id) for i, r in enumerate(records)), source, "id")
        self._records = records
        return records

    def write_tables(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """Write the benchmark's own result files (e.g. per-subject tables) into ``out_dir``; default: none."""
        return []


def check_unique_ids(indexed_ids, path, key: str, error: type[DataError] = BenchmarkDataError) -> None:
    """Raise ``error`` naming ``path``, the id and both record indices when an id repeats.

    ``indexed_ids``: ``(index, id)`` pairs; ``index`` may be any label of the record (e.g. ``"4 (line 5)"``).
    """
    seen: dict = {}
    for index, rid in indexed_ids:
        if rid in seen:
            raise error(f"{where(path, index, rid, key)}: duplicate id, record {seen[rid]} has the same one "
                        "(ids must be unique: a later record would replace the earlier)")  # fmt: skip
        seen[rid] = index


def report_user_error(err: UserError) -> int:
    """Print ``err`` as one ``error: ...`` line on stderr (the score CLIs); the exit code for it."""
    print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)
    return USER_ERROR_EXIT


BENCHMARKS = Registry("benchmark.name")


def register_benchmark(name: str, schema: type[BenchmarkConfig] | None = None):
    """Register a benchmark class under ``name``; ``schema``: its config dataclass when it has knobs of its own."""

    def decorator(cls):
        cls.name = name
        return BENCHMARKS.register(name, schema)(cls)

    return decorator


def build_benchmark(cfg: BenchmarkConfig) -> Benchmark:
    return BENCHMARKS.get_factory(cfg.name)(cfg)
