"""The adapter's token-reduction mechanism (Qwen2.5-VL): exactness, positions, masks, cache, batching, FastV.

Most tests use the shipped tiny model (its attention is trained, so selections are decisive rather than near-ties)
and compare the reduced forward with the stock one of the same model.
"""

from __future__ import annotations

import pytest
import torch

from mmprune_exp import ASSETS_DIR
from mmprune_exp.config.schema import ModelConfig
from mmprune_exp.data import scenes
from mmprune_exp.errors import ConfigError
from mmprune_exp.models import load_adapter
from mmprune_exp.models.base import Request
from mmprune_exp.models.token_reduction import ReductionPoint, Selection
from mmprune_exp.token_pruners import build_token_pruner
from mmprune_exp.token_pruners.fastv import FastVConfig, fastv_select

TINY = str(ASSETS_DIR / "qwen2_5_vl_tiny")


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def adapter(request):
    return load_adapter(ModelConfig(path=TINY, device="cpu", attn_implementation=request.param))


def requests(n: int = 3) -> list[Request]:
    items = scenes.vqa_items("eval", n)
    reqs = [Request(it.question, images=[it.image]) for it in items]
    # a longer prompt in the middle: the batch is left-padded
    reqs[1] = Request(reqs[1].text + " Answer with one word, please.", images=reqs[1].images)
    return reqs


def keep_all(ctx) -> Selection:
    return Selection([ctx.valid_slots(b) for b in range(ctx.batch_size)])


def drop_every_other(ctx) -> Selection:
    return Selection([ctx.keep_all_but(b, ctx.visual_slots(b)[::2]) for b in range(ctx.batch_size)])


@pytest.mark.parametrize("after_layer", [-1, 0, 2])
def test_keeping_every_slot_reproduces_the_stock_logits_bitwise(adapter, after_layer):
    inputs = adapter.encode(requests())
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        stock = adapter.model(**inputs).logits
        with adapter.token_reduction([ReductionPoint(after_layer, keep_all, name="all")]) as tr:
            reduced = adapter.model(**inputs).logits
    # Same mask tensors, same layer calls, gathers of identical values: equality is exact, not approximate.
    # (Padding rows are not compared: their values are undefined in both.)
    assert torch.equal(reduced[valid], stock[valid])
    assert tr.records[0].tokens_per_layer == [int(valid[0].sum())] * 4


def test_keeping_every_slot_generates_the_same_text(adapter):
    reqs = requests()
    stock = adapter.generate(reqs, 8)
    with adapter.token_reduction([ReductionPoint(1, keep_all, compress_cache=True, name="all")]):
        assert adapter.generate(reqs, 8) == stock
    with adapter.token_reduction([]):  # token_pruner=none: the measured stock path
        assert adapter.generate(reqs, 8) == stock


def test_dropped_tokens_leave_the_sequence_and_the_cache(adapter):
    reqs = requests()
    for compress in (False, True):
        with adapter.token_reduction([ReductionPoint(1, drop_every_other, compress_cache=compress, name="half")]) as tr:
            adapter.generate(reqs, 4)
        for r in tr.records:
            dropped = r.visual_before - (r.visual_before + 1) // 2
            assert r.visual_kept == (r.visual_before + 1) // 2
            assert r.tokens_per_layer == [r.tokens_before] * 2 + [r.tokens_before - dropped] * 2
            full_layers = 0 if compress else 2  # layers <= after_layer keep the whole prompt unless compressed
            assert r.kv_cache_tokens == full_layers * r.tokens_before + (4 - full_layers) * (r.tokens_before - dropped)


def test_kept_tokens_keep_their_original_positions_and_decoding_continues_after_the_maximum(adapter):
    inputs = adapter.encode(requests())
    seen = {}

    def record(ctx):
        seen["origin"] = ctx.origin.clone()
        seen["positions"] = ctx.position_ids.clone()
        return drop_every_other(ctx)

    def check(ctx):  # a later point sees the gathered positions
        seen["after_origin"], seen["after_positions"] = ctx.origin.clone(), ctx.position_ids.clone()
        return keep_all(ctx)

    decode_positions = []

    def spy(module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs["cache"].get_seq_length() > 0:
            decode_positions.append(kwargs["position_ids"].clone())

    handle = adapter.model.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with adapter.token_reduction([ReductionPoint(-1, record, name="a"), ReductionPoint(1, check, name="b")]):
            adapter.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                   pad_token_id=adapter.tokenizer.pad_token_id)  # fmt: skip
    finally:
        handle.remove()
    full = seen["positions"]  # before any drop: the processor sequence's M-RoPE ids
    origin, after = seen["after_origin"], seen["after_positions"]
    for b in range(origin.shape[0]):
        kept = origin[b] >= 0
        assert torch.equal(after[:, b, kept], full[:, b, origin[b, kept]])
    # first decode step: every row of the 3-D position is the unpruned prompt's maximum + 1
    valid = inputs["attention_mask"].bool()
    first = decode_positions[0]
    for b in range(first.shape[1]):
        expected = int(full[:, b][:, valid[b]].max()) + 1
        assert first[1:, b, 0].tolist() == [expected] * 3


