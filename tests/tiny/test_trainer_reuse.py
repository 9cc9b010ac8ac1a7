"""The tiny model's trainer builds its prompts with the adapter's prompt builder, and its training inputs are
the ones the shipped checkpoint was trained on."""

from __future__ import annotations

import hashlib

import pytest

from mmprune_exp.data import scenes
from mmprune_exp.models.base import Request
from mmprune_exp.models.qwen2_5_vl import chat_prompt
from mmprune_exp.tiny.build import build_processor
from mmprune_exp.tiny.train import grounding_batch, video_batch, vqa_batch

HEADER = "<|im_start|>user\n<|vision_start|><|{}_pad|><|vision_end|>"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_training_prompts_are_the_adapters_prompts(processor):
    # Exactly what the trainer rendered with its own builder before it used chat_prompt (one media
    # placeholder, then the text, then the open assistant turn).
    vqa = scenes.vqa_items("train", 1)[0]
    grounding = scenes.grounding_items("train", 1)[0]
    video = scenes.video_items("train", 1)[0]
    assert chat_prompt(processor, Request(vqa.question, images=[vqa.image])) == (
        HEADER.format("image") + vqa.question + ASSISTANT
    )
    assert chat_prompt(processor, Request(grounding.prompt, images=[grounding.image])) == (
        HEADER.format("image") + grounding.prompt + ASSISTANT
    )
    assert chat_prompt(processor, Request(video.question, videos=[video.frames])) == (
        HEADER.format("video") + video.question + ASSISTANT
    )
    # A training row (prompt + answer + <|im_end|>) is the adapter's conversation for (question, answer).
    batch = vqa_batch(processor, [vqa])
    text = processor.tokenizer.decode(batch.inputs["input_ids"][0])
    expected = chat_prompt(processor, Request(vqa.question, images=[vqa.image], answer=vqa.answer))
    assert text == expected.replace("<|image_pad|>", "<|image_pad|>" * 64)


def _digest(batch) -> str:
    h = hashlib.sha256()
    for key in ("input_ids", "attention_mask"):
        h.update(batch.inputs[key].numpy().tobytes())
    for part in (batch.n_target, batch.guides, batch.lens, batch.relations):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def test_training_batches_are_those_of_the_shipped_checkpoint(processor):
    # Digests of the token ids and training-only targets as built at commit 642a6fd, before the trainer's
    # prompt builder moved to the adapter. A change here means `make tiny-model` no longer rebuilds the
    # shipped model.safetensors: retrain and ship the new checkpoint, then update these.
    assert _digest(vqa_batch(processor, scenes.vqa_items("train", 16))) == "dad70059bdd9764d"
    assert _digest(grounding_batch(processor, scenes.grounding_items("train", 8))) == "5e27f14df130a443"
    assert _digest(video_batch(processor, scenes.video_items("train", 2))) == "756475301a8d3871"
