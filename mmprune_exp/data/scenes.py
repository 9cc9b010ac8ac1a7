"""Seeded synthetic shape scenes: VQA, grounding and video items.

Every item is a pure function of ``(split, task, index)``: its random generator is seeded from a SHA-256
digest of those three values, so item ``i`` never depends on how many items were requested before it,
and items of different splits come from different seed material (see ``item_seed``).

Image layout
------------
Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (112 x 112) RGB. The frame is divided into a 4 x 4 grid of
28-pixel cells. With the tiny model's patch size 7 and spatial merge 2, a merged visual token covers 14 x 14
pixels, so each cell is exactly 2 x 2 merged tokens (64 per image); objects of one image occupy distinct
cells, are jittered in size and position inside their cell, and always overlap all four tokens of it
(an object is at least 14 pixels wide and starts at most 12 pixels into its cell). An object never reaches
into another cell's tokens. Real Qwen2.5-VL checkpoints (patch 14) see each cell as one merged token.

The background is a faint, per-scene tinted gradient (red channel grows with x, green with y). It is there
on purpose: the Qwen2.5-VL vision tower has no absolute position embedding (only rotary attention), and a
model of a few million parameters trained for minutes on CPU cannot reliably recover absolute coordinates
from rotary phases alone. The gradient puts absolute position into the pixels, which makes box regression
and left/right questions learnable at this scale. The gradient stays far from the saturated shape colours.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the 112 x 112 frame with ``x2``/``y2`` exclusive, so the object
covers columns ``x1 .. x2-1`` and its width is ``x2 - x1`` (this is also the COCO ``[x, y, w, h]`` box
``[x1, y1, x2 - x1, y2 - y1]``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112
CELL = 28
GRID = IMAGE_SIZE // CELL  # 4 cells per side

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}

# Base seeds of the splits. They are distinct, and every per-item seed is derived from
# (base seed, task, index) through SHA-256, so two splits never share seed material.
SPLIT_SEEDS: dict[str, int] = {"train": 1_000, "calibration": 2_000, "eval": 3_000}

VQA_KINDS: tuple[str, ...] = ("count", "colour", "shape", "position")
VIDEO_KINDS: tuple[str, ...] = ("mover", "direction", "still")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# Object size range (square side / circle diameter / triangle base and height), in pixels.
MIN_SIZE, MAX_SIZE = 14, 22
# Minimum gap between an object and its cell border, so objects in neighbouring cells never touch.
CELL_MARGIN = 2
GROUNDING_PROMPT = "Locate every {label} in the image and output the bbox coordinates in JSON format."


@dataclass
class ShapeObj:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive, in 112x112 pixels

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the grid cell holding the object's centre."""
        cx = (self.box[0] + self.box[2]) // 2
        cy = (self.box[1] + self.box[3]) // 2
        return cy // CELL, cx // CELL


@dataclass
class Scene:
    image: Image.Image
    objects: list[ShapeObj]


@dataclass
class VQAItem:
    id: str
    image: Image.Image
    question: str
    answer: str
    kind: str  # one of VQA_KINDS
    objects: list[ShapeObj] = field(default_factory=list)  # everything in the image
    refs: list[ShapeObj] = field(default_factory=list)  # the objects the question is about


@dataclass
class GroundingItem:
    id: str
    image: Image.Image
    prompt: str
    label: str
    boxes: list[tuple[int, int, int, int]]
    answer: str
    objects: list[ShapeObj] = field(default_factory=list)  # everything in the image (targets + distractors)


@dataclass
class VideoItem:
    id: str
    frames: list[Image.Image]
    question: str
    answer: str
    kind: str  # one of VIDEO_KINDS
    tracks: list[Track] = field(default_factory=list)  # every object of the clip
    refs: list[Track] = field(default_factory=list)  # the objects the question is about


# --------------------------------------------------------------------------------------------- seeding


