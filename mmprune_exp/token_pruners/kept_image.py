"""``token_pruner.save_kept``: the image (or video frames) with the kept visual tokens' cells highlighted.

One row per reduction point (PruneVid: one per stage), one panel per temporal slice of a video. Dropped cells are
darkened; a kept token that stands for a merged group is drawn at its representative's cell.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from mmprune_exp.models.base import Request
from mmprune_exp.models.token_reduction import TokenRecord

CELL = 28  # pixels per merged token in the picture (Qwen2.5-VL: 14 px patches, 2x2 merged)


def _panels(request: Request, record: TokenRecord) -> list[tuple[Image.Image, int, int, int]]:
    """(picture, original index of its first token, h, w) for every temporal slice of every image/video of the sample."""
    panels = []
    seen = {"image": 0, "video": 0}
    for item in record.items:
        k = seen[item.kind]
        seen[item.kind] += 1
        t, h, w = item.grid
        frames = [request.images[k]] if item.kind == "image" else request.videos[k]
        for ti in range(t):
            # each temporal slice covers temporal_patch_size (2) frames; show its first
            frame = frames[min(len(frames) - 1, ti * max(1, len(frames) // t))]
            panels.append((frame.convert("RGB").resize((w * CELL, h * CELL)), item.start + ti * h * w, h, w))
    return panels


def save_kept_image(request: Request, record: TokenRecord, path: Path) -> Path | None:
    """Write the picture; None when the sample has no visual token (nothing to show)."""
    if not record.items or not record.kept_by_point:
        return None
    panels = _panels(request, record)
    rows = list(record.kept_by_point.items())
    width = max(sum(p[0].width for p in panels) + 4 * (len(panels) - 1), 280)  # room for the caption
    height = max(p[0].height for p in panels)
    canvas = Image.new("RGB", (width, (height + 18) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, kept) in enumerate(rows):
        kept = set(kept)
        y0 = r * (height + 18)
        draw.text((2, y0 + 2), f"{name}: {len(kept)} of {record.visual_before} visual tokens kept", fill="black")
        x0 = 0
        for picture, start, h, w in panels:
            shaded = picture.copy()
            overlay = ImageDraw.Draw(shaded, "RGBA")
            for j in range(h * w):
                cell = (j % w * CELL, j // w * CELL, (j % w + 1) * CELL - 1, (j // w + 1) * CELL - 1)
                if start + j in kept:
                    overlay.rectangle(cell, outline=(255, 40, 40, 255), width=2)
                else:
                    overlay.rectangle(cell, fill=(0, 0, 0, 150))
            canvas.paste(shaded, (x0, y0 + 18))
            x0 += picture.width + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
