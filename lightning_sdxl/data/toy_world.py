"""A procedural toy world: captioned scenes of one or two coloured shapes, generated on demand.

Item i is a pure function of (seed, i), so the world is unbounded (any index works; `size` is only
the epoch length) and identical in every process and worker. In the "rich" and "simple" worlds
captions fully name each shape's kind, colour, size and position and the background; a small
jitter of position and size leaves the model a distribution of images per caption rather than one
image. In the "open" world captions name only the colour and the background texture: the shape's
kind and quadrant and the texture's phase are free, so one caption has many sharp outcomes and a
one-step regression onto them averages them into a blur (docs/METHOD.md, "Project choices").
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# Vocabulary: every word a caption can use.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "centre")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "grey", "striped", "gradient")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
# Plain backgrounds; "striped" alternates STRIPE_RGB rows, "gradient" runs GRADIENT_RGB top to bottom.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
STRIPE_RGB: tuple[tuple[int, int, int], tuple[int, int, int]] = ((255, 255, 255), (190, 190, 190))
NUM_STRIPES = 8
GRADIENT_RGB: tuple[tuple[int, int, int], tuple[int, int, int]] = ((150, 190, 240), (255, 255, 255))

# Textured backgrounds of the "open" world: a pattern of TEXTURE_PERIOD pixels (at the output
# resolution of 32 px: 4 periods across) whose phase each scene draws uniformly, so the caption
# never fixes it. Light and dark tones far apart, so averaging phases visibly flattens them.
TEXTURES: tuple[str, ...] = ("stripes", "checks", "dots")
TEXTURE_RGB: tuple[tuple[int, int, int], tuple[int, int, int]] = ((235, 235, 235), (70, 70, 70))
TEXTURE_PERIOD = 0.25  # fraction of the image side

# Shape centres (x, y) as fractions of the image side.
POSITION_XY: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "centre": (0.5, 0.5),
}
# Half the side of a shape's bounding square, as a fraction of the image side.
SIZE_HALF: dict[str, float] = {"small": 0.075, "large": 0.15}
# Jitter: centre offset up to +-JITTER_XY, half-size scaled by 1 +- JITTER_SIZE. At the extremes a
# large quadrant shape spans [0.065, 0.445] of its axis: it never leaves its quadrant.
JITTER_XY = 0.03
JITTER_SIZE = 0.1
SUPERSAMPLE = 4


@dataclass(frozen=True)
class WorldVocabulary:
    """What a toy world's scenes can contain (each a subset of the module-level vocabulary).

    Attributes:
        shapes, colours, sizes, positions, backgrounds: the words a caption can use (backgrounds
            may also be TEXTURES, drawn at a random phase).
        max_shapes: 1, or 2 (two shapes in distinct quadrants with distinct colours).
        named: the shape attributes a caption names; the others are free (drawn, not said).
    """

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    sizes: tuple[str, ...] = SIZES
    positions: tuple[str, ...] = POSITIONS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    max_shapes: int = 2
    named: tuple[str, ...] = ("kind", "colour", "size", "position")


# "rich": 1-2 shapes, the whole vocabulary (plumbing tests, real-looking captions).
# "simple": the world of the committed toy teacher (lightning_sdxl/assets), small enough for a
# 2-core CPU to learn in under an hour: one large shape, 3 kinds x 4 colours x 4 quadrants x 3
# backgrounds = 144 captions (docs/MEASUREMENTS.md: a bigger world was not learned in 18 minutes).
WORLDS: dict[str, WorldVocabulary] = {
    "rich": WorldVocabulary(),
    "simple": WorldVocabulary(
        shapes=("circle", "square", "triangle"),
        colours=("red", "green", "blue", "yellow"),
        sizes=("large",),
        positions=("top left", "top right", "bottom left", "bottom right"),
        backgrounds=("white", "black", "grey"),
        max_shapes=1,
    ),
    # "open": where blur can happen. Captions name colour and texture only ("a red shape on a
    # striped background"); kind, quadrant and texture phase are free: 4 x 3 = 12 captions, each
    # with 3 kinds x 4 quadrants x a continuum of phases of sharp images.
    "open": WorldVocabulary(
        shapes=("circle", "square", "triangle"),
        colours=("red", "green", "blue", "yellow"),
        sizes=("large",),
        positions=("top left", "top right", "bottom left", "bottom right"),
        backgrounds=TEXTURES,
        max_shapes=1,
        named=("colour",),
    ),
}
# How a caption says a texture.
TEXTURE_WORDS: dict[str, str] = {"stripes": "striped", "checks": "checked", "dots": "dotted"}


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene.

    Attributes:
        kind: one of SHAPES.
        colour: one of COLOURS.
        size: one of SIZES.
        position: one of POSITIONS.
        centre: (x, y) of the bounding square's centre, fractions of the image side (jittered).
        half_size: half the bounding square's side, fraction of the image side (jittered).
    """

    kind: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]
    half_size: float
    named: tuple[str, ...] = ("kind", "colour", "size", "position")

    @property
    def phrase(self) -> str:
        """E.g. "a large red circle at the top left", "a small blue cross in the centre", or with
        only the colour named, "a red shape"."""
        words = [getattr(self, a) for a in ("size", "colour") if a in self.named]
        words.append(self.kind if "kind" in self.named else "shape")
        if "position" in self.named:
            words.append("in the centre" if self.position == "centre" else f"at the {self.position}")
        return " ".join(["a", *words])


