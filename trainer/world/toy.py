"""The procedural world the embedded tiny model is pretrained on: one coloured shape per image.

A world this small makes every generated image *measurable* (see ``trainer.world.judge``), so
training modes can be tested on CPU by asking "did the prompt give what it says?".

Attributes (all drawn uniformly):

* shapes ``circle, square, triangle`` -- squares axis-aligned, triangles equilateral and
  pointing up; no rotation (a fixed pose keeps the world easy enough for a tiny model).
* colours, as RGB prototypes picked to be far from each other and from every background
  (closest pairs: orange/yellow ≈ 97, red/orange ≈ 104, purple/gray ≈ 116 in RGB units)::

      red (220, 30, 30)    green (40, 170, 60)    blue (40, 80, 220)
      yellow (240, 225, 35) purple (150, 40, 200)  orange (245, 130, 15)

* sizes: the object's radius (half extent: circle radius, half the square's side, half the
  triangle's side) is uniform in 7-10 px for ``small`` and 17-22 px for ``large`` at 64 px
  (scaled with ``image_size``). The classes' area fractions never overlap: the largest
  small object (square, r=10) covers 0.098 of the image, the smallest large one (triangle,
  r=17) 0.122.
* backgrounds ``white (255,255,255), black (0,0,0), gray (128,128,128)``.
* position: the centre is jittered uniformly ±8 px (at 64 px) around the image centre, so
  the largest object still stays inside the frame.

Edges are anti-aliased by rendering the coverage on a 4× supersampled grid and box
filtering it down, so ``area_fraction`` (the summed coverage) is exact and continuous.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..atomic import atomic_path

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 225, 35),
    "purple": (150, 40, 200),
    "orange": (245, 130, 15),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "background": tuple(BACKGROUNDS),
}

REFERENCE_SIZE = 64            # the radii and jitter below are in pixels at this image size
RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (7.0, 10.0), "large": (17.0, 22.0)}
CENTER_JITTER = 8.0
SUPERSAMPLE = 4

GENERIC_WORDS: tuple[str, ...] = ("a", "an", "on", "background", "shape", "photo", "of", "the",
                                  "and", "with", "image", "picture", "object")
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    GENERIC_WORDS + SIZES + tuple(COLORS) + SHAPES + tuple(BACKGROUNDS)))
# In the tokenizer's vocabulary but never in a caption: trigger words for LoRA tests.
RARE_TOKENS: tuple[str, ...] = ("zq", "zkx", "sks", "ohwx")


def tokenizer_words() -> list[str]:
    """Every word the tiny tokenizer must hold as a single token (no duplicates)."""
    return list(dict.fromkeys(VOCABULARY + RARE_TOKENS))


def full_caption(shape: str, color: str, size: str, background: str) -> str:
    """The complete caption, e.g. "a large red circle on a white background"."""
    return f"a {size} {color} {shape} on a {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def compose_caption(shape: str | None, color: str | None, size: str | None,
                    background: str | None) -> str:
    """A grammatical caption from the attributes that are kept (None = dropped).

    Rules: one lone size/colour/shape word is given bare ("red", "large", "circle"); with the
    noun, an article leads ("an orange circle on a black background"); without the noun the
    adjectives stand alone ("large red", "red on a white background"); only a background
    gives "a white background"; nothing kept gives "".
    """
    words = [w for w in (size, color) if w]
    bg = f"on a {background} background" if background else ""
    if shape:
        if not words and not bg:
            return shape
        head = " ".join(words + [shape])
        return " ".join(p for p in (_article(head), head, bg) if p)
    if words:
        return " ".join(words + ([bg] if bg else []))
    return f"a {background} background" if background else ""


def object_radius(size: str, scale: float, image_size: int = REFERENCE_SIZE) -> float:
    """Radius in pixels for ``scale`` in [0, 1] across the size class's range."""
    lo, hi = RADIUS_RANGE[size]
    return (lo + float(scale) * (hi - lo)) * image_size / REFERENCE_SIZE


