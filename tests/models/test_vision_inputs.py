"""Images and videos load through qwen-vl-utils (models.vision_inputs): a video file and a frame list take one
path, message dicts set fps / nframes / pixel budgets, and the processor gets what the cookbook gives it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmprune_exp.data import scenes
from mmprune_exp.models.vision_inputs import processor_media, vision_messages
from mmprune_exp.tiny.build import PATCH_SIZE, build_processor

PROMPT = "<|vision_start|><|video_pad|><|vision_end|>Q"


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def _write_mp4(path, frames: list[Image.Image], fps: int) -> None:
    # Written here with PyAV (qwen-vl-utils' own dependency), never downloaded. Lossless H.264 in 4:4:4
    # keeps every pixel within rounding of the drawn frame.
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def _video_inputs(processor, videos):
    kwargs = processor_media(processor, [], videos)
    return processor(text=[PROMPT] * len(videos), padding=True, return_tensors="pt", **kwargs)


def test_frame_list_takes_the_processors_pixels_and_a_2_fps_clock(processor):
    item = scenes.video_items("eval", 1)[0]
    ours = _video_inputs(processor, [item.frames])
    # The frames are already a multiple of patch x merge (14) and inside the budget: no resize.
    plain = processor(text=[PROMPT], videos=[item.frames], return_tensors="pt")
    assert torch.equal(ours["pixel_values_videos"], plain["pixel_values_videos"])
    side = scenes.VIDEO_SIZE // PATCH_SIZE  # patches per side of a 56 x 56 frame (8 at the tiny model's patch 7)
    assert ours["video_grid_thw"].tolist() == [[4, side, side]]  # 8 frames / temporal patch 2
    assert (ours["input_ids"] == processor.video_token_id).sum() == 4 * side * side // 4
    # Sampled at 2 fps: a temporal patch of two frames is one second. The processor alone, without the
    # metadata, would assume 24 fps (1/12 s), which is not how the frames were made.
    assert ours["second_per_grid_ts"].tolist() == [1.0]


def test_mp4_file_and_frame_list_take_one_path(processor, tmp_path):
    item = scenes.video_items("eval", 1)[0]
    path = tmp_path / "clip.mp4"
    _write_mp4(path, item.frames, fps=2)  # 8 frames at 2 fps: 4 s, sampled back at 2 fps -> the same 8
    from_file = _video_inputs(processor, [str(path)])
    from_dict = _video_inputs(processor, [{"video": f"file://{path}", "fps": 2.0}])
    from_frames = _video_inputs(processor, [item.frames])
    for inputs in (from_file, from_dict):
        assert inputs["video_grid_thw"].tolist() == from_frames["video_grid_thw"].tolist()
        assert inputs["second_per_grid_ts"].tolist() == from_frames["second_per_grid_ts"].tolist()
        assert torch.equal(inputs["input_ids"], from_frames["input_ids"])
        diff = (inputs["pixel_values_videos"] - from_frames["pixel_values_videos"]).abs()
        assert diff.max() < 0.1  # normalised units (one step of 255 is ~0.015): codec rounding only
    # nframes picks frames out of a longer file: 16 frames at 8 fps, 4 kept -> 2 temporal patches.
    long = tmp_path / "long.mp4"
    _write_mp4(long, scenes.video_items("eval", 1, num_frames=16)[0].frames, fps=8)
    inputs = _video_inputs(processor, [{"video": str(long), "nframes": 4}])
    side = scenes.VIDEO_SIZE // PATCH_SIZE
    assert inputs["video_grid_thw"].tolist() == [[2, side, side]]
    # 4 frames out of 2 s of video: 2 fps, so again one second per temporal patch.
    assert inputs["second_per_grid_ts"].tolist() == [1.0]


def test_pixel_budget_comes_from_the_processor_and_dicts_override_it(processor):
    big = Image.new("RGB", (224, 224), (200, 30, 30))
    kwargs = processor_media(processor, [big], [])
    assert kwargs["images"][0].size == (112, 112)  # max_pixels = 112 x 112, factor patch 7 x merge 2 = 14
    kwargs = processor_media(processor, [{"image": big, "max_pixels": 56 * 56}], [])
    assert kwargs["images"][0].size == (56, 56)
    frames = [Image.new("RGB", (112, 112), (0, 0, 0))] * 4
    # Video frames get the processor's budget too, not qwen-vl-utils' default of >= 128 tokens per frame.
    (element,) = vision_messages(processor, [], [frames])[0]["content"]
    assert element["min_pixels"] == 56 * 56 and element["max_pixels"] == 112 * 112
    kwargs = processor_media(processor, [], [{"video": frames, "max_pixels": 56 * 56}])
    assert tuple(kwargs["videos"][0].shape) == (4, 3, 56, 56)


def test_image_file_and_pil_image_give_the_same_pixels(processor, tmp_path):
    image = scenes.vqa_items("eval", 1)[0].image
    path = tmp_path / "scene.png"
    image.save(path)
    a = processor_media(processor, [image], [])["images"][0]
    b = processor_media(processor, [str(path)], [])["images"][0]
    c = processor_media(processor, [{"image": f"file://{path}"}], [])["images"][0]
    assert a.tobytes() == b.tobytes() == c.tobytes()


def test_bad_inputs_are_refused_with_a_clear_error(processor):
    with pytest.raises(ValueError, match="'video' key"):
        processor_media(processor, [], [{"frames": []}])
    with pytest.raises(TypeError, match="list of PIL frames, a path"):
        processor_media(processor, [], [[np.zeros((4, 4, 3))]])
    with pytest.raises(TypeError, match="PIL image, a path"):
        processor_media(processor, [np.zeros((4, 4, 3))], [])
    assert processor_media(processor, [], []) == {}
