"""Cost of the calibrated pruners on Qwen2.5-VL-3B-shaped decoder layers: seconds per layer and peak memory.

A random-weight Qwen2.5-VL with the 3B model's decoder-layer shapes (hidden 2048, intermediate 11008, 16
heads, 2 KV heads; tiny vocabulary and vision tower, which are not what is measured) is saved to disk with
2 and 8 decoder layers. Each measurement runs in its own process (peak RSS is a per-process high-water
mark) with 2 threads, on 16 calibration samples of 512 tokens:

- ``plain``: one forward pass of every sample through every layer, the floor any layer-wise method pays;
- ``wanda``, ``sparsegpt``: the sequential engine (statistics pass, prune, re-forward), 50% unstructured;
- ``tamp``: TAMP as ``pruner=tamp`` runs it: the DAS dense pass (output diversity of every target Linear)
  included in the seconds, then the pruning pass with AMIA's attention prior and per-Linear token selection;
- ``*_disk``: the same with ``model.offload=disk`` (layers streamed from the shards, written back pruned).

The samples are random text from the tiny character tokenizer, with no image: DAS and AMIA need visual and
text tokens, so after the layer-0 inputs are captured a block of ``--visual-tokens`` positions (default 256 of
the 512, starting at position 16, as an image placed after a short prompt would be) is marked visual in every
sample's ``LayerInputs.visual``. The hidden states there are text embeddings, which the random weights make no
different from image embeddings; only the mask matters to what is measured (the cost of DAS's and AMIA's
per-modality means depends on the split, not on the values). The other methods never read the mask.

Seconds count the layer loop only (capturing layer-0 inputs is the same for every method and reported
apart). Run: ``python bench/prune_cost.py [--layers 2 8] [--json out.json]``; ``--layers 2 --disk-layers 8``
runs the in-memory methods at 2 layers only and the streamed ones at both depths (the memory comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"hidden": 2048, "intermediate": 11008, "heads": 16, "kv_heads": 2, "mrope_section": (16, 24, 24)}
METHODS = ("plain", "wanda", "sparsegpt", "tamp", "plain_disk", "wanda_disk", "tamp_disk")
VISUAL_START = 16  # first position marked visual (see the module docstring)


def build_checkpoint(out: Path, layers: int, seed: int = 0) -> None:
    import torch

    from mmprune_exp.tiny.build import TinyArch, build_config, build_model, build_processor

    torch.manual_seed(seed)
    processor = build_processor()
    arch = TinyArch(
        text_hidden=SHAPES["hidden"],
        text_intermediate=SHAPES["intermediate"],
        text_layers=layers,
        text_heads=SHAPES["heads"],
        text_kv_heads=SHAPES["kv_heads"],
        mrope_section=list(SHAPES["mrope_section"]),
    )
    model = build_model(build_config(processor.tokenizer, arch))
    model.save_pretrained(out, max_shard_size="1GB")
    processor.save_pretrained(out)


def mark_visual(inputs: list, tokens: int) -> list:
    """Every sample's positions ``VISUAL_START .. VISUAL_START + tokens`` marked visual (module docstring)."""
    from dataclasses import replace

    out = []
    for x in inputs:
        visual = x.visual.clone()
        end = min(VISUAL_START + tokens, visual.numel() - 1)  # keep text after the block, the last token included
        visual[VISUAL_START:end] = True
        out.append(replace(x, visual=visual))
    return out


