"""Lazily decoded image requests."""

from __future__ import annotations

import dataclasses

from PIL import Image

from mmprune_exp.benchmarks.image_files import LazyImageRequest, image_size, open_image
from mmprune_exp.models.base import Request


def test_lazy_request_has_every_request_field_and_decodes_on_access(tmp_path):
    path = tmp_path / "a.png"
    Image.new("L", (30, 20), 128).save(path)
    lazy = LazyImageRequest("hello", [path, path.read_bytes()])
    plain = Request("hello")
    for f in dataclasses.fields(Request):
        if f.name != "images":
            assert getattr(lazy, f.name) == getattr(plain, f.name), f.name
    images = lazy.images
    assert [img.size for img in images] == [(30, 20), (30, 20)] and all(img.mode == "RGB" for img in images)
    assert lazy.images[0] is not images[0]  # decoded again: nothing is held between batches
    assert image_size(path) == (30, 20) and open_image(path.read_bytes()).size == (30, 20)
