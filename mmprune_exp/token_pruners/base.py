"""Token pruners: registered selection rules over the adapter's token-reduction mechanism.

A token pruner changes inference only: :meth:`TokenPruner.attach` installs its :class:`ReductionPoint` list into
the model for the pruned evaluation (a context manager; leaving it removes every hook), so the dense baseline stays
the unpruned, full-token model and weight pruning composes with it in the same run. ``keep_ratio`` is the one
sweepable budget of every method; ``keep_ratio=1.0`` keeps every visual token, and a pruner that keeps every slot
leaves the computation op for op the stock one (the exactness tests check this).

:class:`TokenSession` turns the mechanism's per-sample records into the token report: one ``tokens`` dict per
sample (``samples.jsonl``) and their means in ``results.json`` / W&B ``tokens/``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprune_exp.config.schema import require
from mmprune_exp.errors import ConfigError
from mmprune_exp.models.base import ModelAdapter, Request
from mmprune_exp.models.token_reduction import DecoderShape, ReductionPoint, TokenRecord
from mmprune_exp.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class TokenPrunerConfig:
    name: str = "none"
    # Share of each sample's visual tokens to keep (1.0 keeps them all).
    keep_ratio: float = 1.0
    # Write, for the first N evaluated samples, a PNG of the image/video with the kept tokens' cells highlighted.
    save_kept: int = 0

    def __post_init__(self) -> None:
        require(0.0 < self.keep_ratio <= 1.0, "keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")
        require(self.save_kept >= 0, "save_kept", f"must be >= 0, got {self.save_kept}")


TOKEN_PRUNERS = Registry("token_pruner.name", ConfigError)


def register_token_pruner(name: str, schema: type[TokenPrunerConfig] | None = None):
    return TOKEN_PRUNERS.register(name, schema)


def build_token_pruner(cfg: TokenPrunerConfig) -> TokenPruner:
    return TOKEN_PRUNERS.get_factory(cfg.name)(cfg)


def keep_count(n: int, keep_ratio: float) -> int:
    """How many of ``n`` visual tokens a ratio keeps: ``round(n·ratio)`` (FastV's rule), at least one when n > 0."""
    return min(n, max(1 if n else 0, round(n * keep_ratio)))


class TokenPruner:
    """Base: no reduction point (what ``token_pruner=none`` runs: the stock computation, measured)."""

    #: the vision tower's per-token attention statistics are collected during the forward (VisionZip)
    needs_vision_stats = False

    def __init__(self, cfg: TokenPrunerConfig):
        self.cfg = cfg

    def points(self, adapter: ModelAdapter) -> list[ReductionPoint]:
        """Where and how this method reduces tokens, for this model (empty: nothing is pruned)."""
        return []

    @property
    def active(self) -> bool:
        return self.cfg.name != "none"

    @contextmanager
    def attach(self, adapter: ModelAdapter, out_dir: Path | None = None) -> Iterator[TokenSession | None]:
        points = self.points(adapter) if self.cfg.keep_ratio < 1.0 or self.always_reduce else []
        if not points:
            try:  # nothing to install: a model family without the mechanism is evaluated as is, with no token report
                adapter.token_reduction([], vision_stats=False)
            except (NotImplementedError, AttributeError):
                yield None
                return
        with adapter.token_reduction(points, vision_stats=self.needs_vision_stats and bool(points)) as mechanism:
            yield TokenSession(mechanism, adapter.decoder_shape(), self.cfg, out_dir)

    #: run the points even at keep_ratio 1.0 (the selection then keeps every slot; the exactness tests use it)
    always_reduce = False


class TokenSession:
    """Per-sample token rows of each generated batch (the evaluation runner's observer)."""

    def __init__(self, mechanism, shape: DecoderShape, cfg: TokenPrunerConfig, out_dir: Path | None):
        self.mechanism = mechanism
        self.shape = shape
        self.cfg = cfg
        self.out_dir = out_dir
        self.saved = 0

    def sample_row(self, record: TokenRecord, batch_size: int) -> dict[str, Any]:
        timing = self.mechanism.timing
        dense = self.shape.layer_flops(record.tokens_before) * self.shape.layers
        pruned = sum(self.shape.layer_flops(n) for n in record.tokens_per_layer)
        return {
            "visual_before": record.visual_before,
            "visual_kept": record.visual_kept,
            "kept_ratio": record.kept_ratio,
            "flops_ratio": pruned / dense if dense else 1.0,
            # the batch's wall time shared equally by its samples (one forward serves them all)
            "vision_s": timing.get("vision_s", 0.0) / batch_size,
            "prefill_s": timing["prefill_s"] / batch_size,
            "decode_s": timing["decode_s"] / batch_size,
            "kv_cache_bytes": self.shape.kv_bytes(record.kv_cache_tokens),
        }

    def __call__(self, ids: list[str], requests: list[Request]) -> list[dict[str, Any]]:
        """Called after ``adapter.generate`` on a batch: the ``tokens`` field of each sample's row."""
        records = self.mechanism.records
        if len(records) != len(ids):
            raise RuntimeError(f"token records for {len(records)} samples, the batch has {len(ids)}")
        rows = [{"tokens": self.sample_row(r, len(ids))} for r in records]
        if self.out_dir is not None and self.saved < self.cfg.save_kept:
            from mmprune_exp.token_pruners.kept_image import save_kept_image

            for rid, request, record in zip(ids, requests, records):
                if self.saved >= self.cfg.save_kept:
                    break
                path = save_kept_image(request, record, self.out_dir / "kept_tokens" / f"{_safe(rid)}.png")
                if path is not None:
                    self.saved += 1
        return rows


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def summarize(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Means of the per-sample token figures over the rows that have them (``results.json``'s ``tokens``)."""
    values = [r["tokens"] for r in rows if isinstance(r.get("tokens"), dict)]
    if not values:
        return None
    keys = [k for k, v in values[0].items() if isinstance(v, (int, float))]
    out = {k: sum(float(v[k]) for v in values) / len(values) for k in keys}
    out["samples"] = len(values)
    return out
