"""Requests and forward helpers shared by the token-pruner tests (random tiny model, CPU)."""

from __future__ import annotations

import torch

from mmprune_exp.data.scenes import video_items, vqa_items
from mmprune_exp.models.base import Request


def image_request(index: int = 0, size: tuple[int, int] | None = None) -> Request:
    item = vqa_items("eval", 1, start=index)[0]
    image = item.image if size is None else item.image.resize(size)
    return Request(text=item.question, images=[image])


def video_request(index: int = 0) -> Request:
    item = video_items("eval", 1, start=index)[0]
    return Request(text=item.question, videos=[item.frames])


@torch.no_grad()
def prompt_logits(adapter, requests: list[Request], pruner=None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Logits of one forward over the prompts (no generation), the prompt's attention mask, and the token
    records (empty without a pruner). With a pruner the logits cover the kept slots only."""
    inputs = adapter.encode(requests)
    if pruner is None:
        return adapter.model(**inputs).logits, inputs["attention_mask"].bool(), []
    with pruner.attach(adapter) as session:
        logits = adapter.model(**inputs).logits
        return logits, inputs["attention_mask"].bool(), session.mechanism.records


def assert_valid_logits_equal(dense: torch.Tensor, pruned: torch.Tensor, valid: torch.Tensor) -> None:
    """Bitwise equal on real prompt positions (a padding row's logits are not defined: it attends to nothing)."""
    assert pruned.shape == dense.shape
    assert torch.equal(pruned[valid], dense[valid])


def generate(adapter, requests: list[Request], pruner, max_new_tokens: int = 6) -> tuple[list[str], list]:
    with pruner.attach(adapter) as session:
        texts = adapter.generate(requests, max_new_tokens)
        return texts, session.mechanism.records


def relative_kept(record, point: str) -> list[list[int]]:
    """Kept visual tokens of one record at ``point``, per item, as indices inside the item (padding-free)."""
    kept = set(record.kept_by_point[point])
    return [sorted(i - item.start for i in kept if item.start <= i < item.stop) for item in record.items]
