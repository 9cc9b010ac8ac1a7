"""What pruning checkpoints (mmprune_exp/checkpointing.py) cost, on Qwen2.5-VL-3B-shaped decoder layers.

The random-weight model of ``bench/prune_cost.py`` (3B decoder-layer shapes, tiny vocabulary and vision tower),
16 calibration samples of 512 tokens, 2 threads, Wanda at 50%:

- ``wanda``: seconds per layer of the sequential engine without a checkpoint;
- ``wanda + checkpoint``: the same with ``prune_ckpt`` written after every layer (safetensors + fsync + state),
  and the seconds of that write alone;
- ``resume``: seconds per layer that a resumed job spends on a layer an earlier attempt finished (read its
  weights back, run the samples through it), instead of pruning it again;
- the bytes one layer's checkpoint takes, and what saving the next layer's inputs instead would take.

Run: ``python bench/checkpoint_cost.py [--layers 2] [--dtype float32] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    from prune_cost import build_checkpoint

    from mmprune_exp.checkpointing import PruneCheckpoint
    from mmprune_exp.config.schema import ModelConfig, PrunerConfig, SparsityConfig
    from mmprune_exp.models import load_adapter
    from mmprune_exp.models.base import Request
    from mmprune_exp.pruners import build_pruner
    from mmprune_exp.pruners.engine import SequentialEngine, collect_layer_inputs

    work = Path(tempfile.mkdtemp(prefix="checkpoint_cost_"))
    build_checkpoint(work / "model", args.layers)
    letters = "abcdefghijklmnopqrstuvwxyz "
    g = torch.Generator().manual_seed(1)
    requests = [Request("".join(letters[i] for i in torch.randint(0, 27, (args.tokens + 64,), generator=g).tolist()),
                        raw=True) for _ in range(args.samples)]  # fmt: skip

    def engine_run(checkpoint: PruneCheckpoint | None) -> float:
        adapter = load_adapter(ModelConfig(path=str(work / "model"), device="cpu", dtype=args.dtype))
        inputs = collect_layer_inputs(adapter, requests, max_length=args.tokens)
        pruner = build_pruner(PrunerConfig(name="wanda"), SparsityConfig(name="s50", value=0.5))
        if checkpoint is not None:
            checkpoint.bind("wanda", args.layers, pruner.state_dict)
        engine = SequentialEngine(adapter, pruner.targets(adapter))
        start = time.perf_counter()
        engine.run(inputs, pruner.make_stat, pruner._prune_layer, desc="wanda", checkpoint=checkpoint)
        seconds = (time.perf_counter() - start) / args.layers
        hidden_bytes = sum(x.hidden.numel() * x.hidden.element_size() for x in inputs)
        engine_run.hidden_bytes = hidden_bytes
        return seconds

    # The save itself, timed apart: on a shared machine the noise between two whole runs exceeds it.
    saving: list[float] = []
    save_layer = PruneCheckpoint.save_layer

    def timed_save_layer(self, *a, **k):
        start = time.perf_counter()
        save_layer(self, *a, **k)
        saving.append(time.perf_counter() - start)

    PruneCheckpoint.save_layer = timed_save_layer
    plain = engine_run(None)
    checkpointed = engine_run(PruneCheckpoint(work / "ckpt"))
    layer_bytes = (work / "ckpt" / "layer-00000.safetensors").stat().st_size
    resume = engine_run(PruneCheckpoint(work / "ckpt"))  # every layer done: read back and forwarded
    out = {
        "dtype": args.dtype,
        "layers": args.layers,
        "wanda_s_per_layer": round(plain, 2),
        "wanda_with_checkpoint_s_per_layer": round(checkpointed, 2),
        "checkpoint_save_s_per_layer": round(sum(saving) / len(saving), 2),
        "resume_s_per_finished_layer": round(resume, 2),
        "checkpoint_mb_per_layer": round(layer_bytes / 2**20, 1),
        "next_layer_inputs_mb": round(engine_run.hidden_bytes / 2**20, 1),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
