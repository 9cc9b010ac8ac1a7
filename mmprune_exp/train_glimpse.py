"""Train a GlimpsePrune module (``token_pruner=glimpse``): ``python -m mmprune_exp.train_glimpse [overrides]``.

Only the new parameters train (glimpse embeddings, their projection and norm, the VIP); the model is frozen. The
target of each image's per-token logits is its box mask rasterised onto the merged token grid (reference
§2.8: box corners normalised, columns ``int(x1·W)`` .. ``min(int(x2·W), W-1)`` inclusive, rows alike); the loss is
``dice_weight·Dice + bce_weight·BCE`` of ``σ(logit)`` (the reference's 1.0 and 0.1). The reference's next-token loss
with the glimpse token inside the sequence does not apply here (the glimpse token never enters the sequence; see
:mod:`mmprune_exp.token_pruners.glimpse`).

Data: ``data=scenes`` (default) the project's grounding scenes (``scenes.grounding_items``: the prompt names a
label, the boxes are its objects); ``data=viscot`` a Visual-CoT-format JSONL (``viscot_file``: one object per line
with ``question``, ``image`` (relative to ``viscot_images``), ``bboxs`` ``[[x1, y1, x2, y2], ...]`` in pixels and
optionally ``width``/``height``; the reference trains on ``gqa_cot_train.jsonl``, ``random:20000``, seed 42).

Since the frozen model's computation of the prompt does not depend on the new parameters, each sample's decoder-
layer inputs for layers 0..K and its vision-tower features are captured once (through the same token-reduction
mechanism and hooks the pruner uses at inference), and the epochs run only the glimpse path and the VIP on them.

Deterministic for a seed (fixed thread count, seeded shuffles and initialisation). Writes the module to ``out``
(default ``<model.path>/glimpse``, where ``token_pruner=glimpse`` looks first) and logs losses and the kept-ratio
distribution to W&B (offline unless configured otherwise) in the Hydra run directory.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmprune_exp.config.schema import LoggerConfig, ModelConfig
from mmprune_exp.errors import ConfigError
from mmprune_exp.models.base import ModelAdapter, Request
from mmprune_exp.models.token_reduction import LayerObservation, LayerPlan, ReductionContext, ReductionPoint, Selection
from mmprune_exp.token_pruners.glimpse import (
    MODULE_DIR,
    GlimpseModule,
    GlimpseModuleConfig,
    VisionTap,
    glimpse_logits,
    glimpse_positions,
    glimpse_step,
    keep_rule,
)

log = logging.getLogger(__name__)


@dataclass
class TrainGlimpseConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    out: str | None = None  # null: <model.path>/glimpse
    data: str = "scenes"  # scenes | viscot
    samples: int = 2000  # training samples (scenes: train split; viscot: a seeded random subset)
    eval_samples: int = 200  # held-out samples for the logged kept ratio / recall (scenes: eval split)
    viscot_file: str | None = None
    viscot_images: str | None = None  # folder the records' image paths are relative to (null: the file's folder)
    epochs: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    warmup: float = 0.1  # share of the steps with a linear warm-up, then cosine decay (the reference's schedule)
    weight_decay: float = 0.0
    dice_weight: float = 1.0
    bce_weight: float = 0.1
    threshold: float = 0.5  # for the logged kept ratios (the pruner's default)
    seed: int = 0
    threads: int = 1  # fixed (a different count changes float reduction order); small ops gain nothing from more
    capture_batch: int = 16
    # the module (null: the reference's choices scaled to the model, GlimpseModuleConfig.for_model)
    layer: int | None = None
    vision_layers: list[int] | None = None
    fuse_size: int = 64
    cond_size: int = 64
    fuse_heads: int = 4
    dropout: float = 0.1
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(name="wandb", mode="offline",
                                                                       job_type="train_glimpse"))  # fmt: skip
    progress: bool = True


# -- targets ----------------------------------------------------------------------------------------------------


def box_mask(boxes: list[tuple[float, float, float, float]], grid: tuple[int, int, int]) -> torch.Tensor:
    """Bool ``[t·h·w]`` in raster order: the cells of ``grid`` covered by the normalised ``boxes`` (xyxy in [0, 1]),
    each from ``int(x1·W)`` to ``min(int(x2·W), W-1)`` inclusive (the reference's ``get_ref_token_mask``)."""
    t, h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        c1, c2 = int(x1 * w), min(int(x2 * w), w - 1)
        r1, r2 = int(y1 * h), min(int(y2 * h), h - 1)
        mask[r1 : r2 + 1, c1 : c2 + 1] = True
    return mask.flatten().repeat(t)


@dataclass
class Sample:
    request: Request
    boxes: list[tuple[float, float, float, float]]  # normalised xyxy


def scene_samples(split: str, n: int) -> list[Sample]:
    from mmprune_exp.data import scenes

    out = []
    for it in scenes.grounding_items(split, n):
        w, h = it.image.size
        out.append(Sample(Request(it.prompt, images=[it.image]), [(x1 / w, y1 / h, x2 / w, y2 / h)
                                                                  for x1, y1, x2, y2 in it.boxes]))  # fmt: skip
    return out


def viscot_samples(path: str | Path, images: str | Path | None = None, n: int | None = None, seed: int = 42,
                   start: int = 0) -> list[Sample]:  # fmt: skip
    """Samples from a Visual-CoT-format JSONL: ``n`` records drawn at random with ``seed`` (the reference's
    ``random:N``; all when ``n`` is None), then ``[start:]`` of them. Boxes are normalised by the record's
    ``width``/``height`` or, without them, by the image's size."""
    from PIL import Image

    path = Path(path)
    root = Path(images) if images else path.parent
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ConfigError(f"viscot_file={path}: no records")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if n is not None:
        order = order[:n]
    out = []
    for i in order[start:]:
        r = records[i]
        missing = [k for k in ("question", "image", "bboxs") if k not in r]
        if missing:
            raise ConfigError(f"viscot_file={path} record {i}: missing {missing}")
        image = Image.open(root / r["image"]).convert("RGB")
        w, h = r.get("width") or image.size[0], r.get("height") or image.size[1]
        boxes = [(x1 / w, y1 / h, x2 / w, y2 / h) for x1, y1, x2, y2 in r["bboxs"]]
        out.append(Sample(Request(str(r["question"]), images=[image]), boxes))
    return out


# -- capture ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def capture(adapter: ModelAdapter, module_cfg: GlimpseModuleConfig, samples: list[Sample],
            batch_size: int = 16, progress: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Per sample (one image each): the decoder-layer inputs of layers 0..K ``[K+1, S, D]``, M-RoPE positions
    ``[3, S]`` (no padding), the image's slots and grid, its vision-tower features, its target mask."""
    from tqdm import tqdm

    k = module_cfg.layer
    tap = VisionTap(adapter.model.model.visual, module_cfg.vision_layers)
    out: list[dict[str, Any]] = []
    current: dict[str, Any] = {}

    def probe(obs: LayerObservation) -> None:
        current.setdefault("inputs", []).append(obs.layer_input)

    def select(ctx: ReductionContext) -> Selection:
        current.setdefault("inputs", []).append(ctx.layer_input)
        current["ctx"] = ctx
        want = {"image": [it.grid for its in ctx.items for it in its if it.kind == "image"]}
        current["vision"] = tap.take(want)
        return Selection([ctx.valid_slots(b) for b in range(ctx.batch_size)])

    plans = {i: LayerPlan(probe=probe) for i in range(k)}
    batches = range(0, len(samples), batch_size)
    with tap, adapter.token_reduction([ReductionPoint(k, select, name="capture")], plans=plans):
        for s in tqdm(batches, desc="glimpse: capture", disable=not progress):
            chunk = samples[s : s + batch_size]
            current.clear()
            inputs = adapter.encode([x.request for x in chunk])
            adapter.model.model(**{key: v for key, v in inputs.items() if key != "labels"}, use_cache=False)
            ctx: ReductionContext = current["ctx"]
            stacked = torch.stack(current["inputs"])  # [K+1, B, S, D]
            for b, sample in enumerate(chunk):
                images = [it for it in ctx.items[b] if it.kind == "image"]
                if len(images) != 1:
                    raise ConfigError(f"glimpse training needs one image per sample, got {len(images)}")
                item = images[0]
                valid = ctx.valid_slots(b)
                first = int(valid[0])
                slots = ctx.slots_of(b, item) - first
                out.append({
                    "inputs": stacked[:, b, first:].clone(), "mrope": ctx.position_ids[:, b, first:].clone(),
                    "slots": slots, "grid": item.grid, "vision": [f.clone() for f in current["vision"][("image", item.index)]],
                    "target": box_mask(sample.boxes, item.grid).float(),
                })  # fmt: skip
    return out


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Left-pad a mini-batch of captured samples (padding slots are masked; positions there are irrelevant)."""
    s = max(r["inputs"].shape[1] for r in rows)
    kp1, _, d = rows[0]["inputs"].shape
    x = torch.zeros(kp1, len(rows), s, d, dtype=rows[0]["inputs"].dtype)
    mrope = torch.ones(3, len(rows), s, dtype=rows[0]["mrope"].dtype)
    valid = torch.zeros(len(rows), s, dtype=torch.bool)
    slots = []
    for b, r in enumerate(rows):
        n = r["inputs"].shape[1]
        x[:, b, s - n :] = r["inputs"]
        mrope[:, b, s - n :] = r["mrope"]
        valid[b, s - n :] = True
        slots.append(r["slots"] + (s - n))
    return {"inputs": x, "mrope": mrope, "valid": valid, "slots": slots, "rows": rows}


def module_logits(adapter: ModelAdapter, module: GlimpseModule, batch: dict[str, Any]) -> list[torch.Tensor]:
    """The VIP's logits ``[N]`` of each sample's image, differentiable in the module's parameters (the inference
    path of :class:`~mmprune_exp.token_pruners.glimpse.GlimpseSelector` on captured layer inputs)."""
    text = adapter.model.model.language_model
    k = module.cfg.layer
    x, mrope, valid = batch["inputs"], batch["mrope"], batch["valid"]
    g_pos = glimpse_positions(mrope)
    cos_sin = text.rotary_emb(x[0], mrope)
    g_cos_sin = text.rotary_emb(x[0], g_pos)
    g = module.embedding(0).to(x.dtype).expand(x.shape[1], -1)
    for i in range(k):
        g = glimpse_step(text.layers[i], g, x[i], valid, cos_sin, g_cos_sin) + module.embedding(i + 1).to(x.dtype)
    logits = glimpse_logits(text.layers[k], g, x[k], cos_sin, g_cos_sin)
    return [module.vip(logits[b, :, sl].T, r["vision"], r["grid"]) for b, (sl, r) in
            enumerate(zip(batch["slots"], batch["rows"]))]  # fmt: skip


def losses(logits: list[torch.Tensor], rows: list[dict[str, Any]], dice_w: float, bce_w: float) -> dict[str, torch.Tensor]:
    """Dice (per sample, ε=1e-6) and BCE of σ(logit) against the box mask, averaged over the batch."""
    dice, bce = [], []
    for z, r in zip(logits, rows):
        t = r["target"]
        p = torch.sigmoid(z)
        dice.append(1 - (2 * (p * t).sum() + 1e-6) / (p.sum() + t.sum() + 1e-6))
        bce.append(torch.nn.functional.binary_cross_entropy_with_logits(z, t))
    d, b = torch.stack(dice).mean(), torch.stack(bce).mean()
    return {"loss": dice_w * d + bce_w * b, "dice": d, "bce": b}


@torch.no_grad()
def evaluate(adapter, module: GlimpseModule, data: list[dict[str, Any]], cfg: TrainGlimpseConfig) -> dict[str, Any]:
    """Mean losses, and at ``cfg.threshold``: the kept-ratio distribution and the recall of target tokens."""
    module.eval()
    ratios, recalls, totals = [], [], {"loss": 0.0, "dice": 0.0, "bce": 0.0}
    for s in range(0, len(data), cfg.batch_size):
        rows = data[s : s + cfg.batch_size]
        logits = module_logits(adapter, module, collate(rows))
        for key, v in losses(logits, rows, cfg.dice_weight, cfg.bce_weight).items():
            totals[key] += float(v) * len(rows)
        for z, r in zip(logits, rows):
            keep = keep_rule(z, cfg.threshold, None, 1)
            ratios.append(float(keep.float().mean()))
            t = r["target"].bool()
            recalls.append(float((keep & t).sum() / t.sum()) if t.any() else 1.0)
    q = torch.tensor(ratios)
    return {
        **{k: v / len(data) for k, v in totals.items()},
        "kept_ratio_mean": float(q.mean()), "kept_ratio_p10": float(q.quantile(0.1)),
        "kept_ratio_p50": float(q.quantile(0.5)), "kept_ratio_p90": float(q.quantile(0.9)),
        "kept_ratio_max": float(q.max()), "target_recall": sum(recalls) / len(recalls),
        "kept_ratios": ratios,
    }  # fmt: skip


def train(adapter: ModelAdapter, cfg: TrainGlimpseConfig, train_data: list[dict[str, Any]],
          eval_data: list[dict[str, Any]] | None = None, tracker=None) -> tuple[GlimpseModule, list[dict]]:  # fmt: skip
    """Train a fresh module on captured samples; returns it (in eval mode) and the per-epoch eval records."""
    from tqdm import tqdm

    module_cfg = module_config(adapter, cfg)
    torch.manual_seed(cfg.seed)
    module = GlimpseModule(module_cfg).to(adapter.device)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(total * cfg.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, total - warm)))))  # fmt: skip
    order_rng = torch.Generator().manual_seed(cfg.seed)
    history = []
    step = 0
    bar = tqdm(total=total, desc="glimpse: train", disable=not cfg.progress)
    for epoch in range(cfg.epochs):
        module.train()
        order = torch.randperm(len(train_data), generator=order_rng).tolist()
        for s in range(0, len(order), cfg.batch_size):
            rows = [train_data[i] for i in order[s : s + cfg.batch_size]]
            out = losses(module_logits(adapter, module, collate(rows)), rows, cfg.dice_weight, cfg.bce_weight)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            out = {k: float(v.detach()) for k, v in out.items()}
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}")
            if tracker is not None:
                tracker.log({"train/" + k: v for k, v in out.items()} | {"train/lr": sched.get_last_lr()[0],
                                                                                 "step": step})  # fmt: skip
        if eval_data:
            ev = evaluate(adapter, module, eval_data, cfg)
            ratios = ev.pop("kept_ratios")
            history.append({"epoch": epoch + 1, **ev})
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in ev.items()})
            if tracker is not None:
                tracker.log({"eval/" + k: v for k, v in ev.items()} | {"epoch": epoch + 1, "step": step})
                tracker.log_table(f"eval/kept_ratio_hist_epoch{epoch + 1}", _histogram(ratios))
    bar.close()
    module.eval()
    return module, history


def _histogram(ratios: list[float], bins: int = 10) -> list[dict[str, Any]]:
    counts = [0] * bins
    for r in ratios:
        counts[min(bins - 1, int(r * bins))] += 1
    return [{"kept_ratio_from": i / bins, "kept_ratio_to": (i + 1) / bins, "images": c} for i, c in enumerate(counts)]


def module_config(adapter: ModelAdapter, cfg: TrainGlimpseConfig) -> GlimpseModuleConfig:
    return GlimpseModuleConfig.for_model(adapter, cfg.layer, cfg.vision_layers, fuse_size=cfg.fuse_size,
                                         cond_size=cfg.cond_size, fuse_heads=cfg.fuse_heads, dropout=cfg.dropout)  # fmt: skip


def load_samples(cfg: TrainGlimpseConfig) -> tuple[list[Sample], list[Sample]]:
    if cfg.data == "scenes":
        return scene_samples("train", cfg.samples), scene_samples("eval", cfg.eval_samples)
    if cfg.data == "viscot":
        if not cfg.viscot_file:
            raise ConfigError("data=viscot needs viscot_file=PATH (a Visual-CoT-format JSONL)")
        every = viscot_samples(cfg.viscot_file, cfg.viscot_images, cfg.samples + cfg.eval_samples, seed=cfg.seed)
        return every[: cfg.samples], every[cfg.samples :]
    raise ConfigError(f"data={cfg.data!r}: choose scenes or viscot")


def run(cfg: TrainGlimpseConfig, run_dir: Path) -> Path:
    from mmprune_exp.models import load_adapter
    from mmprune_exp.tracking import build_tracker

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    adapter = load_adapter(cfg.model)
    out = Path(cfg.out) if cfg.out else Path(cfg.model.path).expanduser() / MODULE_DIR
    tracker = build_tracker(cfg.logger, {"task_name": "train_glimpse", **asdict(cfg)}, run_dir)
    code = 1
    try:
        module_cfg = module_config(adapter, cfg)
        train_s, eval_s = load_samples(cfg)
        train_data = capture(adapter, module_cfg, train_s, cfg.capture_batch, cfg.progress)
        eval_data = capture(adapter, module_cfg, eval_s, cfg.capture_batch, cfg.progress) if eval_s else None
        module, history = train(adapter, cfg, train_data, eval_data, tracker)
        module.save(out)
        (out / "train_history.json").write_text(json.dumps(history, indent=2) + "\n")
        if history:
            tracker.summary({"final/" + k: v for k, v in history[-1].items()})
        log.info("glimpse module written to %s", out)
        code = 0
        return out
    finally:
        tracker.finish(code)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    from mmprune_exp.config import register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"),
                config_name="train_glimpse")  # fmt: skip
    def _main(raw) -> None:
        from hydra.core.hydra_config import HydraConfig

        merged = OmegaConf.merge(OmegaConf.structured(TrainGlimpseConfig), raw)
        cfg: TrainGlimpseConfig = OmegaConf.to_object(merged)
        run(cfg, Path(HydraConfig.get().runtime.output_dir))

    _main()


if __name__ == "__main__":
    main()
