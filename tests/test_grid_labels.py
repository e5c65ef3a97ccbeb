"""Sample grids carry their own row (prompt/LoRA) and column (seed) labels."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from trainer.generate import grid


def _ink(text):
    """The default font's rendering of ``text`` alone, cropped to its ink (greyscale array)."""
    im = Image.new("L", (400, 40), 255)
    ImageDraw.Draw(im).text((5, 5), text, fill=0, font=ImageFont.load_default())
    a = np.asarray(im)
    ys, xs = np.nonzero(a < 255)
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _contains(region, template):
    H, W = template.shape
    return any(np.array_equal(region[y:y + H, x:x + W], template)
               for y in range(region.shape[0] - H + 1) for x in range(region.shape[1] - W + 1))


def test_grid_has_label_strips_showing_each_rows_and_columns_text():
    tiles = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green", "purple")]
    labels = ["zq: without", "zq: with LoRA"]
    out = grid(tiles, cols=2, row_labels=labels, col_labels=["seed 0", "seed 1"])
    left, top = out.width - 128, out.height - 128
    assert left > 0 and top > 0                                   # larger by the label strips
    a = np.asarray(out.convert("L"))
    assert (a[:, :left] < 128).any() and (a[:top, :] < 128).any()  # the strips hold text, not blank
    assert np.array_equal(np.asarray(out)[top + 10, left + 10], (255, 0, 0))   # images intact below/right
    for r, text in enumerate(labels):
        row_strip = a[top + r * 64: top + (r + 1) * 64, :left]
        assert _contains(row_strip, _ink(text)) and not _contains(row_strip, _ink(labels[1 - r]))
    assert _contains(a[:top, left + 64:], _ink("seed 1"))
