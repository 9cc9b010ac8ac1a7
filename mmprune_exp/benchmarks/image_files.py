"""Requests whose images stay on disk until the model needs them.

A real benchmark holds thousands of records (OVDEval's nine subsets: ~20k photos); decoding them all up
front would take gigabytes. :class:`LazyImageRequest` keeps only the file path (or the encoded bytes of a
parquet row) and decodes on each access of ``.images``, so memory holds one batch at a time.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from PIL import Image

from mmprune_exp.models.base import Request

ImageSource = str | Path | bytes


def open_image(source: ImageSource) -> Image.Image:
    """Decode an image file (or encoded bytes) to an RGB image with its pixels loaded and the file closed."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return img.convert("RGB")


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) from the header only."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return img.size


class LazyImageRequest(Request):
    """A :class:`Request` (images placed before the text) whose images are decoded when read."""

    def __init__(self, text: str, sources: list[ImageSource]):
        # Request is a dataclass whose generated __init__ would assign ``images`` (a property here): set every
        # other field to its default instead, so fields added to Request later keep working.
        for f in dataclasses.fields(Request):
            if f.name == "images":
                continue
            if f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
        self.text = text
        self.sources = list(sources)

    @property
    def images(self) -> list[Image.Image]:  # type: ignore[override]
        return [open_image(s) for s in self.sources]

    def __repr__(self) -> str:
        return f"LazyImageRequest(text={self.text[:60]!r}..., sources={[str(s)[:80] for s in self.sources]})"