def test_generation_with_the_cache_equals_generation_without_it(adapter):
    """FastV (cache of layers < K kept whole): greedy decoding with the KV cache equals recomputing the whole
    sequence each step with the same prompt tokens dropped at the same layer."""
    reqs = requests(2)
    keep_ratio, steps = 0.5, 5
    inputs = adapter.encode(reqs)
    with adapter.token_reduction([ReductionPoint(1, lambda c: fastv_select(c, keep_ratio), name="fastv")]) as tr:
        out = adapter.model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                     pad_token_id=adapter.tokenizer.pad_token_id)  # fmt: skip
    kept = [set(r.kept_by_point["fastv"]) for r in tr.records]
    prompt_len = inputs["input_ids"].shape[1]

    def replay(ctx):  # the prompt's visual tokens FastV kept at prefill; every text token and new token
        keep = []
        for b in range(ctx.batch_size):
            vis = ctx.visual_slots(b)
            chosen = torch.tensor([int(s) for s in vis if int(ctx.origin[b, s]) in kept[b]], dtype=torch.long)
            keep.append(ctx.keep_all_but(b, chosen))
        return Selection(keep)

    eos = adapter.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad(), adapter.token_reduction([ReductionPoint(1, replay, name="replay")]):
        for _ in range(steps):
            logits = adapter.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                                   **extra).logits  # fmt: skip
            last = logits[:, -1].clone()
            last[:, eos] = float("-inf")  # what min_new_tokens does in generate: decode past the answer
            nxt = last.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            types = torch.cat([types, torch.zeros_like(nxt)], 1)
    assert torch.equal(ids[:, prompt_len:], out[:, prompt_len:])


def test_a_batch_of_mixed_image_sizes_equals_each_sample_alone(adapter):
    items = scenes.vqa_items("eval", 3)
    # the processor keeps these sizes (within min/max pixels), so the samples have different token counts
    size = adapter.processor.image_processor.size
    adapter.processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    try:
        _check_batch_equals_alone(adapter, items)
    finally:
        adapter.processor.image_processor.size = size


def _check_batch_equals_alone(adapter, items):
    sizes = [(112, 112), (112, 56), (84, 56)]
    reqs = [Request(it.question, images=[it.image.resize(s)]) for it, s in zip(items, sizes)]
    point = [ReductionPoint(1, lambda c: fastv_select(c, 0.5), name="fastv")]
    with adapter.token_reduction(point) as tr:
        batched = adapter.generate(reqs, 6)
        batched_records = list(tr.records)
    assert len({r.visual_before for r in batched_records}) == 3  # really different numbers of visual tokens
    for i, req in enumerate(reqs):
        with adapter.token_reduction(point) as tr:
            assert adapter.generate([req], 6) == [batched[i]]
        alone = tr.records[0]
        shift = batched_records[i].items[0].start - alone.items[0].start  # left padding in the batch
        assert sorted(x - shift for x in batched_records[i].kept_by_point["fastv"]) == sorted(
            alone.kept_by_point["fastv"]
        )


def test_fastv_keeps_the_tokens_full_eager_attention_ranks_highest():
    adapter = load_adapter(ModelConfig(path=TINY, device="cpu", attn_implementation="eager"))
    inputs = adapter.encode(requests(3))
    k, ratio = 2, 0.25
    with torch.no_grad():
        attentions = adapter.model(**inputs, output_attentions=True).attentions
    pruner = build_token_pruner(FastVConfig(keep_ratio=ratio, layer=k))
    with adapter.token_reduction(pruner.points(adapter)) as tr, torch.no_grad():
        adapter.model(**inputs)
    visual = adapter.modality_mask(inputs["input_ids"])
    for b, record in enumerate(tr.records):
        row = attentions[k - 1][b, :, -1, :].float().mean(0)  # layer K-1, last query, mean over heads
        slots = torch.nonzero(visual[b]).flatten()
        n = round(len(slots) * ratio)
        expected = set(slots[torch.topk(row[slots], n).indices].tolist())
        assert set(record.kept_by_point["fastv"]) == expected
        assert record.visual_kept == n


def test_a_selection_may_not_drop_text_or_name_padding(adapter):
    inputs = adapter.encode(requests())

    def drop_text(ctx):
        return Selection([ctx.valid_slots(b)[1:] for b in range(ctx.batch_size)])

    with adapter.token_reduction([ReductionPoint(0, drop_text, name="bad")]), pytest.raises(ValueError, match="text"):
        adapter.model(**inputs)


def test_points_outside_the_decoder_are_refused(adapter):
    with pytest.raises(ConfigError, match="after_layer=3"):
        adapter.token_reduction([ReductionPoint(3, keep_all)])
    with pytest.raises(ConfigError, match="token_pruner.layer=4"):
        build_token_pruner(FastVConfig(layer=4)).points(adapter)
