"""Tiny model: tokenizer, chat template, processor expansion, shipped checkpoint, training determinism."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
)

from mmprune_exp.data.scenes import grounding_items, video_items, vqa_items
from mmprune_exp.tiny import TINY_MODEL_DIR
from mmprune_exp.tiny.build import CHAT_TEMPLATE, TinyArch, build_processor
from mmprune_exp.tiny.tokenizer import SPECIAL_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def shipped():
    if not (TINY_MODEL_DIR / "model.safetensors").is_file():
        pytest.fail(f"the tiny checkpoint is missing from {TINY_MODEL_DIR}; rebuild it with mmprune_exp.tiny.train")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(TINY_MODEL_DIR)
    return model.eval(), AutoProcessor.from_pretrained(TINY_MODEL_DIR)


TEXTS = [
    "How many red shapes are there?",
    "What colour is the circle?\nA. red\nB. green\nC. blue\nD. yellow\nAnswer with the letter.",
    grounding_items("train", 1)[0].answer,
    "this island is 112 px, 12 isn't; bbox_2d_x",
    "unicode: héllo, 日本, emoji \U0001f600, tab\tend",
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_whole_word_tokens_only_match_whole_words(tokenizer):
    tokens = tokenizer.tokenize("this is 112, 12 red")
    assert tokens[:2] == ["t", "h"]  # "is" is a word token, but not inside "this"
    assert "is" in tokens and "112" in tokens and "12" in tokens and "red" in tokens
    assert "1" not in tokens


def test_special_tokens_are_single_ids(tokenizer):
    for tok in SPECIAL_TOKENS:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [tok]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == "user\nhi"


def test_chat_template_matches_qwen_format(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q"}]}]
    assert processor.apply_chat_template(video, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    assert processor.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    )


def test_processor_expands_visual_placeholders(processor):
    tok = processor.tokenizer
    item = vqa_items("eval", 1)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[item.image], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 64  # 112x112 -> 16x16 patches -> 8x8 merged
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert inputs["pixel_values"].shape == (256, 3 * 2 * 7 * 7)
    vid = video_items("eval", 1)[0]
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": vid.question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], videos=[vid.frames], return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == [[4, 8, 8]]  # 8 frames / temporal patch 2, 56x56 at patch 7
    assert inputs["input_ids"][0].tolist().count(tok.convert_tokens_to_ids("<|video_pad|>")) == 64  # 4 x 4x4


def test_shipped_checkpoint_is_consistent(shipped):
    model, processor = shipped
    tok = processor.tokenizer
    cfg = model.config
    assert cfg.model_type == "qwen2_5_vl"
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert processor.chat_template == CHAT_TEMPLATE
    assert tok("red 112 bbox_2d")["input_ids"] == build_tokenizer()("red 112 bbox_2d")["input_ids"]
    assert AutoTokenizer.from_pretrained(TINY_MODEL_DIR).convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 4_000_000
    assert (TINY_MODEL_DIR / "model.safetensors").stat().st_size < 20e6


@pytest.fixture(scope="module")
def remeasured(tmp_path_factory):
    """The shipped checkpoint evaluated now, the way run.py evaluates it (adapter, benchmark, scorer), on the
    first 48 VQA, 24 grounding and 24 video items of the held-out eval split."""
    from mmprune_exp.benchmarks.shapes import ShapesGrounding, ShapesVideo, ShapesVQA
    from mmprune_exp.config.schema import BenchmarkConfig, ModelConfig
    from mmprune_exp.evaluation import evaluate
    from mmprune_exp.models import load_adapter

    adapter = load_adapter(ModelConfig(path=str(TINY_MODEL_DIR), device="cpu"))
    out = tmp_path_factory.mktemp("remeasured")
    vqa = ShapesVQA(BenchmarkConfig(name="shapes_vqa", limit=48, batch_size=48, max_new_tokens=8))
    grounding = ShapesGrounding(BenchmarkConfig(name="shapes_grounding", limit=24, batch_size=24, max_new_tokens=160))
    video = ShapesVideo(BenchmarkConfig(name="shapes_video", limit=24, batch_size=24, max_new_tokens=8))
    return (evaluate(adapter, vqa, out / "vqa.jsonl").metrics,
            evaluate(adapter, grounding, out / "grounding.jsonl").metrics,
            evaluate(adapter, video, out / "video.jsonl").metrics)


def test_shipped_checkpoint_reaches_its_targets(remeasured):
    # Measured on these items: VQA 0.979 (count 0.92, the rest 1.0), grounding AP50 0.907, video 1.0. Over
    # the 200 items of training_report.json VQA is 0.99, AP50 0.885 and video 1.0; the thresholds are far
    # enough below that they only fail for a checkpoint that really got worse (0.5 AP50 on 200 items was
    # the foundation issue's target, video >= 0.9 issue 11's).
    vqa, grounding, video = remeasured
    assert vqa["accuracy"] >= 0.9, vqa
    assert min(v for k, v in vqa.items() if k.startswith("accuracy_")) >= 0.75, vqa  # no question kind gave up
    assert grounding["ap50"] >= 0.6, grounding
    assert video["accuracy"] >= 0.9, video
    assert min(v for k, v in video.items() if k.startswith("accuracy_")) >= 0.75, video


def test_trainer_reports_what_the_benchmarks_measure(shipped, remeasured):
    # training_report.json is written by the trainer's evaluate(): same adapter code, same scorers.
    from mmprune_exp.tiny.train import evaluate

    model, processor = shipped
    metrics = evaluate(model, processor, n_vqa=48, n_grounding=24)
    vqa, grounding, _ = remeasured
    assert metrics["vqa_accuracy"] == vqa["accuracy"]
    assert metrics["vqa_accuracy_per_kind"] == {k.removeprefix("accuracy_"): v for k, v in vqa.items()
                                                if k.startswith("accuracy_")}
    assert metrics["grounding_ap50"] == grounding["ap50"]


@torch.no_grad()
def test_shipped_checkpoint_looks_at_the_image(shipped):
    model, processor = shipped
    items = vqa_items("eval", 2)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": items[0].question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    logits = [
        model(**processor(text=[prompt], images=[it.image], return_tensors="pt")).logits[0, -1]
        for it in items
    ]
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    # And greedy generation works through the standard API, ending at <|im_end|>: a shape question
    # (a kind the shipped model answers reliably) gets its exact answer.
    item = next(it for it in vqa_items("eval", 20) if it.kind == "shape")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[item.image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    assert answer == item.answer


def test_training_is_deterministic():
    from mmprune_exp.tiny.train import TrainArgs, train

    # A miniature of the real recipe (all auxiliary losses on), three steps of each batch kind.
    arch = TinyArch(text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=64,
                    mrope_section=[2, 3, 3], vision_hidden=32, vision_depth=1, vision_heads=2, vision_intermediate=64)
    args = TrainArgs(steps=4, batch_size=4, grounding_every=2, probe_every=0, log_every=1000, warmup=1, arch=arch,
                     threads=1)
    states = []
    for _ in range(2):
        model, _, _ = train(args, log=lambda *_: None)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    args_other = TrainArgs(**{**vars(args), "seed": 1})
    other, _, _ = train(args_other, log=lambda *_: None)
    assert not torch.equal(other.state_dict()["lm_head.weight"], states[0]["lm_head.weight"])


@torch.no_grad()
def test_shipped_checkpoint_accepts_video(shipped):
    # Video input runs end to end through the plain transformers API too (no adapter, no qwen-vl-utils).
    model, processor = shipped
    items = video_items("eval", 2)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": it.question}]}],
            add_generation_prompt=True, tokenize=False,
        )
        for it in items
    ]
    inputs = processor(text=prompts, videos=[it.frames for it in items], padding=True, padding_side="left",
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]


def test_trainer_cli_sets_architecture():
    from mmprune_exp.tiny.build import build_config
    from mmprune_exp.tiny.train import parse_args

    args = parse_args(["--out", "x", "--text-hidden", "256", "--text-heads", "4", "--mrope-section", "8,12,12",
                       "--weight-decay", "0.5"])
    assert args.arch.text_hidden == 256 and args.arch.mrope_section == [8, 12, 12] and args.weight_decay == 0.5
    # Rotary sections that do not cover the head dimension are refused when the config is built.
    bad = parse_args(["--out", "x", "--text-hidden", "256", "--text-heads", "4"])
    with pytest.raises(ValueError, match="mrope_section"):
        build_config(build_tokenizer(), bad.arch)