def _check_split(split: str) -> int:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; valid splits are {sorted(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split]


def item_seed(split: str, task: str, index: int) -> int:
    """64-bit seed of item ``index`` of ``task`` in ``split``.

    SHA-256 rather than Python's ``hash`` because the latter is salted per process. Different
    (split, task, index) triples give different digests, hence independent random streams.
    """
    base = _check_split(split)
    digest = hashlib.sha256(f"{base}:{task}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _rng(split: str, task: str, index: int) -> random.Random:
    # random.Random with an int seed is reproducible across Python versions and platforms.
    return random.Random(item_seed(split, task, index))


def _check_range(n: int, start: int) -> None:
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")


# --------------------------------------------------------------------------------------------- drawing


def _background(rng: random.Random, size: int = IMAGE_SIZE) -> np.ndarray:
    """Per-scene tinted grey with a gentle x (red) / y (green) gradient; see the module docstring."""
    base = np.array([rng.randint(92, 120), rng.randint(92, 120), rng.randint(100, 130)], dtype=np.float32)
    ramp = np.linspace(0.0, 44.0, size, dtype=np.float32)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:, :, 0] = base[0] + ramp[None, :]
    img[:, :, 1] = base[1] + ramp[:, None]
    img[:, :, 2] = base[2]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObj) -> None:
    x1, y1, x2, y2 = obj.box
    fill = COLOUR_RGB[obj.colour]
    # PIL's rectangle/ellipse take inclusive corners; our boxes are exclusive at x2/y2.
    if obj.kind == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif obj.kind == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif obj.kind == "triangle":
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
    else:  # pragma: no cover - guarded by the generators
        raise ValueError(f"unknown shape kind {obj.kind!r}")


def render(objects: list[ShapeObj], rng: random.Random) -> Image.Image:
    image = Image.fromarray(_background(rng))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return image


def _box_in_cell(rng: random.Random, cell: int) -> tuple[int, int, int, int]:
    row, col = divmod(cell, GRID)
    size = rng.randint(MIN_SIZE, MAX_SIZE)
    x1 = col * CELL + rng.randint(CELL_MARGIN, CELL - CELL_MARGIN - size)
    y1 = row * CELL + rng.randint(CELL_MARGIN, CELL - CELL_MARGIN - size)
    return (x1, y1, x1 + size, y1 + size)


def make_scene(
    rng: random.Random, specs: list[tuple[str, str]], cells: list[int] | None = None
) -> Scene:
    """Place objects ``specs`` = [(kind, colour), ...] in distinct random cells (or the given ``cells``)."""
    if cells is None:
        cells = rng.sample(range(GRID * GRID), len(specs))
    objects = [ShapeObj(kind, colour, _box_in_cell(rng, cell)) for (kind, colour), cell in zip(specs, cells)]
    return Scene(image=render(objects, rng), objects=objects)


def cell_tokens(cell: tuple[int, int], side: int) -> list[int]:
    """Raster indices of the merged visual tokens over scene cell ``(row, col)`` when the image is a ``side`` x
    ``side`` token grid (one token per cell at 4, 2 x 2 at 8): cells are token-aligned squares."""
    per_cell = side // GRID
    if per_cell * GRID != side:
        raise ValueError(f"a {side}x{side} token grid does not tile the {GRID}x{GRID} scene cells")
    row, col = cell
    return [(row * per_cell + dr) * side + col * per_cell + dc for dr in range(per_cell) for dc in range(per_cell)]


def reading_order(objects: list[ShapeObj]) -> list[ShapeObj]:
    """Row by row (grid rows), left to right: the order grounding answers list their boxes in."""
    return sorted(objects, key=lambda o: (o.cell, o.box))


# --------------------------------------------------------------------------------------------- helpers


def _other(rng: random.Random, pool: tuple[str, ...], exclude: str) -> str:
    return rng.choice([p for p in pool if p != exclude])


def _random_specs_excluding(
    rng: random.Random, n: int, bad: callable
) -> list[tuple[str, str]]:
    """``n`` random (kind, colour) pairs for which ``bad(kind, colour)`` is false."""
    allowed = [(s, c) for s in SHAPES for c in COLOURS if not bad(s, c)]
    return [rng.choice(allowed) for _ in range(n)]


def format_grounding_answer(boxes: list[tuple[int, int, int, int]], label: str) -> str:
    """Qwen2.5-VL's grounding output style: a fenced JSON list of {"bbox_2d", "label"} dicts."""
    rows = [f'\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "{label}"}}' for x1, y1, x2, y2 in boxes]
    return "```json\n[\n" + ",\n".join(rows) + "\n]\n```"


# --------------------------------------------------------------------------------------------- VQA