def worker(model_dir: str, method: str, samples: int, tokens: int, visual_tokens: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from mmprune_exp.config.schema import SCHEMAS, ModelConfig, PrunerConfig, SparsityConfig
    from mmprune_exp.models import load_adapter
    from mmprune_exp.models.base import Request
    from mmprune_exp.pruners import build_pruner
    from mmprune_exp.pruners.engine import SequentialEngine, collect_layer_inputs
    from mmprune_exp.pruners.stats import RowScaler
    from mmprune_exp.utils import peak_rss_gb

    base, _, offload = method.partition("_")
    adapter = load_adapter(ModelConfig(path=model_dir, device="cpu", offload="disk" if offload else "none"))
    out_dir = Path(tempfile.mkdtemp(prefix="prune_cost_"))
    if adapter.layer_streamer is not None:
        adapter.layer_streamer.begin_output(out_dir)
    # The tiny character tokenizer: `tokens` characters -> `tokens` ids (raw text, no chat template).
    letters = "abcdefghijklmnopqrstuvwxyz "
    g = torch.Generator().manual_seed(1)
    requests = [
        Request("".join(letters[i] for i in torch.randint(0, 27, (tokens + 64,), generator=g).tolist()), raw=True)
        for _ in range(samples)
    ]
    start = time.perf_counter()
    inputs = collect_layer_inputs(adapter, requests, max_length=tokens)
    capture_s = time.perf_counter() - start
    inputs = mark_visual(inputs, visual_tokens)
    n_layers = len(adapter.decoder_layers())
    plan_s = 0.0
    start = time.perf_counter()
    if base == "plain":
        SequentialEngine(adapter, {}).run(inputs, RowScaler, lambda *a: False, desc="plain")
    else:
        cfg = SCHEMAS["pruner"].get(base, PrunerConfig)(name=base)
        pruner = build_pruner(cfg, SparsityConfig(name="s50", value=0.5))
        engine = SequentialEngine(adapter, pruner.targets(adapter))
        if base == "tamp":  # what SequentialPruner.prune does after the capture: DAS's dense pass, AMIA's prior
            pruner.adapter = adapter
            pruner.plan(engine, inputs)
            plan_s = time.perf_counter() - start
            engine.run(inputs, pruner.make_stat, pruner._prune_layer, desc=base, prepare_sample=pruner.sample_preparer())
        else:
            engine.run(inputs, pruner.make_stat, pruner._prune_layer, desc=base)
    loop_s = time.perf_counter() - start
    return {
        "method": method,
        "layers": n_layers,
        "seconds_per_layer": loop_s / n_layers,
        "plan_seconds_per_layer": plan_s / n_layers,  # TAMP: the DAS pass, included in seconds_per_layer
        "capture_s": capture_s,
        "peak_rss_gb": peak_rss_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8], help="depths at which every method runs")
    parser.add_argument(
        "--disk-layers", type=int, nargs="*", default=[], help="extra depths at which only the *_disk methods run"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--visual-tokens", type=int, default=256, help="positions marked visual in every sample")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, help="where the random checkpoints go (default: a temp dir)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.samples, args.tokens, args.visual_tokens)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prune_cost_models_"))
    rows = []
    env = os.environ | {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TQDM_DISABLE": "1"}
    plan = [(n, args.methods) for n in args.layers]
    plan += [(n, [m for m in args.methods if m.endswith("_disk")]) for n in args.disk_layers if n not in args.layers]
    for layers, methods in plan:
        model_dir = workdir / f"qwen2_5_vl_3b_shapes_{layers}l"
        if not (model_dir / "config.json").exists():
            print(f"building a random {layers}-layer checkpoint in {model_dir} ...", file=sys.stderr)
            build_checkpoint(model_dir, layers)
        for method in methods:
            cmd = [sys.executable, __file__, "--worker", str(model_dir), method,
                   "--samples", str(args.samples), "--tokens", str(args.tokens),
                   "--visual-tokens", str(args.visual_tokens)]  # fmt: skip
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {method:<11} {layers} layers: {row['seconds_per_layer']:7.1f} s/layer  "
                  f"peak RSS {row['peak_rss_gb']:5.2f} GB", file=sys.stderr)  # fmt: skip

    by = {(r["method"], r["layers"]): r for r in rows}
    print(f"\n{'method':<11} {'layers':>6} {'s/layer':>8} {'x plain':>8} {'x wanda':>8} {'peak RSS GB':>12} "
          f"{'RSS / 2-layer':>14} {'DAS s/layer':>12}")  # fmt: skip
    for r in rows:
        disk = r["method"].endswith("_disk")
        floor = by.get(("plain_disk" if disk else "plain", r["layers"]))
        ratio = r["seconds_per_layer"] / floor["seconds_per_layer"] if floor else float("nan")
        wanda = by.get(("wanda_disk" if disk else "wanda", r["layers"]))
        vs_wanda = r["seconds_per_layer"] / wanda["seconds_per_layer"] if wanda else float("nan")
        small = by.get((r["method"], min(n for n, _ in plan)))
        rss_ratio = r["peak_rss_gb"] / small["peak_rss_gb"] if small else float("nan")
        r["x_plain"], r["x_wanda"], r["rss_vs_smallest"] = ratio, vs_wanda, rss_ratio
        print(f"{r['method']:<11} {r['layers']:>6} {r['seconds_per_layer']:>8.1f} {ratio:>8.2f} {vs_wanda:>8.2f} "
              f"{r['peak_rss_gb']:>12.2f} {rss_ratio:>14.2f} {r['plan_seconds_per_layer']:>12.1f}")  # fmt: skip
    print(
        "\ntargets: sparsegpt <= 60 s/layer; wanda <= 2.2x plain; wanda_disk RSS at 8 layers <= 1.2x at 2 layers; "
        "tamp <= 2x wanda (DAS pass included)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"shapes": SHAPES, "samples": args.samples, "tokens": args.tokens, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
