"""Side by side with the reference implementations: Wanda and SparseGPT from a checkout of locuslab/wanda
(``lib/layerwrapper.py``'s ``WrappedGPT``, ``lib/sparsegpt.py``'s ``SparseGPT``, a copy of IST-DASLab's).

The reference code is imported from the checkout given on the command line, never copied here. One pass of
this project's sequential engine over the model feeds every target linear's input to both statistics at
once (ours and the reference wrapper's ``add_batch``), then per linear:

- wanda: the reference statistic ``scaler_row`` and the reference mask rule of ``prune_wanda`` (a stable
  sort of ``|W| * sqrt(scaler_row)`` per row, the first ``int(in * s)`` indices; ``topk`` per group for N:M)
  against :func:`mmprune_exp.pruners.wanda.wanda_mask`;
- sparsegpt: the reference ``SparseGPT.fasterprune`` on a copy of the linear (its own Hessian, damping,
  Cholesky route and loops) against this project's pruner.

It reports per linear the share of mask entries that agree and the largest difference of a weight both sides
keep, then the
time each side spent pruning, and the held-out answer perplexity of the model pruned with the weights of
either side (``--apply ours`` or ``reference`` decides which weights feed the next layer; run both to get
two models). Shapes data and the shipped tiny model by default::

    git clone https://github.com/locuslab/wanda /tmp/wanda
    python bench/compare_reference.py --wanda-repo /tmp/wanda [--sparsity 0.5 | --nm 2:4] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from mmprune_exp.calibration import build_calibration
from mmprune_exp.config.schema import SCHEMAS, CalibrationConfig, ModelConfig, PrunerConfig, SparsityConfig
from mmprune_exp.models import load_adapter
from mmprune_exp.pruners import build_pruner
from mmprune_exp.pruners.engine import SequentialEngine, collect_layer_inputs
from mmprune_exp.pruners.wanda import wanda_mask

ROOT = Path(__file__).resolve().parents[1]


def import_reference(repo: Path):
    """``WrappedGPT`` and ``SparseGPT`` from the checkout; their CUDA-only calls become no-ops on CPU."""
    if not (repo / "lib" / "sparsegpt.py").exists():
        raise SystemExit(f"--wanda-repo {repo}: lib/sparsegpt.py not found (clone github.com/locuslab/wanda)")
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # fasterprune syncs unconditionally
        torch.cuda.empty_cache = lambda *a, **k: None
    sys.path.insert(0, str(repo))
    from lib.layerwrapper import WrappedGPT
    from lib.sparsegpt import SparseGPT

    return WrappedGPT, SparseGPT


class Both:
    """Feeds one linear's inputs to this project's statistic and to the reference wrapper."""

    def __init__(self, ours, ref):
        self.ours, self.ref = ours, ref

    def add(self, x: torch.Tensor) -> None:
        self.ours.add(x)
        self.ref.add_batch(x.detach(), None)  # the reference hooks pass inp[0], shape [1, seq, in]


def reference_wanda_mask(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: SparsityConfig) -> torch.Tensor:
    """The mask rule of the reference ``prune_wanda`` (unstructured and N:M branches), restated."""
    metric = weight.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if sparsity.structure == "nm":
        for start in range(0, metric.shape[1], sparsity.m):
            group = metric[:, start : start + sparsity.m].float()
            mask.scatter_(1, start + torch.topk(group, sparsity.n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity.value)], True)
    return mask


@torch.no_grad()
def answer_perplexity(model, processor, n: int) -> float:
    """exp(mean answer-token cross-entropy) over ``n`` held-out VQA and ``n // 4`` grounding items."""
    from mmprune_exp.data import scenes
    from mmprune_exp.tiny.train import batch_loss, grounding_batch, vqa_batch

    losses = []
    vqa, ground = scenes.vqa_items("eval", n, 0), scenes.grounding_items("eval", n // 4, 0)
    for i in range(0, n, 25):
        losses.append(batch_loss(model, vqa_batch(processor, vqa[i : i + 25]))[0].item())
    for i in range(0, len(ground), 25):
        losses.append(batch_loss(model, grounding_batch(processor, ground[i : i + 25]))[0].item())
    return math.exp(sum(losses) / len(losses))


def compare(args, method: str, apply: str, WrappedGPT, RefSparseGPT) -> dict:
    adapter = load_adapter(ModelConfig(path=args.model, device=args.device))
    sparsity = args.sparsity_cfg
    cfg = SCHEMAS["pruner"].get(method, PrunerConfig)(name=method)
    pruner = build_pruner(cfg, sparsity)
    calibration = build_calibration(CalibrationConfig(name="shapes", nsamples=args.nsamples, seed=args.seed))
    engine = SequentialEngine(adapter, pruner.targets(adapter))
    inputs = collect_layer_inputs(adapter, calibration.requests, calibration.max_length)
    ref_stat = WrappedGPT if method == "wanda" else RefSparseGPT
    rows, seconds = [], {"ours": 0.0, "reference": 0.0}
    nm = sparsity.structure == "nm"

    def on_layer(index, linears, stats):
        for name, linear in linears.items():
            both = stats[name]
            short = name.split("layers.")[-1]
            start = time.perf_counter()
            if method == "wanda":
                ref_mask = reference_wanda_mask(linear.weight, both.ref.scaler_row, sparsity)
                ref_weight = linear.weight.masked_fill(ref_mask, 0)
                extra = {"scaler_max_rel_diff": float(
                    ((both.ours.scaler - both.ref.scaler_row).abs() / both.ref.scaler_row.abs().clamp_min(1e-12)).max())}
            else:
                twin = copy.deepcopy(linear)
                ref = RefSparseGPT(twin)
                ref.H, ref.nsamples = both.ref.H.clone(), both.ref.nsamples  # q/k/v share one input
                ref.fasterprune(sparsity.value, prune_n=sparsity.n if nm else 0, prune_m=sparsity.m if nm else 0,
                                blocksize=cfg.blocksize, percdamp=cfg.percdamp)  # fmt: skip
                ref_weight = twin.weight.detach()
                ours_H = both.ours.H if both.ours.H is not None else None
                extra = {"hessian_max_rel_diff": None if ours_H is None else float(
                    (ours_H - both.ref.H).abs().max() / both.ref.H.abs().max())}
            seconds["reference"] += time.perf_counter() - start
            start = time.perf_counter()
            if method == "wanda":
                ours_mask = wanda_mask(linear.weight, both.ours.scaler, sparsity)
                ours_weight = linear.weight.masked_fill(ours_mask, 0)
            else:
                pruner.prune_linear(name, linear, both.ours, sparsity)
                ours_weight = linear.weight.detach().clone()
            seconds["ours"] += time.perf_counter() - start
            agree = ((ours_weight == 0) == (ref_weight == 0)).float().mean().item()
            scale = ref_weight.abs().max().item() or 1.0
            kept = (ours_weight != 0) & (ref_weight != 0)  # where the masks differ the gap is the weight itself
            rows.append({"linear": short, "mask_agreement": agree,
                         "max_weight_diff_rel": (ours_weight - ref_weight)[kept].abs().max().item() / scale,
                         "sparsity_ours": (ours_weight == 0).float().mean().item(),
                         "sparsity_reference": (ref_weight == 0).float().mean().item(), **extra})  # fmt: skip
            linear.weight.copy_(ours_weight if apply == "ours" else ref_weight)
        return True

    make_stat = lambda linear: Both(pruner.make_stat(linear), ref_stat(linear))
    engine.run(inputs, make_stat, on_layer, desc=f"{method} vs reference")
    return {"method": method, "apply": apply, "rows": rows, "prune_seconds": seconds,
            "answer_perplexity": answer_perplexity(adapter.model, adapter.processor, args.eval_items)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wanda-repo", type=Path, required=True, help="a checkout of github.com/locuslab/wanda")
    parser.add_argument("--model", default=str(ROOT / "mmprune_exp" / "assets" / "qwen2_5_vl_tiny"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=["wanda", "sparsegpt"])
    parser.add_argument("--apply", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nm", help="N:M instead of unstructured, e.g. 2:4")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-items", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.nm:
        n, m = (int(v) for v in args.nm.split(":"))
        args.sparsity_cfg = SparsityConfig(name=f"{n}of{m}", value=n / m, structure="nm", n=n, m=m)
    else:
        args.sparsity_cfg = SparsityConfig(name=f"s{round(args.sparsity * 100)}", value=args.sparsity)
    WrappedGPT, RefSparseGPT = import_reference(args.wanda_repo)
    torch.manual_seed(args.seed)
    dense = load_adapter(ModelConfig(path=args.model, device=args.device))
    results = {"dense_answer_perplexity": answer_perplexity(dense.model, dense.processor, args.eval_items), "runs": []}
    del dense
    print(f"dense answer perplexity {results['dense_answer_perplexity']:.4f}")
    for method in args.methods:
        for apply in args.apply:
            run = compare(args, method, apply, WrappedGPT, RefSparseGPT)
            results["runs"].append(run)
            agree = [r["mask_agreement"] for r in run["rows"]]
            diff = max(r["max_weight_diff_rel"] for r in run["rows"])
            print(f"\n{method}, {apply}'s weights propagated: answer perplexity {run['answer_perplexity']:.4f}; "
                  f"prune seconds ours {run['prune_seconds']['ours']:.2f} reference {run['prune_seconds']['reference']:.2f}")  # fmt: skip
            print(f"  mask agreement: min {min(agree):.6f} mean {sum(agree) / len(agree):.6f} over {len(agree)} linears; "
                  f"largest difference of a weight both keep {diff:.2e} of max |w|")  # fmt: skip
            for r in run["rows"]:
                if r["mask_agreement"] < 1.0:
                    print(f"    {r['linear']:<28} agreement {r['mask_agreement']:.6f} "
                          f"sparsity ours {r['sparsity_ours']:.4f} reference {r['sparsity_reference']:.4f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