def _count_item(rng: random.Random) -> tuple[Scene, str, str, list[ShapeObj]]:
    # The answer is drawn first, uniformly over 1..4 with some 0s, so no count dominates and the
    # question cannot be answered without looking (the prototype collapsed onto a 55 % majority "0").
    k = rng.choices([0, 1, 2, 3, 4], weights=[1, 2, 2, 2, 2])[0]
    total = rng.randint(max(k, 1), 5)
    if rng.random() < 0.5:
        colour = rng.choice(COLOURS)
        specs = [(rng.choice(SHAPES), colour) for _ in range(k)]
        specs += _random_specs_excluding(rng, total - k, lambda s, c: c == colour)
        question = f"How many {colour} shapes are there?"
        match = lambda o: o.colour == colour
    else:
        kind = rng.choice(SHAPES)
        specs = [(kind, rng.choice(COLOURS)) for _ in range(k)]
        specs += _random_specs_excluding(rng, total - k, lambda s, c: s == kind)
        question = f"How many {SHAPE_PLURALS[kind]} are there?"
        match = lambda o: o.kind == kind
    rng.shuffle(specs)
    scene = make_scene(rng, specs)
    return scene, question, str(k), [o for o in scene.objects if match(o)]


def _colour_item(rng: random.Random) -> tuple[Scene, str, str, list[ShapeObj]]:
    kind, colour = rng.choice(SHAPES), rng.choice(COLOURS)
    # Exactly one object of the asked shape, so "the circle" is unambiguous.
    specs = [(kind, colour)] + _random_specs_excluding(rng, rng.randint(0, 3), lambda s, c: s == kind)
    rng.shuffle(specs)
    options = list(COLOURS)
    rng.shuffle(options)
    lines = "\n".join(f"{letter}. {name}" for letter, name in zip(OPTION_LETTERS, options))
    question = f"What colour is the {kind}?\n{lines}\nAnswer with the letter."
    scene = make_scene(rng, specs)
    return scene, question, OPTION_LETTERS[options.index(colour)], [o for o in scene.objects if o.kind == kind]


def _shape_item(rng: random.Random) -> tuple[Scene, str, str, list[ShapeObj]]:
    kind, colour = rng.choice(SHAPES), rng.choice(COLOURS)
    specs = [(kind, colour)] + _random_specs_excluding(rng, rng.randint(0, 3), lambda s, c: c == colour)
    rng.shuffle(specs)
    scene = make_scene(rng, specs)
    return scene, f"What shape is the {colour} object?", kind, [o for o in scene.objects if o.colour == colour]


def _position_item(rng: random.Random) -> tuple[Scene, str, str, list[ShapeObj]]:
    first = (rng.choice(SHAPES), rng.choice(COLOURS))
    second = first
    while second == first:
        second = (rng.choice(SHAPES), rng.choice(COLOURS))
    relation = rng.choice(("left", "right", "above", "below"))
    answer = rng.choice(("yes", "no"))
    horizontal = relation in ("left", "right")
    # Pick two cells that differ along the asked axis, then order them to make the answer true.
    while True:
        a, b = rng.sample(range(GRID * GRID), 2)
        ka = a % GRID if horizontal else a // GRID
        kb = b % GRID if horizontal else b // GRID
        if ka != kb:
            break
    first_smaller = relation in ("left", "above")  # "first is left of / above second"
    if (ka < kb) != (first_smaller == (answer == "yes")):
        a, b = b, a
    n_extra = rng.randint(0, 2)
    extra = _random_specs_excluding(rng, n_extra, lambda s, c: (s, c) in (first, second))
    others = [c for c in range(GRID * GRID) if c not in (a, b)]
    cells = [a, b] + rng.sample(others, n_extra)
    scene = make_scene(rng, [first, second] + extra, cells=cells)
    phrase = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[relation]
    question = f"Is the {first[1]} {first[0]} {phrase} the {second[1]} {second[0]}?"
    return scene, question, answer, scene.objects[:2]


_VQA_BUILDERS = {
    "count": _count_item,
    "colour": _colour_item,
    "shape": _shape_item,
    "position": _position_item,
}


def vqa_item(split: str, index: int) -> VQAItem:
    # Kinds cycle with the index, so any window of 4k consecutive items is exactly balanced.
    kind = VQA_KINDS[index % len(VQA_KINDS)]
    rng = _rng(split, "vqa", index)
    scene, question, answer, refs = _VQA_BUILDERS[kind](rng)
    return VQAItem(
        id=f"vqa-{split}-{index:06d}",
        image=scene.image,
        question=question,
        answer=answer,
        kind=kind,
        objects=scene.objects,
        refs=refs,
    )


def vqa_items(split: str, n: int, start: int = 0) -> list[VQAItem]:
    _check_split(split)
    _check_range(n, start)
    return [vqa_item(split, i) for i in range(start, start + n)]


# --------------------------------------------------------------------------------------------- grounding


