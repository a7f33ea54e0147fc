"""A seeded synthetic scene world with checkable prompts.

A scene is a 3x3 grid holding 1-4 coloured shapes (at most one per cell) on a
gray background (flat, gradient or noisy).  Every prompt has a ground-truth
answer string computed from the scene, so a model's answer can be scored.

Seeds: held-out scenes use seeds ``HELDOUT_SEEDS`` (0..999); training scenes use
seeds ``>= TRAIN_SEED_START`` (1000).  ``make_examples(seed, n)`` draws the
scenes with seeds ``seed .. seed+n-1``.

This module also knows where the bundled models live: :func:`bundled_paths`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- world

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (225, 25, 25),
    "green": (20, 170, 40),
    "blue": (30, 70, 235),
    "yellow": (245, 225, 10),
    "orange": (255, 130, 0),
    "purple": (135, 30, 200),
    "cyan": (0, 215, 225),
    "pink": (255, 95, 200),
}
SIZES = {"small": 0.52, "large": 0.88}  # fraction of the cell side
POSITIONS = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4
BACKGROUNDS = ("flat", "gradient", "noise")
KINDS = ("caption", "color", "count", "position", "yesno")

HELDOUT_SEEDS = range(0, 1000)
TRAIN_SEED_START = 1000
DEFAULT_RENDER_SIZE = 144  # size used by make_examples; the processor resizes

ROOT = Path(__file__).resolve().parent.parent


def bundled_paths() -> tuple[Path, Path]:
    """(target folder, text-drafter folder) of the bundled default models."""
    base = ROOT / "assets" / "models"
    return base / "target", base / "text-drafter"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major in the 3x3 grid
    dx: float = 0.0  # jitter of the centre, fraction of the cell side
    dy: float = 0.0
    angle: float = 0.0  # small rotation in degrees (not part of the truth)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "flat"  # flat | gradient | noise
    bg_levels: tuple[int, int] = (128, 128)  # gray levels (start, end)
    bg_vertical: bool = True
    noise_seed: int = 0

    def caption(self) -> str:
        objs = sorted(self.objects, key=lambda o: o.cell)
        parts = [o.phrase() for o in objs]
        if len(parts) == 1:
            text = parts[0]
        else:
            text = ", ".join(parts[:-1]) + " and " + parts[-1]
        return text + "."

    def to_dict(self) -> dict:
        d = asdict(self)
        d["caption"] = self.caption()
        return d


def sample_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(9), n)
    objs = []
    for c in cells:
        objs.append(SceneObject(
            shape=rng.choice(SHAPES),
            color=rng.choice(list(COLORS)),
            size=rng.choice(list(SIZES)),
            cell=c,
            dx=rng.uniform(-0.05, 0.05),
            dy=rng.uniform(-0.05, 0.05),
            angle=rng.uniform(-12, 12),
        ))
    bg = rng.choice(BACKGROUNDS)
    lo = rng.randint(35, 205)
    hi = lo if bg != "gradient" else min(215, max(30, lo + rng.choice([-1, 1]) * rng.randint(30, 90)))
    return Scene(
        objects=tuple(objs), background=bg, bg_levels=(lo, hi),
        bg_vertical=rng.random() < 0.5, noise_seed=rng.getrandbits(31),
    )


def scene_for_seed(seed: int) -> Scene:
    return sample_scene(random.Random(seed * 7919 + 17))


# --------------------------------------------------------------------------- rendering

def _background(scene: Scene, size: int) -> np.ndarray:
    lo, hi = scene.bg_levels
    if scene.background == "gradient":
        ramp = np.linspace(lo, hi, size, dtype=np.float32)
        g = np.repeat(ramp[:, None], size, 1) if scene.bg_vertical else np.repeat(ramp[None, :], size, 0)
        arr = np.stack([g] * 3, -1)
    else:
        arr = np.full((size, size, 3), lo, np.float32)
    if scene.background == "noise":
        nrng = np.random.default_rng(scene.noise_seed)
        # coarse noise (fixed 24x24 grid, upscaled) so it looks the same at any size
        coarse = nrng.normal(0, 14, (24, 24)).astype(np.float32)
        up = np.array(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
        fine = nrng.normal(0, 6, (size, size)).astype(np.float32)
        arr = arr + (up + fine)[..., None]
    return np.clip(arr, 0, 255).astype(np.uint8)


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float):
    import math

    def rot(pts):
        a = math.radians(angle)
        ca, sa = math.cos(a), math.sin(a)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]

    if shape == "square":
        s = r * 0.82
        return rot([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return rot([(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)])
    if shape == "diamond":
        return rot([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            t = math.pi * k / 5 - math.pi / 2
            pts.append((rad * math.cos(t), rad * math.sin(t)))
        return rot(pts)
    raise ValueError(shape)


def render(scene: Scene, size: int = 288) -> Image.Image:
    """Render a scene as an RGB image of ``size`` x ``size`` pixels."""
    ss = 2  # supersampling for smooth edges
    big = size * ss
    img = Image.fromarray(_background(scene, big), "RGB")
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for o in scene.objects:
        row, col = divmod(o.cell, 3)
        cx = (col + 0.5 + o.dx) * cell
        cy = (row + 0.5 + o.dy) * cell
        r = SIZES[o.size] * cell / 2
        color = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon(_shape_points(o.shape, cx, cy, r, o.angle), fill=color)
    return img.resize((size, size), Image.LANCZOS)


# --------------------------------------------------------------------------- prompts

@dataclass
class Example:
    image: Image.Image
    prompt: str
    answer: str
    kind: str
    seed: int = -1
    scene: Scene | None = field(default=None, repr=False)


def prompt_for(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, true answer) of one prompt kind about ``scene``."""
    objs = list(scene.objects)
    if kind == "caption":
        return "Describe the image.", scene.caption()
    if kind == "count":
        return "How many objects are there?", COUNT_WORDS[len(objs)]
    if kind == "color":
        shapes = [o.shape for o in objs]
        uniq = [o for o in objs if shapes.count(o.shape) == 1]
        if not uniq:  # every shape repeated: fall back to a count question
            return prompt_for(scene, "count", rng)
        o = rng.choice(uniq)
        return f"What color is the {o.shape}?", o.color
    if kind == "position":
        keys = [(o.color, o.shape) for o in objs]
        uniq = [o for o in objs if keys.count((o.color, o.shape)) == 1]
        if not uniq:
            return prompt_for(scene, "count", rng)
        o = rng.choice(uniq)
        return f"Where is the {o.color} {o.shape}?", o.position
    if kind == "yesno":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return f"Is there a {color} {shape}?", "yes"
        # hard negatives: reuse a present colour or a present shape
        for _ in range(100):
            o = rng.choice(objs)
            if rng.random() < 0.5:
                color, shape = o.color, rng.choice(SHAPES)
            else:
                color, shape = rng.choice(list(COLORS)), o.shape
            if (color, shape) not in present:
                break
        return f"Is there a {color} {shape}?", "no"
    raise ValueError(kind)