def coverage(shape: str, cx: float, cy: float, radius: float, image_size: int = REFERENCE_SIZE
             ) -> np.ndarray:
    """Per-pixel coverage in [0, 1] (float32, HxW) of the shape, by 4× supersampling.

    Only the shape's bounding box is supersampled, which keeps a render well under a
    millisecond. Pixel (i, j) spans [j, j+1) × [i, i+1), so the image centre is N/2.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    n, s = image_size, SUPERSAMPLE
    out = np.zeros((n, n), np.float32)
    x0, x1 = max(int(math.floor(cx - radius)) - 1, 0), min(int(math.ceil(cx + radius)) + 1, n)
    y0, y1 = max(int(math.floor(cy - radius)) - 1, 0), min(int(math.ceil(cy + radius)) + 1, n)
    if x1 <= x0 or y1 <= y0:
        return out
    xs = (np.arange(x0 * s, x1 * s, dtype=np.float32) + 0.5) / s - np.float32(cx)
    ys = (np.arange(y0 * s, y1 * s, dtype=np.float32) + 0.5) / s - np.float32(cy)
    x, y = xs[None, :], ys[:, None]
    r = np.float32(radius)
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    else:  # equilateral triangle with side 2r, pointing up, centred on its bounding box
        half_h = np.float32(math.sqrt(3.0) / 2.0) * r
        t = (y + half_h) / (2 * half_h)          # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(x) <= r * t)
    h, w = y1 - y0, x1 - x0
    out[y0:y1, x0:x1] = inside.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)
    return out


def _compose(cov: np.ndarray, color: str, background: str) -> np.ndarray:
    fg = np.asarray(COLORS[color], np.float32)
    bg = np.asarray(BACKGROUNDS[background], np.float32)
    rgb = bg + cov[..., None] * (fg - bg)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _check(name: str, value: str) -> None:
    if value not in ATTRIBUTES[name]:
        raise ValueError(f"unknown {name} {value!r}; expected one of {ATTRIBUTES[name]}")


def _draw_geometry(size: str, image_size: int, rng: np.random.Generator | None,
                   cx: float | None, cy: float | None, scale: float | None
                   ) -> tuple[float, float, float]:
    """Centre and radius; missing values come from ``rng`` (always drawn, in a fixed order)."""
    u = rng.random(3) if rng is not None else np.array([0.5, 0.5, 0.5])
    jitter = CENTER_JITTER * image_size / REFERENCE_SIZE
    if scale is None:
        scale = float(u[0])
    if cx is None:
        cx = image_size / 2 + (2 * float(u[1]) - 1) * jitter
    if cy is None:
        cy = image_size / 2 + (2 * float(u[2]) - 1) * jitter
    return float(cx), float(cy), object_radius(size, scale, image_size)


def render(shape: str, color: str, size: str, background: str, cx: float | None = None,
           cy: float | None = None, scale: float | None = None, image_size: int = REFERENCE_SIZE,
           rng: np.random.Generator | None = None, radius: float | None = None) -> Image.Image:
    """Render one object; deterministic given the arguments (and ``rng``'s state).

    ``cx, cy`` are the centre in pixels; ``scale`` in [0, 1] places the radius within the
    size class's range. Values left None are drawn from ``rng`` (or centred / mid-range
    without one). ``radius`` (pixels) overrides ``size``/``scale``.
    """
    for name, value in (("shape", shape), ("color", color), ("size", size), ("background", background)):
        _check(name, value)
    cx, cy, r = _draw_geometry(size, image_size, rng, cx, cy, scale)
    if radius is not None:
        r = float(radius)
    return Image.fromarray(_compose(coverage(shape, cx, cy, r, image_size), color, background), "RGB")


@dataclass
class Sample:
    """One draw from the world, with its ground truth."""
    image: Image.Image
    shape: str
    color: str
    size: str
    background: str
    cx: float
    cy: float
    radius: float
    area_fraction: float
    caption: str


def sample_world(rng: np.random.Generator, image_size: int = REFERENCE_SIZE, drop_p: float = 0.3,
                 empty_p: float = 0.1, exclude_colors: Sequence[str] = (), *, shape: str | None = None,
                 color: str | None = None, size: str | None = None, background: str | None = None
                 ) -> Sample:
    """Draw one sample; deterministic for a given ``rng`` state.

    Each of size, colour, shape and the background phrase is dropped from the caption
    independently with ``drop_p`` (if all four would go, the shape word stays, so an
    empty caption only comes from ``empty_p``, the classifier-free-guidance share). The
    keyword attributes fix values; the rng is consumed identically whatever is fixed, so
    fixing one attribute does not reshuffle the others.
    """
    colors = [c for c in COLORS if c not in set(exclude_colors)]
    if not colors:
        raise ValueError("exclude_colors removes every colour")
    picks = rng.integers(0, 1 << 30, size=4)
    attrs = {
        "shape": shape or SHAPES[picks[0] % len(SHAPES)],
        "color": color or colors[picks[1] % len(colors)],
        "size": size or SIZES[picks[2] % len(SIZES)],
        "background": background or tuple(BACKGROUNDS)[picks[3] % len(BACKGROUNDS)],
    }
    for name, value in attrs.items():
        _check(name, value)
    cx, cy, r = _draw_geometry(attrs["size"], image_size, rng, None, None, None)
    drops = rng.random(4) < drop_p
    empty = rng.random() < empty_p
    if drops.all():
        drops[2] = False
    if empty:
        caption = ""
    else:
        kept = [None if d else attrs[k] for d, k in zip(drops, ("size", "color", "shape", "background"))]
        caption = compose_caption(shape=kept[2], color=kept[1], size=kept[0], background=kept[3])
    cov = coverage(attrs["shape"], cx, cy, r, image_size)
    image = Image.fromarray(_compose(cov, attrs["color"], attrs["background"]), "RGB")
    area = float(cov.sum(dtype=np.float64)) / cov.size
    return Sample(image=image, cx=cx, cy=cy, radius=r, area_fraction=area, caption=caption, **attrs)


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def make_dataset(folder: os.PathLike | str, n: int, seed: int, *, caption: str | None = None,
                 drop_p: float = 0.0, empty_p: float = 0.0, image_size: int = REFERENCE_SIZE,
                 exclude_colors: Sequence[str] = (), **filters: str) -> list[Sample]:
    """Write ``NNNN.png`` + ``NNNN.txt`` pairs (a LoRA training folder) and return the samples.

    ``filters`` (shape/color/size/background) fix attributes; ``caption`` replaces every
    caption (e.g. a trigger word). Captions are full by default (``drop_p=0``), as a user's
    dataset would be.
    """
    unknown = set(filters) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown filter(s) {sorted(unknown)}; expected {sorted(ATTRIBUTES)}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        s = sample_world(rng, image_size, drop_p, empty_p, exclude_colors, **filters)
        if caption is not None:
            s.caption = caption
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        _write_atomic(out / f"{i:04d}.png", buf.getvalue())
        _write_atomic(out / f"{i:04d}.txt", s.caption.encode("utf-8"))
        samples.append(s)
    return samples


def make_pair(shape: str, color: str, background: str, cx: float, cy: float, radius_a: float,
              radius_b: float, image_size: int = REFERENCE_SIZE) -> tuple[Image.Image, Image.Image]:
    """Two renders identical except the object's radius (slider tests: "smaller" vs "larger")."""
    return tuple(render(shape, color, "small", background, cx, cy, image_size=image_size, radius=r)
                 for r in (radius_a, radius_b))  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.world.toy --out DIR --n 16 --seed 0 [--shape …]``: write a dataset."""
    p = argparse.ArgumentParser(prog="python -m trainer.world.toy", description="write a toy-world dataset")
    p.add_argument("--out", required=True, help="output folder (NNNN.png + NNNN.txt)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=REFERENCE_SIZE)
    for name, values in ATTRIBUTES.items():
        p.add_argument(f"--{name}", choices=values, help=f"fix the {name}")
    p.add_argument("--caption", help="use this caption for every image (e.g. a trigger word)")
    p.add_argument("--drop-p", type=float, default=0.0, help="caption word drop probability")
    p.add_argument("--empty-p", type=float, default=0.0, help="empty caption probability")
    a = p.parse_args(argv)
    if a.n < 0:
        p.error("--n must be >= 0")
    filters = {k: getattr(a, k) for k in ATTRIBUTES if getattr(a, k)}
    make_dataset(a.out, a.n, a.seed, caption=a.caption, drop_p=a.drop_p, empty_p=a.empty_p,
                 image_size=a.image_size, **filters)
    print(f"wrote {a.n} images to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
