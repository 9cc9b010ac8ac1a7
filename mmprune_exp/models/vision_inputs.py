"""Images and videos for Qwen2.5-VL, loaded the way Qwen's cookbook loads them.

Every image and video of a request goes through qwen-vl-utils' ``process_vision_info``, whatever its form:

* an image: a PIL image, a path / ``file://`` / URL / ``data:image`` string, or a message dict
  (``{"image": ..., "min_pixels": ..., "max_pixels": ...}`` or ``{"image_url": ...}``);
* a video: a list of PIL frames (the synthetic clips), a path / ``file://`` string to a video file (an mp4),
  or a message dict (``{"video": ..., "fps": 2.0}`` or ``"nframes": 8``, ``"min_pixels"``, ``"max_pixels"``,
  ``"video_start"`` / ``"video_end"``).

So a real mp4 and a synthetic clip take one path: frames are sampled (files only: ``fps``, default 2, or
``nframes``), resized to multiples of patch x merge within the pixel budget, and the sampling rate goes to
the processor, which turns it into the temporal M-RoPE positions (``second_per_grid_ts``).

Defaults come from the loaded processor, not from qwen-vl-utils: the pixel budget is the processor's
``size`` (``model.min_pixels`` / ``model.max_pixels``; qwen-vl-utils' own video default of at least 128 tokens
per frame would blow a 56 x 56 synthetic frame up to ~160 pixels), and the resize factor is the vision
tower's patch size x merge size (7 x 2 = 14 for the tiny model, 14 x 2 = 28 for real checkpoints). Keys given
in a message dict win over these defaults.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

# Qwen's cookbook samples video files at 2 frames per second; synthetic frame lists are taken as given and
# said to be sampled at this rate (the tiny model was trained so).
DEFAULT_FPS = 2.0


def _budget(sub_processor) -> dict[str, int]:
    size = getattr(sub_processor, "size", None) or {}
    budget = {}
    if size.get("shortest_edge"):
        budget["min_pixels"] = int(size["shortest_edge"])
    if size.get("longest_edge"):
        budget["max_pixels"] = int(size["longest_edge"])
    return budget


def _image_element(image: Any, budget: dict[str, int]) -> dict[str, Any]:
    if isinstance(image, dict):
        if "image" not in image and "image_url" not in image:
            raise ValueError(f"an image message dict needs an 'image' or 'image_url' key, got keys {sorted(image)}")
        element = dict(image)
    elif isinstance(image, (Image.Image, str)):
        element = {"image": image}
    else:
        raise TypeError(f"an image must be a PIL image, a path/URL string or a message dict, got {type(image).__name__}")
    element["type"] = "image"
    for key, value in budget.items():
        element.setdefault(key, value)
    return element


def _video_element(video: Any, budget: dict[str, int]) -> dict[str, Any]:
    if isinstance(video, dict):
        if "video" not in video:
            raise ValueError(f"a video message dict needs a 'video' key, got keys {sorted(video)}")
        element = dict(video)
    elif isinstance(video, str):
        element = {"video": video}
    elif isinstance(video, (list, tuple)) and video and all(isinstance(f, Image.Image) for f in video):
        element = {"video": list(video)}
    else:
        raise TypeError("a video must be a list of PIL frames, a path to a video file or a message dict, "
                        f"got {type(video).__name__}")
    element["type"] = "video"
    if isinstance(element["video"], str) and "nframes" not in element:
        element.setdefault("fps", DEFAULT_FPS)
    if isinstance(element["video"], list):
        # A frame list is already sampled; qwen-vl-utils reads its rate from "sample_fps".
        element.setdefault("sample_fps", element.pop("fps", DEFAULT_FPS))
    for key, value in budget.items():
        element.setdefault(key, value)
    return element


def vision_messages(processor, images: list, videos: list) -> list[dict[str, Any]]:
    """One user message holding the images, then the videos, as qwen-vl-utils' message elements."""
    image_budget = _budget(getattr(processor, "image_processor", None))
    video_budget = _budget(getattr(processor, "video_processor", None)) or image_budget
    content = [_image_element(image, image_budget) for image in images]
    content += [_video_element(video, video_budget) for video in videos]
    return [{"role": "user", "content": content}]


def patch_size(processor) -> int:
    """The vision tower's patch size, as the processor knows it (qwen-vl-utils multiplies it by the merge 2)."""
    return int(getattr(processor.image_processor, "patch_size", 14))


def processor_media(processor, images: list, videos: list) -> dict[str, Any]:
    """Keyword arguments for ``processor(text=..., **kwargs)``: the loaded, resized images and videos in
    order, and for videos their metadata (what the sampling rate is read from) and ``do_sample_frames=False``
    (frames are sampled here, as in the cookbook)."""
    if not images and not videos:
        return {}
    from qwen_vl_utils import process_vision_info

    if any(_is_file_video(v) for v in videos) and not _video_reader():
        # qwen-vl-utils would fall back to torchvision.io.read_video, which torchvision 0.22+ no longer has,
        # and fail with an AttributeError deep inside.
        raise RuntimeError("reading a video file needs decord or torchcodec (pip install decord); "
                           "torchvision no longer reads videos")

    merge = int(getattr(processor.image_processor, "merge_size", 2))
    if merge != 2:  # qwen-vl-utils hard-codes SPATIAL_MERGE_SIZE = 2
        raise ValueError(f"qwen-vl-utils assumes spatial merge size 2, this processor has {merge}")
    # return_video_metadata: transformers 5 reads each video's sampling rate from its metadata
    # (sampled_fps -> second_per_grid_ts); the older fps list in video_kwargs is refused there.
    image_inputs, video_inputs, video_kwargs = process_vision_info(
        vision_messages(processor, images, videos), return_video_kwargs=True, return_video_metadata=True,
        image_patch_size=patch_size(processor),
    )
    kwargs: dict[str, Any] = {}
    if image_inputs:
        kwargs["images"] = image_inputs
    if video_inputs:
        kwargs["videos"] = [video for video, _ in video_inputs]
        kwargs["video_metadata"] = [_metadata(meta) for _, meta in video_inputs]
        kwargs.update(video_kwargs)  # do_sample_frames=False: sampled above
    return kwargs


def _is_file_video(video: Any) -> bool:
    return isinstance(video, str) or (isinstance(video, dict) and isinstance(video.get("video"), str))


def _video_reader() -> str | None:
    import importlib.util

    return next((name for name in ("torchcodec", "decord") if importlib.util.find_spec(name)), None)


def _metadata(meta: dict[str, Any]) -> dict[str, Any]:
    meta = dict(meta)
    indices = meta.get("frames_indices")
    if indices is not None and not isinstance(indices, list):
        meta["frames_indices"] = [int(i) for i in indices]  # torchvision's reader gives a tensor
    return meta