def examples_for_scene(seed: int, kinds=KINDS, size: int = DEFAULT_RENDER_SIZE) -> list[Example]:
    """One example of each kind about the scene with this seed (one image shared)."""
    scene = scene_for_seed(seed)
    img = render(scene, size)
    out = []
    for kind in kinds:
        rng = random.Random(f"{seed}:{kind}")
        p, a = prompt_for(scene, kind, rng)
        out.append(Example(img, p, a, kind, seed, scene))
    return out


def make_examples(seed: int, n: int, size: int = DEFAULT_RENDER_SIZE) -> list[Example]:
    """``n`` examples about the scenes with seeds ``seed .. seed+n-1``; kinds cycle.

    Deterministic for a seed.  Use seeds in ``HELDOUT_SEEDS`` for evaluation and
    seeds ``>= TRAIN_SEED_START`` for training.
    """
    out = []
    for i in range(n):
        s = seed + i
        kind = KINDS[s % len(KINDS)]
        out.extend(examples_for_scene(s, kinds=(kind,), size=size))
    return out


# --------------------------------------------------------------------------- scoring

def normalize(text: str) -> str:
    text = " ".join(text.split())
    text = re.sub(r"\s+([.,?!])", r"\1", text)
    return text.strip()


def is_correct(answer_text: str, example: Example) -> bool:
    """Exact match after normalising whitespace (and spaces before punctuation)."""
    return normalize(answer_text) == normalize(example.answer)


# --------------------------------------------------------------------------- vocabulary

PROMPT_TEMPLATE_WORDS = (
    "USER : ASSISTANT Describe the image . What color is How many objects are there ? "
    "Where Is a , and at yes no"
)


def vocabulary() -> list[str]:
    """Every word/punctuation token that prompts and answers of this world use."""
    words = PROMPT_TEMPLATE_WORDS.split()
    words += list(SHAPES) + list(COLORS) + list(SIZES) + list(COUNT_WORDS)
    for p in POSITIONS:
        words += p.split()
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
