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

from mmprune_exp.errors import DataError
from mmprune_exp.models.base import Request

ImageSource = str | Path | bytes


def _describe(source: ImageSource) -> str:
    return f"<{len(source)} bytes of an embedded image>" if isinstance(source, bytes) else str(source)


def _unreadable(source: ImageSource, err: Exception, origin: str | None) -> DataError:
    prefix = f"{origin}: image" if origin else "image"
    return DataError(f"{prefix} {_describe(source)} cannot be read ({type(err).__name__}: {err})")


def open_image(source: ImageSource, origin: str | None = None) -> Image.Image:
    """Decode an image file (or encoded bytes) to an RGB image with its pixels loaded and the file closed.

    A missing or undecodable file raises :class:`DataError` naming it (and ``origin``, the record it belongs to).
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert("RGB")
    except OSError as err:  # FileNotFoundError, PIL's UnidentifiedImageError, truncated data
        raise _unreadable(source, err, origin) from err


def image_size(source: ImageSource, origin: str | None = None) -> tuple[int, int]:
    """(width, height) from the header only."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.size
    except OSError as err:
        raise _unreadable(source, err, origin) from err


class LazyImageRequest(Request):
    """A :class:`Request` (images placed before the text) whose images are decoded when read."""

    def __init__(self, text: str, sources: list[ImageSource], origin: str | None = None):
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
        self.origin = origin  # the record the images belong to, named when one cannot be decoded

    @property
    def images(self) -> list[Image.Image]:  # type: ignore[override]
        return [open_image(s, self.origin) for s in self.sources]

    def __repr__(self) -> str:
        return f"LazyImageRequest(text={self.text[:60]!r}..., sources={[str(s)[:80] for s in self.sources]})"