def grounding_item(split: str, index: int) -> GroundingItem:
    rng = _rng(split, "grounding", index)
    kind, colour = rng.choice(SHAPES), rng.choice(COLOURS)
    k = rng.choices([1, 2, 3], weights=[3, 2, 1])[0]
    n_extra = rng.randint(0, 3)
    # Distractors are mostly near misses (same colour or same shape), so the label has to be read.
    extra: list[tuple[str, str]] = []
    for _ in range(n_extra):
        r = rng.random()
        if r < 0.35:
            extra.append((_other(rng, SHAPES, kind), colour))
        elif r < 0.7:
            extra.append((kind, _other(rng, COLOURS, colour)))
        else:
            extra += _random_specs_excluding(rng, 1, lambda s, c: (s, c) == (kind, colour))
    specs = [(kind, colour)] * k + extra
    rng.shuffle(specs)
    scene = make_scene(rng, specs)
    label = f"{colour} {kind}"
    targets = reading_order([o for o in scene.objects if o.kind == kind and o.colour == colour])
    boxes = [o.box for o in targets]
    return GroundingItem(
        id=f"grounding-{split}-{index:06d}",
        image=scene.image,
        prompt=GROUNDING_PROMPT.format(label=label),
        label=label,
        boxes=boxes,
        answer=format_grounding_answer(boxes, label),
        objects=scene.objects,
    )


def grounding_items(split: str, n: int, start: int = 0) -> list[GroundingItem]:
    _check_split(split)
    _check_range(n, start)
    return [grounding_item(split, i) for i in range(start, start + n)]


# --------------------------------------------------------------------------------------------- video
#
# Videos are smaller than images so that an 8-frame clip costs the model about what one image does:
# VIDEO_SIZE x VIDEO_SIZE frames (56 x 56) on a 4 x 4 grid of 14-pixel cells, each cell one merged visual
# token per temporal patch (with the tiny model's 7-pixel patches and 2 x 2 merge), so 8 frames give
# 4 temporal patches x 16 = 64 visual tokens. Objects are smaller (8-11 pixels) to fit a cell. A static
# object stays inside one cell (one token per temporal patch); a moving object keeps to one row (moving
# left/right) or one column (moving up/down) of cells and travels about 24 pixels over the clip, so it
# crosses two or three cells and moves 3-4 pixels between consecutive frames, which is visible inside
# one temporal patch of two frames. Cells crossed by a moving object's path never hold another object.

VIDEO_SIZE = 56
VIDEO_CELL = 14
VIDEO_GRID = VIDEO_SIZE // VIDEO_CELL  # 4 cells per side
VIDEO_FRAMES = 8
VIDEO_MIN_SIZE, VIDEO_MAX_SIZE = 8, 11
VIDEO_TRAVEL = 24  # pixels a moving object travels over the whole clip, whatever the frame count
VIDEO_QUESTIONS = {
    "mover": "Which shape moves?",
    "direction": "Which direction does the {label} move? Answer left, right, up or down.",
    "still": "How many shapes stay still?",
}