@dataclass(frozen=True)
class Scene:
    """A toy world scene: shapes in reading order (top left first) on a background.

    Attributes:
        shapes: one or two shapes; two shapes sit in distinct quadrants and have distinct colours.
        background: one of BACKGROUNDS or TEXTURES.
        phase: (x, y) offset of a textured background, fractions of its period in [0, 1).
    """

    shapes: tuple[ShapeSpec, ...]
    background: str
    phase: tuple[float, float] = (0.0, 0.0)

    @property
    def caption(self) -> str:
        """Plain English, e.g. "a large red circle at the top left and a small blue square at the
        bottom right on a white background", or "a red shape on a striped background"."""
        background = TEXTURE_WORDS.get(self.background, self.background)
        return f"{' and '.join(s.phrase for s in self.shapes)} on a {background} background"


def sample_scene(rng: np.random.Generator, vocabulary: WorldVocabulary = WORLDS["rich"]) -> Scene:
    """Draw a scene: one shape anywhere, or two shapes in two distinct quadrants."""
    v = vocabulary
    num_shapes = int(rng.integers(1, v.max_shapes + 1))
    if num_shapes == 1:
        positions = [v.positions[rng.integers(len(v.positions))]]
    else:
        quadrants = [p for p in v.positions if p != "centre"]
        positions = [quadrants[k] for k in sorted(rng.choice(len(quadrants), size=2, replace=False))]
    colours = rng.choice(len(v.colours), size=num_shapes, replace=False)
    shapes = []
    for position, colour in zip(positions, colours):
        kind = v.shapes[rng.integers(len(v.shapes))]
        size = v.sizes[rng.integers(len(v.sizes))]
        dx, dy = rng.uniform(-JITTER_XY, JITTER_XY, size=2)
        half = SIZE_HALF[size] * (1.0 + rng.uniform(-JITTER_SIZE, JITTER_SIZE))
        x, y = POSITION_XY[position]
        shapes.append(
            ShapeSpec(
                kind, v.colours[colour], size, position, (float(x + dx), float(y + dy)), float(half),
                v.named,
            )
        )
    background = v.backgrounds[rng.integers(len(v.backgrounds))]
    if background not in TEXTURES:  # the other worlds draw nothing more: their items are unchanged
        return Scene(tuple(shapes), background)
    phase = rng.uniform(0.0, 1.0, size=2)
    return Scene(tuple(shapes), background, (float(phase[0]), float(phase[1])))


def _texture(name: str, side: int, phase: tuple[float, float]) -> Image.Image:
    """A textured background at `side` x `side`, shifted by `phase` (fractions of the period)."""
    period = TEXTURE_PERIOD * side
    x = (np.arange(side) + 0.5) / period + phase[0]  # (side,) position in periods
    y = (np.arange(side) + 0.5) / period + phase[1]
    fx, fy = x % 1.0, y % 1.0
    if name == "stripes":  # vertical bars, half a period wide
        dark = np.broadcast_to(fx[None, :] < 0.5, (side, side))
    elif name == "checks":  # squares of half a period
        dark = (fx[None, :] < 0.5) ^ (fy[:, None] < 0.5)
    elif name == "dots":  # a dot of radius 0.25 period per cell
        dark = (fx[None, :] - 0.5) ** 2 + (fy[:, None] - 0.5) ** 2 < 0.25**2
    else:
        raise ValueError(f"unknown texture {name!r}: expected one of {TEXTURES}")
    light, shade = (np.array(c, dtype=np.uint8) for c in TEXTURE_RGB)
    return Image.fromarray(np.where(dark[..., None], shade, light).astype(np.uint8))


