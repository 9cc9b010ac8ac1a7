"""Evaluation runner: batched greedy generation, per-sample jsonl written as it goes, resume, aggregation."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmprune_exp.benchmarks.base import Benchmark
from mmprune_exp.models.base import ModelAdapter

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict[str, Any]]  # one per record, in record order
    seconds: float  # generation time of this call (0 when every sample came from the file)
    resumed: int  # samples read back from an earlier, interrupted run


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a samples.jsonl by id; a torn last line (killed mid-write) is ignored."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return rows
    with path.open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["id"]] = row
    return rows


def evaluate(
    adapter: ModelAdapter,
    benchmark: Benchmark,
    samples_path: Path,
    desc: str = "eval",
) -> EvalResult:
    """Score every record of ``benchmark``; rows already in ``samples_path`` are kept, not regenerated.

    Each finished batch is appended and flushed, so an interrupted run loses at most one batch.
    """
    records = benchmark.records()
    done = read_rows(samples_path)
    wanted = {r.id for r in records}
    done = {k: v for k, v in done.items() if k in wanted}
    todo = [r for r in records if r.id not in done]
    if done:
        log.info("%s: resuming, %d of %d samples already in %s", desc, len(done), len(records), samples_path)
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    if done:
        # Rewrite without torn lines or stale ids before appending.
        with samples_path.open("w") as f:
            for r in records:
                if r.id in done:
                    f.write(json.dumps(done[r.id]) + "\n")
    elif samples_path.exists():
        samples_path.unlink()
    bs = benchmark.cfg.batch_size
    start = time.perf_counter()
    with samples_path.open("a") as f, tqdm(total=len(records), initial=len(done), desc=desc, unit="sample") as bar:
        for i in range(0, len(todo), bs):
            batch = todo[i : i + bs]
            responses = adapter.generate([r.request for r in batch], benchmark.cfg.max_new_tokens)
            for record, response in zip(batch, responses):
                row = {"id": record.id, "response": response, "target": record.target, **record.fields}
                row |= benchmark.score(record, response)
                if row.get("parsed") is None:
                    log.debug("%s: unparseable response for %s: %r", desc, record.id, response[:200])
                done[record.id] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(batch))
    seconds = time.perf_counter() - start if todo else 0.0
    rows = [done[r.id] for r in records]
    metrics = benchmark.aggregate(rows)
    unparsed = int(metrics.get("unparsed", 0))
    if unparsed:
        log.warning("%s: %d of %d responses could not be parsed (scored wrong; see %s)", desc, unparsed, len(rows), samples_path)
    return EvalResult(metrics, rows, seconds, resumed=len(records) - len(todo))
