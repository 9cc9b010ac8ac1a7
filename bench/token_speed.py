"""Speed of visual-token pruning on Qwen2.5-VL-3B-shaped decoder layers: prefill, decode, memory vs analytic FLOPs.

A random-weight Qwen2.5-VL with the 3B model's decoder-layer shapes (hidden 2048, intermediate 11008, 16 heads,
2 KV heads, head_dim 128, M-RoPE [16, 24, 24]; ``--layers`` decoder layers, default 4; the tiny model's
vocabulary and a small vision tower, which are not what is measured) and the 3B's visual geometry (14-pixel
patches, 2x2 merge: one token per 28x28 pixels) runs greedy generation on

- an image of about 1,000 visual tokens (``--image-px``, default 896x896 -> 32x32 = 1,024 tokens), and
- a 16-frame video (``--video-px``, default 308x308 -> 11x11 tokens per 2-frame slice, 8 slices = 968 tokens),

each with a short question, for every registered token pruner at keep ratios 1.0 (the unpruned model), 0.5,
0.25 and 0.1. Reported per (input, method, keep ratio): LLM prefill seconds (the vision tower is timed apart, as
``vision_s``), decode seconds for ``--new-tokens`` tokens, the analytic prefill FLOPs ratio pruned/dense (the
token report's ``flops_ratio``), the measured prefill speed-up dense/pruned, and ``speedup_vs_analytic`` =
measured speed-up / (1 / flops_ratio). Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the
call above what was allocated before it; on CPU, the sampled peak RSS above the RSS before the call (a thread
reads /proc every 2 ms: approximate, but all methods are measured the same way). Times are the median of
``--repeats`` runs after one warm-up; absolute times are noisy on shared machines, the ratios of one run are
what to compare.

Target (issue 11): at keep 0.25 the measured prefill speed-up is at least 0.8x the analytic one.
Run: ``python bench/token_speed.py [--json out.json] [--layers 4] [--device cpu|cuda] [--methods fastv ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SHAPES = {"hidden": 2048, "intermediate": 11008, "heads": 16, "kv_heads": 2, "mrope_section": [16, 24, 24]}
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)


def build(layers: int, device: str, image_px: int, video_px: int, seed: int = 0):
    from mmprune_exp.models.qwen2_5_vl import Qwen25VLAdapter
    from mmprune_exp.tiny.build import TinyArch, build_config, build_model, build_processor

    torch.manual_seed(seed)
    processor = build_processor()
    for proc, px in ((processor.image_processor, image_px), (processor.video_processor, video_px)):
        proc.patch_size = 14  # the 3B's geometry: 14 px patches
        proc.size = {"shortest_edge": 56 * 56, "longest_edge": px * px}
    arch = TinyArch(text_hidden=SHAPES["hidden"], text_intermediate=SHAPES["intermediate"], text_layers=layers,
                    text_heads=SHAPES["heads"], text_kv_heads=SHAPES["kv_heads"],
                    mrope_section=SHAPES["mrope_section"])  # fmt: skip
    config = build_config(processor.tokenizer, arch)
    config.vision_config.patch_size = 14
    config.vision_config.window_size = 112  # the 3B's
    model = build_model(config).to(device).eval()
    return Qwen25VLAdapter.from_loaded(model, processor, device)


def untrained_glimpse(adapter) -> Path:
    """A randomly initialised GlimpsePrune module for ``adapter``, saved once per process (speed only)."""
    import tempfile

    from mmprune_exp.token_pruners.glimpse import GlimpseModule, GlimpseModuleConfig

    if not hasattr(untrained_glimpse, "path"):
        torch.manual_seed(0)
        untrained_glimpse.path = GlimpseModule(GlimpseModuleConfig.for_model(adapter)).save(
            Path(tempfile.mkdtemp(prefix="glimpse-bench-")) / "glimpse")
    return untrained_glimpse.path


def inputs(image_px: int, video_px: int, frames: int = 16):
    from mmprune_exp.models.base import Request

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (image_px, image_px, 3), dtype=np.uint8))
    video = [Image.fromarray(rng.integers(0, 255, (video_px, video_px, 3), dtype=np.uint8)) for _ in range(frames)]
    question = "What is shown here? Answer in one sentence."
    return {"image": Request(question, images=[image]), "video": Request(question, videos=[video])}


class PeakMemory:
    """Peak memory of the enclosed call above its starting level (bytes; see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = self._rss()
            self._top = self.base
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self._top = max(self._top, self._rss())
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, self._rss()) - self.base


