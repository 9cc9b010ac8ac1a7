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

TAMP (``--tamp-repo``, a checkout of G-JWLee/TAMP; shared/reference/weight_pruners.md §5.4-5.6). Only the four
files DAS and AMIA live in are loaded from it, one by one (see :func:`import_tamp` for the import-time patches
of its two bugs), and they run on the same layer-0 inputs of the same calibration samples as this project:

- das: the reference ``LayerSparsity.return_sparsity`` with ``score_method=density_sum`` and one group per
  matrix (``tamp.sh``: granularity ``layer``, cap ``s + 0.1``) runs whole: its own dense pass
  (``compute_density``: ``ActivationDensity`` hooked on every Linear's outputs, with the visual mask) over
  this project's decoder layers, then its allocation loop (``compute_the_sparsity_per_group``). Its scores
  and per-matrix sparsities are compared with ``TampPruner`` (``das=true amia=false``): ``pruner.scores`` and
  ``pruner.matrix_values``. Run with the outputs in fp32 (like for like) and cast to fp16 (the reference's
  model dtype).
- amia: during this project's sequential ``tamp_amia`` pass, every target Linear's (input, output, visual
  mask, attention prior) of every sample also goes to the reference ``AdaptiveMultimodalInputActivation
  .add_batch`` (fp32, and fp16 inputs/outputs/prior as the reference model would hand them) and to
  :func:`mmprune_exp.pruners.amia.select_tokens`; the selected token sets are compared per (Linear, sample),
  then the accumulated statistic (reference ``scaler_row`` against ours) and the Wanda masks built from them.

::

    git clone https://github.com/G-JWLee/TAMP /tmp/TAMP
    python bench/compare_reference.py --tamp-repo /tmp/TAMP [--tamp-parts das amia] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import math
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from mmprune_exp.calibration import build_calibration
from mmprune_exp.config.schema import SCHEMAS, CalibrationConfig, ModelConfig, PrunerConfig, SparsityConfig
from mmprune_exp.models import load_adapter
from mmprune_exp.pruners import amia as amia_module
from mmprune_exp.pruners import build_pruner
from mmprune_exp.pruners.amia import select_tokens
from mmprune_exp.pruners.engine import SequentialEngine, collect_layer_inputs, forward_layer
from mmprune_exp.pruners.tamp import TampConfig
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


# ----------------------------------------------------------------------------------------------------------
# TAMP (G-JWLee/TAMP): DAS and AMIA


TAMP_FILES = ("utils", "base_pruner", "layer_single_base_pruner", "wanda_pruner")  # load order (imports)


def import_tamp(repo: Path) -> types.SimpleNamespace:
    """The reference's DAS and AMIA code from the checkout, with its two bugs patched at import time.

    - ``llava/__init__.py`` imports the whole LLaVA model stack; ``llava`` and ``llava.pruners`` are registered
      as empty packages whose ``__path__`` points into the checkout, and only the four files DAS and AMIA need
      are executed, each with ``spec_from_file_location`` (``TAMP_FILES``; wanda_pruner.py also imports
      transformers' llama/qwen2 rotary helpers, which exist in current transformers).
    - Bug 2 (weight_pruners.md §0): ``llava.analysis.activation_analysis`` is imported by sparsegpt_pruner.py
      and evaluate.py but is missing from the repo. It is stubbed in ``sys.modules`` so that no import of it
      can fail (neither file is loaded here).
    - Bug 1: ``LLaMALayerWandaPruner._prune`` computes the attention prior only when ``'attention' in
      token_selection``, so with ``amia`` ``add_batch`` gets ``score=None`` and fails. ``_prune`` is not run:
      the prior is computed by this project (the adapter's ``last_query_attention``, what ``TampPruner`` uses;
      the reference's own block is LLaMA/Qwen2 RoPE, not Qwen2.5-VL's M-RoPE) and passed as ``score``.
    - ``layer_single_base_pruner.py`` appends its folder to ``sys.path`` on import; that is undone.
    """
    pruners = repo / "llava" / "pruners"
    missing = [name for name in TAMP_FILES if not (pruners / f"{name}.py").exists()]
    if missing:
        raise SystemExit(f"--tamp-repo {repo}: llava/pruners/{missing[0]}.py not found (clone github.com/G-JWLee/TAMP)")

    def package(name: str, path: Path | None) -> types.ModuleType:
        module = types.ModuleType(name)
        if path is not None:
            module.__path__ = [str(path)]
        sys.modules[name] = module
        return module

    package("llava", repo / "llava")
    package("llava.pruners", pruners)
    package("llava.analysis", None)
    stub = package("llava.analysis.activation_analysis", None)

    def activation_density(*args, **kwargs):
        raise NotImplementedError("llava.analysis.activation_analysis is missing from the TAMP repo (stubbed)")

    stub.activation_density = activation_density
    saved_path = list(sys.path)
    loaded = {}
    try:
        for name in TAMP_FILES:
            spec = importlib.util.spec_from_file_location(f"llava.pruners.{name}", pruners / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        sys.path[:] = saved_path
    commit = (repo / ".git").exists() and _git_head(repo)
    return types.SimpleNamespace(lsp=loaded["layer_single_base_pruner"], wanda=loaded["wanda_pruner"], commit=commit)


def _git_head(repo: Path) -> str | None:
    import subprocess

    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def _ref_key(name: str) -> str:
    """``model.language_model.layers.3.mlp.up_proj`` -> the reference's ``model.layers.3.mlp.up_proj.weight``."""
    return f"model.layers.{name.split('layers.')[-1]}.weight"


class _RefDecoderLayer(nn.Module):
    """One of this project's decoder layers as the reference's ``compute_density`` calls it,
    ``layer(inps[j], **caches[j])[0]``. The layer's children are registered here directly, so that the
    reference's ``find_layers`` and parameter names see ``self_attn.q_proj`` ... ``mlp.down_proj``."""

    def __init__(self, layer: nn.Module, device: torch.device):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self._layer, self._device = [layer], device  # a list: not registered a second time

    def forward(self, hidden: torch.Tensor, _inputs) -> tuple[torch.Tensor]:
        return (forward_layer(self._layer[0], replace(_inputs, hidden=hidden), self._device),)


def reference_das(ref, adapter, inputs, sparsity: float, max_sparsity: float, dtype: torch.dtype) -> dict:
    """The reference's ``LayerSparsity.return_sparsity`` (density_sum, one group per matrix) on our inputs.

    Its calibration step (``prepare_calibration_input_encoder``, LLaVA-specific) is replaced by one returning
    the captured layer-0 inputs; everything after it (dense pass with ``ActivationDensity`` hooks, scores,
    budget loop) is the reference's. ``dtype=float16`` casts each Linear's outputs to fp16 before the
    reference's ``cos_pairwise_density`` (the reference model runs in fp16).
    """
    lsp = ref.lsp
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList(_RefDecoderLayer(layer, adapter.device) for layer in adapter.decoder_layers())
    # tamp.sh: --sparsity_ratio_granularity layer -> every 2-D ".layers" parameter is its own group
    mapping = {k: k for k, v in model.named_parameters() if v.dim() == 2 and ".layers" in k}
    n = len(inputs)
    calib = ([x.hidden for x in inputs], [None] * n, [{"_inputs": x} for x in inputs],
             [x.visual.reshape(1, -1) for x in inputs])  # fmt: skip
    saved = lsp.prepare_calibration_input_encoder, lsp.cos_pairwise_density
    lsp.prepare_calibration_input_encoder = lambda *args, **kwargs: calib
    if dtype != torch.float32:
        lsp.cos_pairwise_density = lambda emb, image_mask: saved[1](emb.to(dtype), image_mask)
    try:
        ls = lsp.LayerSparsity(model, None, None, n, sparsity, max_sparsity_per_layer=max_sparsity,
                               score_method="density_sum", layer_to_group_mapping=mapping)  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()) as printed, torch.no_grad():
            sparsities = ls.return_sparsity()
    finally:
        lsp.prepare_calibration_input_encoder, lsp.cos_pairwise_density = saved
    kept_line = [line for line in printed.getvalue().splitlines() if line.startswith("compute_total_keep")]
    return {"sparsity": dict(sparsities), "score": {k: float(v.sum()) for k, v in ls.importance_measure.items()},
            "check_line": kept_line[0] if kept_line else None}  # fmt: skip


def compare_das(args, ref) -> dict:
    adapter = load_adapter(ModelConfig(path=args.model, device=args.device))
    sparsity = args.sparsity_cfg
    pruner = build_pruner(TampConfig(name="tamp_das", das=True, amia=False), sparsity)
    calibration = build_calibration(CalibrationConfig(name="shapes", nsamples=args.nsamples, seed=args.seed))
    engine = SequentialEngine(adapter, pruner.targets(adapter))
    inputs = collect_layer_inputs(adapter, calibration.requests, calibration.max_length)
    start = time.perf_counter()
    pruner.plan(engine, inputs)  # our dense diversity pass and budget loop
    ours_seconds = time.perf_counter() - start
    ours_sparsity = {_ref_key(k): v for k, v in pruner.matrix_values.items()}
    ours_score = {_ref_key(k): v for k, v in pruner.scores.items()}
    out = {"max_sparsity": pruner.max_sparsity, "ours_seconds": ours_seconds, "variants": {}}
    for dtype in args.tamp_dtypes:
        start = time.perf_counter()
        got = reference_das(ref, adapter, inputs, sparsity.value, pruner.max_sparsity, getattr(torch, dtype))
        seconds = time.perf_counter() - start
        if set(got["sparsity"]) != set(ours_sparsity):
            raise RuntimeError(f"matrix names differ: {sorted(set(got['sparsity']) ^ set(ours_sparsity))[:4]}")
        rows = [{"matrix": k.removeprefix("model.layers.").removesuffix(".weight"),
                 "score_ours": ours_score[k], "score_reference": got["score"][k],
                 "sparsity_ours": ours_sparsity[k], "sparsity_reference": got["sparsity"][k]}
                for k in got["sparsity"]]  # fmt: skip
        out["variants"][dtype] = {
            "reference_seconds": seconds,
            "reference_check": got["check_line"],
            "max_abs_score_diff": max(abs(r["score_ours"] - r["score_reference"]) for r in rows),
            "max_abs_sparsity_diff": max(abs(r["sparsity_ours"] - r["sparsity_reference"]) for r in rows),
            "identical_sparsities": sum(r["sparsity_ours"] == r["sparsity_reference"] for r in rows),
            "matrices": len(rows),
            "rows": rows,
        }
    return out


class _AMIATee:
    """One Linear's output statistic: ours (``TampPruner``'s ``AMIAScaler``) plus, in the checked layers, the
    reference ``AdaptiveMultimodalInputActivation`` per dtype and our ``select_tokens`` for the token sets.

    The reference ``add_batch`` returns nothing; it folds ``Σ x²`` over the selected input tokens into its
    ``scaler_row``. So that its selection can be read back, its input is this sample's Linear input followed
    by a one-hot column block of its own per sample (``offset`` in a ``d_in + Σ_samples N`` wide input):
    the first ``d_in`` entries of ``scaler_row`` are exactly the reference statistic (columns do not mix),
    and the sample's block is positive exactly at the tokens the reference selected.
    """

    uses_output = True

    def __init__(self, ours, linear: nn.Linear, name: str, check: bool, ctx: dict):
        self.ours, self.linear, self.name, self.check, self.ctx = ours, linear, name, check, ctx
        self.refs = {}
        if check:
            width = linear.in_features + ctx["total_tokens"]
            dummy = types.SimpleNamespace(weight=torch.empty(1, width, device=linear.weight.device))
            self.refs = {d: ctx["AMIA"](dummy) for d in ctx["dtypes"]}

    def add(self, x: torch.Tensor, y: torch.Tensor, sample) -> None:
        self.ours.add(x, y, sample)
        if not self.check:
            return
        cfg, ctx = self.ctx["cfg"], self.ctx
        prior = sample.values["attention_prior"]
        ours = select_tokens(y, sample.visual, prior, k=cfg.knn, sigma=cfg.sigma, decay=cfg.decay,
                             gamma=cfg.gamma, threshold_scale=cfg.threshold_scale)  # fmt: skip
        n, offset = ours.n_tokens, ctx["offsets"][sample.index]
        record = {"linear": self.name, "sample": sample.index, "tokens": n, "ours": sorted(ours.indices.tolist())}
        ctx["records"].append(record)
        if ours.fallback:  # a guard fired: the reference would fail or never stop (amia.py docstring)
            record["skipped"] = ours.fallback
            return
        x2 = x.reshape(n, -1)
        onehot = torch.zeros(n, ctx["total_tokens"], dtype=x2.dtype, device=x2.device)
        onehot[:, offset : offset + n] = torch.eye(n, dtype=x2.dtype, device=x2.device)
        for dtype, ref in self.refs.items():
            dt = getattr(torch, dtype)
            with torch.no_grad():
                ref.add_batch(torch.cat([x2, onehot], dim=1).to(dt), y.reshape(n, -1).to(dt),
                              image_mask=sample.visual.reshape(1, -1), score=prior.to(dt))  # fmt: skip
            block = ref.scaler_row[self.linear.in_features + offset : self.linear.in_features + offset + n]
            record[dtype] = (block > 0).nonzero().squeeze(1).tolist()
            if record[dtype] != record["ours"]:
                record[f"{dtype}_diagnosis"] = _diagnose(y.reshape(n, -1), sample, ours, record[dtype], dt, cfg)


def _diagnose(y: torch.Tensor, sample, ours, ref_set: list[int], dtype: torch.dtype, cfg) -> dict:
    """Why a selection differs. The reference's neighbour lists are ``topk(k+1, smallest)[:, 1:]`` of its
    distance matrix in its dtype (restated here for diagnosis only), which keeps a token itself in its list
    when another token is at distance <= its own rounded self-distance (duplicates). Reported: how many rows
    have other neighbours than ours, how many keep themselves, how close our stopping MMD² was to the
    threshold, and whether our selection run *with the reference's neighbour lists and distances* (patched
    into ``amia._nearest``) gives the reference's set: then the neighbour rule explains the difference."""
    k = cfg.knn
    yn = torch.nn.functional.normalize(y.to(dtype), dim=-1)
    d = 1 - yn @ yn.T
    ref_knn = torch.topk(d, k=k + 1, largest=False).indices[:, 1:]
    ref_dist = torch.gather(d, 1, ref_knn).float()
    own = torch.arange(len(d), device=d.device)[:, None]
    ours_knn = ours.neighbours.to(d.device)
    differ = int((ref_knn.sort(1).values != ours_knn.sort(1).values).any(1).sum())
    nearest = amia_module._nearest
    amia_module._nearest = lambda D, k: (ref_knn.to(D.device), ref_dist.to(D))
    try:
        swapped = select_tokens(y, sample.visual, sample.values["attention_prior"], k=k, sigma=cfg.sigma,
                                decay=cfg.decay, gamma=cfg.gamma, threshold_scale=cfg.threshold_scale)  # fmt: skip
    finally:
        amia_module._nearest = nearest
    mmd2 = ours.mmd2.tolist()
    return {"rows_with_other_knn": differ, "rows_self_in_reference_knn": int((ref_knn == own).any(1).sum()),
            "ours_stop_mmd2": mmd2[-1] if mmd2 else None,
            "ours_previous_mmd2": mmd2[-2] if len(mmd2) > 1 else None, "threshold": ours.threshold,
            "with_reference_knn_equal": sorted(swapped.indices.tolist()) == ref_set}  # fmt: skip


def compare_amia(args, ref) -> dict:
    adapter = load_adapter(ModelConfig(path=args.model, device=args.device))
    sparsity = args.sparsity_cfg
    cfg = TampConfig(name="tamp_amia", das=False, amia=True)
    pruner = build_pruner(cfg, sparsity)
    pruner.adapter = adapter  # what TampPruner.prune sets before its engine pass (the prior comes from it)
    calibration = build_calibration(CalibrationConfig(name="shapes", nsamples=args.nsamples, seed=args.seed))
    engine = SequentialEngine(adapter, pruner.targets(adapter))
    inputs = collect_layer_inputs(adapter, calibration.requests, calibration.max_length)
    lengths = [x.hidden.shape[1] for x in inputs]
    names = {id(linear): (index, name) for index, linears in engine.by_layer.items() for name, linear in linears.items()}
    layers = set(args.amia_layers) if args.amia_layers else set(engine.by_layer)
    ctx = {"cfg": cfg, "AMIA": ref.wanda.AdaptiveMultimodalInputActivation, "dtypes": args.tamp_dtypes,
           "total_tokens": sum(lengths), "offsets": [sum(lengths[:i]) for i in range(len(lengths))], "records": []}
    masks = []

    def make_stat(linear):
        index, name = names[id(linear)]
        return _AMIATee(pruner.make_stat(linear), linear, name.split("layers.")[-1], index in layers, ctx)

    def on_layer(index, linears, stats):
        for name, tee in stats.items():
            if not tee.refs:
                continue
            ours_scaler = tee.ours.scaler
            ours_mask = wanda_mask(tee.linear.weight, ours_scaler, pruner.matrix_sparsity(name, index))
            row = {"linear": tee.name}
            for dtype, r in tee.refs.items():
                ref_scaler = r.scaler_row[: tee.linear.in_features]
                ref_mask = reference_wanda_mask(tee.linear.weight, ref_scaler, pruner.matrix_sparsity(name, index))
                row[f"{dtype}_scaler_max_rel_diff"] = float(
                    ((ours_scaler - ref_scaler).abs() / ref_scaler.abs().clamp_min(1e-12)).max())
                row[f"{dtype}_mask_agreement"] = (ours_mask == ref_mask).float().mean().item()
            masks.append(row)
        return pruner._prune_layer(index, linears, {name: tee.ours for name, tee in stats.items()})

    start = time.perf_counter()
    engine.run(inputs, make_stat, on_layer, desc="tamp_amia vs reference", prepare_sample=pruner.sample_preparer())
    records = ctx["records"]
    out = {"layers": sorted(layers), "seconds": time.perf_counter() - start, "calls": len(records),
           "skipped": sum("skipped" in r for r in records), "linears": masks, "variants": {}}  # fmt: skip
    for dtype in args.tamp_dtypes:
        done = [r for r in records if dtype in r]
        diff = [r for r in done if r[dtype] != r["ours"]]
        disagreements = [{"linear": r["linear"], "sample": r["sample"], "tokens": r["tokens"],
                          "ours": len(r["ours"]), "reference": len(r[dtype]),
                          "only_ours": sorted(set(r["ours"]) - set(r[dtype])),
                          "only_reference": sorted(set(r[dtype]) - set(r["ours"])),
                          **r[f"{dtype}_diagnosis"]} for r in diff]  # fmt: skip
        out["variants"][dtype] = {
            "compared": len(done),
            "explained_by_reference_knn": sum(d["with_reference_knn_equal"] for d in disagreements),
            "disagreements_with_self_in_reference_knn": sum(d["rows_self_in_reference_knn"] > 0 for d in disagreements),
            "identical_sets": len(done) - len(diff),
            "mean_selected_ours": sum(len(r["ours"]) for r in done) / max(len(done), 1),
            "mean_selected_reference": sum(len(r[dtype]) for r in done) / max(len(done), 1),
            "disagreements": disagreements,
        }
    out["skipped_reasons"] = sorted({r["skipped"] for r in records if "skipped" in r})
    return out


def print_tamp(tamp: dict) -> None:
    if "das" in tamp:
        das = tamp["das"]
        print(f"\nTAMP DAS (reference LayerSparsity density_sum, cap {das['max_sparsity']:.3f}) vs TampPruner das=true amia=false")  # fmt: skip
        for dtype, v in das["variants"].items():
            print(f"  reference on {dtype} outputs: per-matrix sparsity max |diff| {v['max_abs_sparsity_diff']:.2e} "
                  f"({v['identical_sparsities']}/{v['matrices']} identical); score max |diff| "
                  f"{v['max_abs_score_diff']:.2e}; {v['reference_check']}")  # fmt: skip
        rows = das["variants"][next(iter(das["variants"]))]["rows"]
        print("  " + "  ".join(f"{r['matrix'].split('.')[-1]}={r['sparsity_ours']:.4f}" for r in rows[:7]) + "  (layer 0, ours)")
    if "amia" in tamp:
        amia = tamp["amia"]
        print(f"\nTAMP AMIA token sets, layers {amia['layers']}: {amia['calls']} (Linear, sample) calls, "
              f"{amia['skipped']} skipped (a guard fired: {amia['skipped_reasons']})")  # fmt: skip
        for dtype, v in amia["variants"].items():
            print(f"  reference in {dtype}: {v['identical_sets']}/{v['compared']} selected sets identical; mean "
                  f"selected ours {v['mean_selected_ours']:.2f} reference {v['mean_selected_reference']:.2f}")  # fmt: skip
            if v["disagreements"]:
                by_linear: dict[str, int] = {}
                for d in v["disagreements"]:
                    by_linear[d["linear"]] = by_linear.get(d["linear"], 0) + 1
                print(f"    differing (Linear: samples): {by_linear}")
                print(f"    of the {len(v['disagreements'])} that differ: {v['explained_by_reference_knn']} become identical "
                      "when ours runs with the reference's neighbour lists (topk(k+1)[:, 1:]); in "
                      f"{v['disagreements_with_self_in_reference_knn']} the reference keeps a token as its own neighbour")  # fmt: skip
            for d in v["disagreements"][:6]:
                print(f"    {d['linear']:<20} sample {d['sample']:>3}: |S| ours {d['ours']} ref {d['reference']} of "
                      f"{d['tokens']}; only ours {d['only_ours'][:5]} only ref {d['only_reference'][:5]}; kNN rows "
                      f"differing {d['rows_with_other_knn']}, self in ref kNN {d['rows_self_in_reference_knn']}, same with "
                      f"ref kNN {d['with_reference_knn_equal']}; "
                      f"stop MMD² {d['ours_stop_mmd2']:.5f} (prev {d['ours_previous_mmd2']}) vs {d['threshold']:.5f}")  # fmt: skip
            rel = max(r[f"{dtype}_scaler_max_rel_diff"] for r in amia["linears"])
            agree = [r[f"{dtype}_mask_agreement"] for r in amia["linears"]]
            print(f"    accumulated statistic: max rel diff {rel:.2e}; Wanda mask agreement min {min(agree):.6f} "
                  f"mean {sum(agree) / len(agree):.6f} over {len(agree)} linears")  # fmt: skip
            differing = {d["linear"] for d in v["disagreements"]}
            same = [r for r in amia["linears"] if r["linear"] not in differing]
            if same:
                print(f"    on the {len(same)} linears whose token sets agree in every sample: statistic max rel diff "
                      f"{max(r[f'{dtype}_scaler_max_rel_diff'] for r in same):.2e}, Wanda masks identical on "
                      f"{sum(r[f'{dtype}_mask_agreement'] == 1.0 for r in same)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wanda-repo", type=Path, help="a checkout of github.com/locuslab/wanda")
    parser.add_argument("--tamp-repo", type=Path, help="a checkout of github.com/G-JWLee/TAMP")
    parser.add_argument("--tamp-parts", nargs="+", default=["das", "amia"], choices=["das", "amia"])
    parser.add_argument("--tamp-dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"],
                        help="dtype(s) the reference DAS/AMIA code computes in (the reference model runs in fp16)")
    parser.add_argument("--amia-layers", nargs="+", type=int, help="decoder layers whose token sets are compared "
                        "(default: all)")  # fmt: skip
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
    if not (args.wanda_repo or args.tamp_repo):
        parser.error("give --wanda-repo and/or --tamp-repo")
    torch.manual_seed(args.seed)
    results = {}
    if args.tamp_repo:
        ref = import_tamp(args.tamp_repo)
        results["tamp"] = {"commit": ref.commit, "sparsity": args.sparsity_cfg.value}
        if "das" in args.tamp_parts:
            if args.sparsity_cfg.structure == "nm":
                print("N:M ignores DAS (in the reference too): DAS comparison skipped")
            else:
                results["tamp"]["das"] = compare_das(args, ref)
        if "amia" in args.tamp_parts:
            results["tamp"]["amia"] = compare_amia(args, ref)
        print_tamp(results["tamp"])
    if not args.wanda_repo:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    WrappedGPT, RefSparseGPT = import_reference(args.wanda_repo)
    dense = load_adapter(ModelConfig(path=args.model, device=args.device))
    results.update(dense_answer_perplexity=answer_perplexity(dense.model, dense.processor, args.eval_items), runs=[])
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
