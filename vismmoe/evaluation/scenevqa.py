"""scene-VQA: a seeded synthetic multi-object scene VQA, drawn with PIL (nothing to download).

Why it exists: in easy-VQA one large shape fills the image, so nearly any visual-token pruning keeps it.
Here a 224x224 scene holds 3-6 small shapes (22-42 px) and 1-2 digit tiles on a 3x3 grid of named cells
over a plain background; with 16 px per visual token an object covers about 2-12 of the 196 tokens, so every
question depends on a few small regions and dropping the wrong tokens loses the answer.

Question types (one answer vocabulary each; the target answer is drawn uniformly first, then a scene
and question that have it, so answers are balanced within every type):
  count      "how many red shapes are there?" / "how many circles are there?"      -> 0 1 2 3
  color_at   "what color is the shape in the top left?"                             -> 6 colours
  shape_at   "what shape is in the bottom right?"                                   -> 4 shapes
  exist      "is there a blue triangle?"                                            -> yes / no
  relpos     "is the red circle left of the blue square?" (or "above")              -> yes / no
  relsize    "is the red circle bigger than the blue square?"                       -> yes / no
  digit      "what digit is in the center?" (a 7-segment digit on a white tile)     -> 0 ... 9

Every image is a pure function of (split, index): `random.Random(f"scenevqa/{split}/{index}")` (string seeds
are hashed with SHA-512, stable across Python versions), so any subset or chunking of a split - one
process or sixteen - gives the same scenes, questions and pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SIDE = 224  # image side in pixels; with patch 8 and 2x2 merging: 14 x 14 = 196 visual tokens
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 235), "yellow": (240, 210, 40),
          "purple": (150, 60, 200), "cyan": (40, 210, 220)}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUND = (70, 70, 70)
TILE = (245, 245, 245)
ROWS, COLS = ("top", "middle", "bottom"), ("left", "middle", "right")
CELL_NAMES = tuple("center" if (r, c) == ("middle", "middle") else f"{r} {c}" for r in ROWS for c in COLS)
QUESTION_TYPES = ("count", "color_at", "shape_at", "exist", "relpos", "relsize", "digit")
ANSWERS = {"count": ("0", "1", "2", "3"), "color_at": tuple(COLORS), "shape_at": SHAPES, "exist": ("yes", "no"),
           "relpos": ("yes", "no"), "relsize": ("yes", "no"), "digit": tuple("0123456789")}
SMALL, LARGE = (22, 27), (34, 42)  # bounding-box side ranges of the two object sizes (a first model
# trained on 16-21 / 30-36 px shapes told shapes apart only 41% of the time: 2x2 patches hold no shape)
TILE_SIDE = (26, 30)
# Split -> (number of images, questions per image). Seeds are the split names themselves.
SPLITS = {"train": (40000, 7), "val": (1000, 1), "test": (1500, 1)}


@dataclass
class Obj:
    kind: str  # a shape name, or "digit"
    color: str | None  # None for digit tiles
    cell: int  # 0..8, row-major
    cx: int
    cy: int
    size: int  # bounding-box side, pixels
    large: bool = False
    digit: int | None = None


@dataclass
class Scene:
    objects: list[Obj]
    questions: list[tuple[str, str, str]] = field(default_factory=list)  # (type, question, answer)

    def shapes(self):
        return [o for o in self.objects if o.kind != "digit"]

    def at(self, cell):
        return next((o for o in self.objects if o.cell == cell), None)


def _name(o: Obj) -> str:
    return f"{o.color} {o.kind}"


def random_scene(rng: random.Random) -> Scene:
    n_shapes, n_digits = rng.randint(3, 6), rng.randint(1, 2)
    cells = rng.sample(range(9), n_shapes + n_digits)
    cell_w = SIDE / 3
    combos = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_shapes)  # (colour, shape) unique per scene
    objects = []
    for i, cell in enumerate(cells):
        if i < n_shapes:
            large = rng.random() < 0.5
            size = rng.randint(*(LARGE if large else SMALL))
            color, kind, digit = combos[i][0], combos[i][1], None
        else:
            large, size, color, kind, digit = False, rng.randint(*TILE_SIDE), None, "digit", rng.randrange(10)
        r, c = divmod(cell, 3)
        half = size / 2 + 2  # keep the object inside its cell with a 2 px margin
        cx = int(c * cell_w + rng.uniform(half, cell_w - half))
        cy = int(r * cell_w + rng.uniform(half, cell_w - half))
        objects.append(Obj(kind, color, cell, cx, cy, size, large, digit))
    return Scene(objects)


# ---- questions ---------------------------------------------------------------------------------------------

def _candidates(scene: Scene, qtype: str, answer: str) -> list[str]:
    """Every question of this type whose answer in this scene is `answer`."""
    shapes = scene.shapes()
    out = []
    if qtype == "count":
        for c in COLORS:
            if sum(o.color == c for o in shapes) == int(answer):
                out.append(f"how many {c} shapes are there?")
        for s in SHAPES:
            if sum(o.kind == s for o in shapes) == int(answer):
                out.append(f"how many {s}s are there?")
    elif qtype in ("color_at", "shape_at"):
        for o in shapes:
            if (o.color if qtype == "color_at" else o.kind) == answer:
                where = CELL_NAMES[o.cell]
                out.append(f"what color is the shape in the {where}?" if qtype == "color_at"
                           else f"what shape is in the {where}?")
    elif qtype == "digit":
        out = [f"what digit is in the {CELL_NAMES[o.cell]}?" for o in scene.objects if o.digit == int(answer)]
    elif qtype == "exist":
        present = {(o.color, o.kind) for o in shapes}
        pool = present if answer == "yes" else {(c, s) for c in COLORS for s in SHAPES} - present
        out = [f"is there a {c} {s}?" for c, s in sorted(pool)]
    elif qtype == "relpos":
        for a in shapes:
            for b in shapes:
                if a is b:
                    continue
                (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
                if ca != cb and (ca < cb) == (answer == "yes"):
                    out.append(f"is the {_name(a)} left of the {_name(b)}?")
                if ra != rb and (ra < rb) == (answer == "yes"):
                    out.append(f"is the {_name(a)} above the {_name(b)}?")
    elif qtype == "relsize":
        for a in shapes:
            for b in shapes:
                if a.large != b.large and a.large == (answer == "yes"):
                    out.append(f"is the {_name(a)} bigger than the {_name(b)}?")
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return out


def make_item(split: str, index: int, n_questions: int = 1) -> Scene:
    """Scene `index` of `split` with its questions; question k has type (index * n_questions + k) mod 7.

    The first question's answer cycles through its type's answers with the index (exact balance where it
    matters: the val/test splits hold one question per image) and scenes are redrawn until one has it; the
    other questions of a train image draw their target uniformly too and fall back to another answer of
    the same type when this scene has none.
    """
    rng = random.Random(f"scenevqa/{split}/{index}")
    types = [QUESTION_TYPES[(index * n_questions + k) % len(QUESTION_TYPES)] for k in range(n_questions)]
    answers0 = ANSWERS[types[0]]
    target = answers0[(index * n_questions // len(QUESTION_TYPES)) % len(answers0)]
    for _ in range(1000):
        scene = random_scene(rng)
        first = _candidates(scene, types[0], target)
        if first:
            break
    else:  # pragma: no cover - every answer is reachable within a few draws
        raise RuntimeError(f"no scene for {types[0]}={target}")
    scene.questions.append((types[0], rng.choice(first), target))
    for qtype in types[1:]:
        answers = list(ANSWERS[qtype])
        rng.shuffle(answers)
        for answer in answers:
            cands = _candidates(scene, qtype, answer)
            if cands:
                scene.questions.append((qtype, rng.choice(cands), answer))
                break
    return scene


# ---- rendering ---------------------------------------------------------------------------------------------

# 7-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle).
_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
             8: "abcdefg", 9: "abcdfg"}


def _draw_digit(draw, cx: int, cy: int, digit: int, h: int):
    w, t = h // 2 + 1, max(2, h // 7)
    x0, x1, y0, y1, ym = cx - w // 2, cx + w // 2, cy - h // 2, cy + h // 2, cy
    seg = {"a": (x0, y0, x1, y0 + t), "d": (x0, y1 - t, x1, y1), "g": (x0, ym - t // 2, x1, ym - t // 2 + t),
           "f": (x0, y0, x0 + t, ym), "e": (x0, ym, x0 + t, y1), "b": (x1 - t, y0, x1, ym), "c": (x1 - t, ym, x1, y1)}
    for s in _SEGMENTS[digit]:
        draw.rectangle(seg[s], fill=(0, 0, 0))


def _draw(draw, o: Obj, fill):
    h = o.size / 2
    box = (o.cx - h, o.cy - h, o.cx + h - 1, o.cy + h - 1)
    if o.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif o.kind in ("square", "digit"):
        draw.rectangle(box, fill=fill)
    elif o.kind == "triangle":
        draw.polygon([(o.cx, o.cy - h), (o.cx + h, o.cy + h - 1), (o.cx - h, o.cy + h - 1)], fill=fill)
    elif o.kind == "diamond":
        draw.polygon([(o.cx, o.cy - h), (o.cx + h, o.cy), (o.cx, o.cy + h), (o.cx - h, o.cy)], fill=fill)


def render(scene: Scene, mask: bool = False):
    """The scene as a PIL RGB image; with mask=True also an "L" image holding object index + 1 per pixel."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    labels = Image.new("L", (SIDE, SIDE), 0) if mask else None
    ldraw = ImageDraw.Draw(labels) if mask else None
    for i, o in enumerate(scene.objects):
        _draw(draw, o, TILE if o.kind == "digit" else COLORS[o.color])
        if o.kind == "digit":
            _draw_digit(draw, o.cx, o.cy, o.digit, int(o.size * 0.7))
        if mask:
            _draw(ldraw, o, i + 1)
    return (image, labels) if mask else image


def split_items(split: str, start: int = 0, stop: int | None = None, n_questions: int | None = None) -> list[Scene]:
    if split not in SPLITS:
        raise ValueError(f"scene-VQA has splits {', '.join(SPLITS)}, not {split!r}")
    n_images, per_image = SPLITS[split]
    return [make_item(split, i, n_questions or per_image) for i in range(start, n_images if stop is None else stop)]