def measure(adapter, pruner, request, new_tokens: int, repeats: int) -> dict:
    from mmprune_exp.token_pruners import TokenSession

    runs = []
    with pruner.attach(adapter) as session:
        session: TokenSession
        for i in range(repeats + 1):
            with PeakMemory(adapter.device) as mem, torch.inference_mode():
                adapter.model.generate(**adapter.encode([request]), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=adapter.tokenizer.pad_token_id)  # fmt: skip
            if i == 0:
                continue  # warm-up
            row = session.sample_row(session.mechanism.records[0], 1)
            runs.append(row | {"peak_mem_mb": mem.peak / 2**20})
    out = {k: statistics.median(r[k] for r in runs) for k in ("vision_s", "prefill_s", "decode_s", "peak_mem_mb")}
    first = runs[0]
    out |= {k: first[k] for k in ("visual_before", "visual_kept", "kept_ratio", "flops_ratio", "kv_cache_bytes")}
    return out


def main() -> None:
    from mmprune_exp.calibration import CalibrationData
    from mmprune_exp.config.schema import SCHEMAS, register_configs
    from mmprune_exp.token_pruners import TOKEN_PRUNERS, build_token_pruner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-px", type=int, default=896)
    p.add_argument("--video-px", type=int, default=308)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=None, help="token pruners (default: every registered one)")
    p.add_argument("--keep", nargs="*", type=float, default=list(KEEP_RATIOS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    register_configs()
    methods = args.methods or sorted(m for m in TOKEN_PRUNERS if m != "none")
    adapter = build(args.layers, args.device, args.image_px, args.video_px)
    rows = []
    for kind, request in inputs(args.image_px, args.video_px).items():
        dense = measure(adapter, build_token_pruner(SCHEMAS["token_pruner"]["none"]()), request, args.new_tokens,
                        args.repeats)  # fmt: skip
        rows.append({"input": kind, "method": "none", "keep_ratio": 1.0, **dense, "prefill_speedup": 1.0,
                     "speedup_vs_analytic": 1.0})  # fmt: skip
        for method in methods:
            schema = SCHEMAS["token_pruner"][method]
            for keep in (k for k in args.keep if k < 1.0):
                extra = {}
                if method == "glimpse":  # an untrained module (random weights, like the model): at threshold 0 every
                    # token passes and the cap keeps floor(keep·N), so the budget is the other methods' budget
                    extra = {"threshold": 0.0, "module": str(untrained_glimpse(adapter))}
                pruner = build_token_pruner(schema(name=method, keep_ratio=keep, **extra))
                if pruner.needs_calibration:  # YOPO's head mask: calibrated on the measured input itself (its
                    # statistics do not change the FLOPs or the speed, only which heads are kept)
                    pruner.prepare(adapter, CalibrationData("bench", [request], max_length=1 << 20), None)
                r = measure(adapter, pruner, request, args.new_tokens, args.repeats)
                speedup = dense["prefill_s"] / r["prefill_s"]
                rows.append({"input": kind, "method": method, "keep_ratio": keep, **r, "prefill_speedup": speedup,
                             "speedup_vs_analytic": speedup * r["flops_ratio"]})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    import pandas as pd

    table = pd.DataFrame(rows)
    cols = ["input", "method", "keep_ratio", "visual_before", "visual_kept", "flops_ratio", "prefill_s",
            "prefill_speedup", "speedup_vs_analytic", "decode_s", "vision_s", "kv_cache_bytes", "peak_mem_mb"]  # fmt: skip
    print(table[cols].to_markdown(index=False, floatfmt=".3f"))
    meta = {"layers": args.layers, "device": args.device, "threads": args.threads, "shapes": SHAPES,
            "torch": torch.__version__, "new_tokens": args.new_tokens, "repeats": args.repeats}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
