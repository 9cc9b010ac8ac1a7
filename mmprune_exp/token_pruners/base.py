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
from typing import TYPE_CHECKING, Any

from mmprune_exp.config.schema import require
from mmprune_exp.errors import ConfigError
from mmprune_exp.models.base import ModelAdapter, Request
from mmprune_exp.models.token_reduction import DecoderShape, LayerPlan, LayerWork, ReductionPoint, TokenRecord
from mmprune_exp.registry import Registry

if TYPE_CHECKING:
    from mmprune_exp.calibration import CalibrationData

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
    #: :meth:`prepare` reads the calibration set (the run builds it, as for a calibrated weight pruner)
    needs_calibration = False

    def __init__(self, cfg: TokenPrunerConfig):
        self.cfg = cfg

    def points(self, adapter: ModelAdapter) -> list[ReductionPoint]:
        """Where and how this method reduces tokens, for this model (empty: nothing is pruned)."""
        return []

    def layer_plans(self, adapter: ModelAdapter) -> dict[int, LayerPlan]:
        """What each decoder layer computes for visual tokens (empty: every layer is the stock one)."""
        return {}

    def check_model(self, model_cfg) -> None:
        """Before the model loads: what this method needs from the configured model (e.g. files beside its
        weights) is there. Default: nothing to check."""

    def prepare(self, adapter: ModelAdapter, calibration: CalibrationData | None, run_dir: Path | None) -> None:
        """Before the pruned evaluation, on the model it will use (after weight pruning): calibrate what the
        method needs and write its artifacts to ``run_dir``. Default: nothing to prepare."""

    @property
    def active(self) -> bool:
        return self.cfg.name != "none"

    @contextmanager
    def attach(self, adapter: ModelAdapter, out_dir: Path | None = None) -> Iterator[TokenSession]:
        reduce = self.cfg.keep_ratio < 1.0 or self.always_reduce
        points = self.points(adapter) if reduce else []
        plans = self.layer_plans(adapter) if reduce else {}
        stats = self.needs_vision_stats and bool(points)
        if not points and not plans:
            try:  # nothing to install: a model family without the mechanism is evaluated as is, with no token report
                adapter.token_reduction([], vision_stats=False)
            except (NotImplementedError, AttributeError):
                yield None
                return
        # Without plans the adapter is called as before plans existed (an adapter may not know them).
        with (adapter.token_reduction(points, vision_stats=stats, plans=plans) if plans else
              adapter.token_reduction(points, vision_stats=stats)) as mechanism:  # fmt: skip
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
        shape = self.shape
        dense = shape.layer_flops(record.tokens_before) * shape.layers
        if record.layer_work:  # what each layer computed: fewer tokens, and fewer heads/keys/neurons for visual ones
            pruned = sum(shape.work_flops(w) for w in record.layer_work)
            visual = sum(shape.visual_flops(w) for w in record.layer_work)
        else:
            pruned = sum(shape.layer_flops(n) for n in record.tokens_per_layer)
            visual = None
        dense_visual = shape.visual_flops(LayerWork(record.tokens_before, record.visual_before)) * shape.layers
        row = {
            "visual_before": record.visual_before,
            "visual_kept": record.visual_kept,
            "kept_ratio": record.kept_ratio,
            "flops_ratio": pruned / dense if dense else 1.0,
        }
        if visual is not None:
            # YOPO's measure: the prefill FLOPs spent on visual tokens (their k/v, their queries, their MLP)
            row["visual_flops_ratio"] = visual / dense_visual if dense_visual else 1.0
        return row | {
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