_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass
class Track:
    """One object of a video: its box in every frame, and where it moves (None: it stays still)."""

    kind: str
    colour: str
    boxes: list[tuple[int, int, int, int]]  # per frame, (x1, y1, x2, y2) exclusive, in VIDEO_SIZE pixels
    direction: str | None = None

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def moving(self) -> bool:
        return self.direction is not None

    def cells(self, frames=None) -> set[tuple[int, int]]:
        """(row, column) of every VIDEO_CELL cell the object covers in the given frames (default: all)."""
        frames = range(len(self.boxes)) if frames is None else frames
        out = set()
        for t in frames:
            x1, y1, x2, y2 = self.boxes[t]
            for r in range(y1 // VIDEO_CELL, (y2 - 1) // VIDEO_CELL + 1):
                for c in range(x1 // VIDEO_CELL, (x2 - 1) // VIDEO_CELL + 1):
                    out.add((r, c))
        return out


def _frame(bg: np.ndarray, objects: list[ShapeObj]) -> Image.Image:
    image = Image.fromarray(bg.copy())
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return image


def _moving_track(rng: random.Random, spec: tuple[str, str], num_frames: int) -> Track:
    kind, colour = spec
    direction = rng.choice(DIRECTIONS)
    size = rng.randint(VIDEO_MIN_SIZE, VIDEO_MAX_SIZE)
    dx, dy = _STEP[direction]
    # Along the motion: anywhere the whole path fits, 1 pixel from the border.
    lo, hi = 1, VIDEO_SIZE - 1 - size - VIDEO_TRAVEL
    start = rng.randint(lo, hi)
    if dx < 0 or dy < 0:
        start += VIDEO_TRAVEL
    # Across the motion: inside one row/column of cells, 1 pixel from its borders.
    lane = rng.randrange(VIDEO_GRID)
    across = lane * VIDEO_CELL + rng.randint(1, VIDEO_CELL - 1 - size)
    boxes = []
    for t in range(num_frames):
        along = round(start + (dx + dy) * VIDEO_TRAVEL * t / max(num_frames - 1, 1))
        x1, y1 = (along, across) if dx else (across, along)
        boxes.append((x1, y1, x1 + size, y1 + size))
    return Track(kind, colour, boxes, direction)


def _static_track(rng: random.Random, spec: tuple[str, str], cell: tuple[int, int], num_frames: int) -> Track:
    size = rng.randint(VIDEO_MIN_SIZE, VIDEO_MAX_SIZE)
    x1 = cell[1] * VIDEO_CELL + rng.randint(1, VIDEO_CELL - 1 - size)
    y1 = cell[0] * VIDEO_CELL + rng.randint(1, VIDEO_CELL - 1 - size)
    return Track(spec[0], spec[1], [(x1, y1, x1 + size, y1 + size)] * num_frames)


def _video_layout(rng: random.Random, n_moving: int, n_static: int, num_frames: int) -> list[Track]:
    """``n_moving`` moving and ``n_static`` static objects, all of distinct (shape, colour), moving paths
    disjoint from each other and from the static objects' cells (cell by cell)."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    while True:  # rejection-sample the moving paths; a few tries at most (they rarely collide)
        specs = rng.sample(pairs, n_moving + n_static)
        movers = [_moving_track(rng, spec, num_frames) for spec in specs[:n_moving]]
        used = [tr.cells() for tr in movers]
        if all(not (a & b) for i, a in enumerate(used) for b in used[i + 1 :]):
            break
    taken = set().union(*used) if used else set()
    free = [(r, c) for r in range(VIDEO_GRID) for c in range(VIDEO_GRID) if (r, c) not in taken]
    cells = rng.sample(free, n_static)
    statics = [_static_track(rng, spec, cell, num_frames) for spec, cell in zip(specs[n_moving:], cells)]
    tracks = movers + statics
    rng.shuffle(tracks)
    return tracks


def render_video(tracks: list[Track], rng: random.Random) -> list[Image.Image]:
    bg = _background(rng, VIDEO_SIZE)
    n = len(tracks[0].boxes)
    return [_frame(bg, [ShapeObj(tr.kind, tr.colour, tr.boxes[t]) for tr in tracks]) for t in range(n)]


def video_item(split: str, index: int, num_frames: int = VIDEO_FRAMES) -> VideoItem:
    """Kinds cycle with the index (mover, direction, still). Each question needs more than one frame:
    "Which shape moves?" (one moving object among 1-2 static ones), "Which direction does the <label> move?"
    (one moving object among 0-2 static ones), "How many shapes stay still?" (1-2 moving and 0-3 static objects, so the number of objects in
    one frame does not give the answer)."""
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    kind = VIDEO_KINDS[index % len(VIDEO_KINDS)]
    rng = _rng(split, f"video{num_frames}", index)
    if kind == "still":
        n_static = rng.randint(0, 3)  # the answer is drawn first, uniformly
        n_moving = rng.randint(1, 2)
    elif kind == "mover":
        # At least one still object: with the mover alone, any single frame names it.
        n_static, n_moving = rng.randint(1, 2), 1
    else:
        n_static, n_moving = rng.randint(0, 2), 1
    tracks = _video_layout(rng, n_moving, n_static, num_frames)
    mover = next(tr for tr in tracks if tr.moving)
    if kind == "mover":
        question, answer, refs = VIDEO_QUESTIONS["mover"], mover.label, [mover]
    elif kind == "direction":
        question, answer, refs = VIDEO_QUESTIONS["direction"].format(label=mover.label), mover.direction, [mover]
    else:
        refs = [tr for tr in tracks if not tr.moving]
        question, answer = VIDEO_QUESTIONS["still"], str(len(refs))
    return VideoItem(id=f"video-{split}-{index:06d}", frames=render_video(tracks, rng), question=question,
                     answer=answer, kind=kind, tracks=tracks, refs=refs)


def video_items(split: str, n: int, start: int = 0, num_frames: int = VIDEO_FRAMES) -> list[VideoItem]:
    _check_split(split)
    _check_range(n, start)
    return [video_item(split, i, num_frames=num_frames) for i in range(start, start + n)]