@lru_cache(maxsize=32)
def _background(name: str, side: int) -> Image.Image:
    """The background canvas at `side` x `side` (cached; callers copy it before drawing)."""
    if name in BACKGROUND_RGB:
        return Image.new("RGB", (side, side), BACKGROUND_RGB[name])
    if name == "striped":
        rows = (np.arange(side) * NUM_STRIPES // side) % 2  # (side,) stripe index per row
        colours = np.array(STRIPE_RGB, dtype=np.uint8)[rows]  # (side, 3)
    elif name == "gradient":
        w = np.linspace(0.0, 1.0, side)[:, None]  # (side, 1)
        top, bottom = (np.array(c, dtype=np.float64) for c in GRADIENT_RGB)
        colours = np.round((1 - w) * top + w * bottom).astype(np.uint8)  # (side, 3)
    else:
        raise ValueError(f"unknown background {name!r}: expected one of {BACKGROUNDS}")
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(colours[:, None], (side, side, 3))))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: ShapeSpec, side: int) -> None:
    """Draw one filled shape on a `side` x `side` canvas."""
    cx, cy = shape.centre[0] * side, shape.centre[1] * side
    h = shape.half_size * side
    fill = COLOUR_RGB[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape.kind == "triangle":  # pointing up, filling its bounding square
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape.kind == "cross":  # a plus sign with arms a third of the side thick
        t = h / 3
        draw.rectangle((cx - h, cy - t, cx + h, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - h, cx + t, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}: expected one of {SHAPES}")


def render_scene(scene: Scene, resolution: int) -> Image.Image:
    """Render a scene as a `resolution` x `resolution` RGB image.

    Drawn at SUPERSAMPLE x the resolution and box-downsampled, so edges are anti-aliased.
    """
    side = resolution * SUPERSAMPLE
    if scene.background in TEXTURES:
        canvas = _texture(scene.background, side, scene.phase)
    else:
        canvas = _background(scene.background, side).copy()
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        _draw_shape(draw, shape, side)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


class ToyWorld(Dataset):
    """Captioned procedural scenes, item i generated from (seed, i) alone.

    Args:
        resolution: image side R in pixels.
        size: epoch length (`len`); any non-negative index works, also beyond it.
        seed: world seed; different seeds give different worlds.
        world: the vocabulary, a key of WORLDS ("rich", "simple": the toy teacher's, or "open":
            captions that leave shape, position and texture phase free).
    """

    def __init__(
        self, resolution: int = 128, size: int = 1_000_000, seed: int = 0, world: str = "rich"
    ) -> None:
        if resolution < 1 or size < 1:
            raise ValueError(
                f"ToyWorld needs resolution >= 1 and size >= 1, got {resolution}, {size}"
            )
        if world not in WORLDS:
            raise ValueError(f"unknown toy world {world!r}: choose one of {sorted(WORLDS)}")
        self.resolution = resolution
        self.size = size
        self.seed = seed
        self.world = world
        self.vocabulary = WORLDS[world]

    def __len__(self) -> int:
        return self.size

    def _index(self, i: int) -> int:
        i = operator.index(i)
        if i < 0:  # sequence semantics: -1 is the last item of the epoch
            i += self.size
        if i < 0:
            raise IndexError(f"ToyWorld index {i - self.size} out of range for size {self.size}")
        return i

    def scene(self, i: int) -> Scene:
        """The attributes of item i (no rendering)."""
        rng = np.random.default_rng([self.seed, self._index(i)])  # never the global RNG
        return sample_scene(rng, self.vocabulary)

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        image = np.asarray(render_scene(scene, self.resolution))  # (R, R, 3) uint8
        # Scaled in numpy: torch would spread this small op over threads, slower when busy.
        pixels = image.transpose(2, 0, 1).astype(np.float32, order="C") / np.float32(
            127.5
        ) - np.float32(1)
        r = self.resolution
        return {
            "pixel_values": torch.from_numpy(pixels),  # (3, R, R) float32 in [-1, 1]
            "prompt": scene.caption,
            "original_size": torch.tensor([r, r], dtype=torch.int64),  # (2,) (h, w)
            "crop_top_left": torch.zeros(2, dtype=torch.int64),  # (2,) (top, left)
        }
