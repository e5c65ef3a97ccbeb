"""Aspect-ratio buckets: which training sizes exist and where each image goes.

Sizes are ``(height, width)`` in pixels everywhere in this package (TrainTrain writes
``(width, height)``; the bucket *sets* are the same because both families are closed under
transposition).

The rule (TrainTrain's ``make_buckets``, with the grid made explicit). Let ``a <= b`` be the
sides of ``image_size``, ``P = a*b`` the pixel budget, ``s`` the step, ``m`` the minimum
length and ``r`` the maximum ratio:

* **main buckets** -- the largest size for each side length on the step grid:
  the square ``(a, a)``, the base ``image_size`` and its transpose, and for every
  ``w`` in ``m, m+s, ... <= b`` (``m`` rounded up to the step) the pair
  ``(w, h)``/``(h, w)`` with ``h = min(b, floor_s(P // w))``, kept when
  ``1/r <= w/h <= r`` and ``h >= m``.
* **sub buckets** -- every other grid size ``(h, w)`` with both sides in ``[m, b]``,
  ``h*w <= P`` and the ratio within ``r``. They only receive downscaled copies
  (``sub_image_num``), never an image's own placement.

For ``image_size=(768, 512)``, step 128, min length 256 (max ratio 2) this gives the
7 main buckets ``(768,384) (768,512) (640,512) (512,512) (512,640) (512,768) (384,768)``
and the 10 sub buckets of TrainTrain's README. Assignment uses the distance between
*log* aspect ratios, which (unlike TrainTrain's ``w/h`` difference) treats portrait and
landscape alike, so a transposed image lands in the transposed bucket. (So for a 640x512
image and ``sub_image_num=3`` we pick sub buckets 512x384, 384x256, 384x384, where the
README's linear rule gives 640x384 third: 0.6 vs 1.0 against 0.8 is a tie in ``w/h`` but
not in log ratio.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import UserError

Size = tuple[int, int]   # (height, width)

LATENT_FACTOR = 8        # the VAE works on 8x8 pixel blocks


def _ratio_ok(h: int, w: int, max_ratio: float) -> bool:
    return 1.0 / max_ratio <= w / h <= max_ratio


def _sort(sizes: set[Size]) -> list[Size]:
    """Portrait (tall) to landscape (wide), then by area: a stable, readable order."""
    return sorted(sizes, key=lambda s: (s[1] / s[0], s[0] * s[1], s))


@dataclass(frozen=True)
class Buckets:
    """The main and sub bucket lists (``(height, width)``), sorted by aspect ratio."""
    main: list[Size]
    sub: list[Size] = field(default_factory=list)

    def closest(self, height: int, width: int) -> Size:
        """The main bucket whose aspect ratio is closest to the image's (ties: larger area)."""
        return _closest(self.main, height, width)[0]

    def sub_for(self, height: int, width: int, main: Size, count: int) -> list[Size]:
        """Up to ``count`` sub buckets smaller than ``main`` with the closest aspect ratios.

        This is TrainTrain's ``sub_image_num``: extra, downscaled copies of the image at
        similar shapes (a cheap scale augmentation). Each bucket is used at most once.
        """
        if count <= 0:
            return []
        smaller = [b for b in self.sub if b[0] * b[1] < main[0] * main[1]]
        return _closest(smaller, height, width)[:count]


def _closest(candidates: Sequence[Size], height: int, width: int) -> list[Size]:
    target = math.log(width / height)
    return sorted(candidates, key=lambda b: (round(abs(math.log(b[1] / b[0]) - target), 12),
                                             -b[0] * b[1], b))


def make_buckets(image_size: Sequence[int] | int, step: int, min_length: int, max_ratio: float) -> Buckets:
    """Main and sub buckets for ``image_size`` (H, W) -- see the module docstring for the rule."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    H, W = (int(v) for v in image_size)
    if H <= 0 or W <= 0 or H % LATENT_FACTOR or W % LATENT_FACTOR:
        raise UserError(f"image_size {H},{W}: both sides must be positive multiples of {LATENT_FACTOR}")
    if step <= 0 or step % LATENT_FACTOR:
        raise UserError(f"image_buckets_step {step}: must be a positive multiple of {LATENT_FACTOR} (e.g. 64)")
    if max_ratio < 1:
        raise UserError(f"image_max_ratio {max_ratio}: must be at least 1")
    a, b = sorted((H, W))
    pixels = a * b
    main: set[Size] = {(a, a), (H, W), (W, H)}
    start = max(step, -(-int(min_length) // step) * step)
    for w in range(start, b + 1, step):
        h = min(b, (pixels // w) // step * step)
        if h >= min_length and _ratio_ok(h, w, max_ratio):
            main.update({(h, w), (w, h)})
    sub: set[Size] = set()
    for w in range(start, b + 1, step):
        for h in range(start, b + 1, step):
            if h * w <= pixels and _ratio_ok(h, w, max_ratio) and (h, w) not in main:
                sub.add((h, w))
    return Buckets(_sort(main), _sort(sub))


def cover_crop(height: int, width: int, bucket: Size) -> tuple[Size, tuple[int, int, int, int], float]:
    """Resize-to-cover then centre-crop geometry for an image of ``height x width``.

    Returns ``((resized_h, resized_w), crop_box (left, top, right, bottom), scale)``; the
    crop box always has exactly the bucket's size (rounding can never leave a gap, which
    TrainTrain's truncating ``int()`` could). ``scale > 1`` means the image is upscaled.
    """
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    top, left = (rh - bh) // 2, (rw - bw) // 2
    return (rh, rw), (left, top, left + bw, top + bh), scale
