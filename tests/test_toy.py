"""The procedural world: determinism, captions, sizes, speed, dataset files."""
import math
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from trainer.world import toy


def _draws(seed, n, **kw):
    rng = np.random.default_rng(seed)
    return [toy.sample_world(rng, **kw) for _ in range(n)]


@pytest.fixture(scope="module")
def world():
    return _draws(0, 2000)


def test_same_seed_same_images_and_captions():
    a, b = _draws(3, 60), _draws(3, 60)
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert (x.caption, x.shape, x.color, x.size, x.background, x.cx, x.cy, x.radius) == \
               (y.caption, y.shape, y.color, y.size, y.background, y.cx, y.cy, y.radius)
    assert any(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, _draws(4, 60)))


def test_render_is_deterministic_and_rgb():
    a = toy.render("triangle", "orange", "large", "gray", 30.3, 33.7, scale=0.4)
    b = toy.render("triangle", "orange", "large", "gray", 30.3, 33.7, scale=0.4)
    assert a.mode == "RGB" and a.size == (64, 64) and a.tobytes() == b.tobytes()
    c = toy.render("circle", "red", "small", "white", rng=np.random.default_rng(1))
    d = toy.render("circle", "red", "small", "white", rng=np.random.default_rng(1))
    assert c.tobytes() == d.tobytes()
    with pytest.raises(ValueError):
        toy.render("hexagon", "red", "small", "white")


def test_attributes_uniform_and_objects_inside_frame(world):
    for attr, values in toy.ATTRIBUTES.items():
        counts = Counter(getattr(s, attr) for s in world)
        assert set(counts) == set(values)
        assert min(counts.values()) > 0.6 * len(world) / len(values)
    for s in world[:300]:
        a = np.asarray(s.image)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert (border == toy.BACKGROUNDS[s.background]).all()
        lo, hi = toy.RADIUS_RANGE[s.size]
        assert lo <= s.radius <= hi and abs(s.cx - 32) <= 8 and abs(s.cy - 32) <= 8


def test_caption_dropping_statistics(world):
    captions = [s.caption for s in world]
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.07 < empty < 0.13                      # empty_p = 0.1, sd ≈ 0.007
    counts = Counter(captions)
    for group in (toy.COLORS, toy.SHAPES, toy.SIZES):
        assert sum(counts[w] for w in group) >= 5, group   # single-word captions occur
    full = sum(s.caption == toy.full_caption(s.shape, s.color, s.size, s.background) for s in world)
    assert 0.15 < full / len(world) < 0.29          # 0.9 × 0.7⁴ ≈ 0.216
    vocab = set(toy.VOCABULARY)
    for s in world:
        assert set(s.caption.split()) <= vocab
        for word in s.caption.split():             # a caption only names what is drawn
            if word in toy.ATTRIBUTES["color"]:
                assert word == s.color
            if word in toy.SHAPES:
                assert word == s.shape


def test_caption_grammar():
    c = toy.compose_caption
    assert c("circle", "red", "large", "white") == "a large red circle on a white background"
    assert c("circle", None, None, None) == "circle"
    assert c(None, "red", None, None) == "red"
    assert c("circle", "orange", None, None) == "an orange circle"
    assert c("square", None, None, "black") == "a square on a black background"
    assert c(None, "red", "large", None) == "large red"
    assert c(None, "red", None, "black") == "red on a black background"
    assert c(None, None, None, "gray") == "a gray background"
    assert c(None, None, None, None) == ""
    s = _draws(0, 5, drop_p=0.0, empty_p=0.0)
    assert all(x.caption == toy.full_caption(x.shape, x.color, x.size, x.background) for x in s)


def test_rare_tokens_never_in_captions():
    words = set()
    for s in _draws(7, 5000, drop_p=0.5):
        words.update(s.caption.split())
    assert not words & set(toy.RARE_TOKENS)
    tw = toy.tokenizer_words()
    assert len(tw) == len(set(tw))
    assert set(toy.RARE_TOKENS) <= set(tw) and set(toy.VOCABULARY) <= set(tw)
    assert words <= set(tw)


def test_size_classes_do_not_overlap(world):
    small = [s.area_fraction for s in world if s.size == "small"]
    large = [s.area_fraction for s in world if s.size == "large"]
    assert max(small) < 0.0980 < 0.1222 < min(large)
    # analytic extremes: square r=10 covers 400 px, triangle r=17 covers √3·17² ≈ 500.6 px
    sq = toy.coverage("square", 32.0, 32.0, 10.0).sum()
    tri = toy.coverage("triangle", 31.3, 32.6, 17.0).sum()
    circ = toy.coverage("circle", 32.2, 31.9, 20.0).sum()
    assert abs(sq - 400) < 1 and abs(tri - math.sqrt(3) * 289) < 3 and abs(circ - math.pi * 400) < 4


def test_fixing_attributes_keeps_other_draws_and_exclusion():
    free, fixed = _draws(11, 50), _draws(11, 50, shape="square")
    assert all(f.shape == "square" for f in fixed)
    assert [(a.color, a.background, a.cx, a.cy) for a in free] == \
           [(b.color, b.background, b.cx, b.cy) for b in fixed]
    assert "red" not in {s.color for s in _draws(2, 300, exclude_colors=("red",))}


def test_render_speed():
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(200):
        toy.sample_world(rng)
    assert time.perf_counter() - t < 2.0


def test_make_dataset(tmp_path):
    samples = toy.make_dataset(tmp_path / "ds", 6, seed=5, shape="square", color="purple")
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert names == [f"{i:04d}.{ext}" for i in range(6) for ext in ("png", "txt")]
    for i, s in enumerate(samples):
        assert (s.shape, s.color) == ("square", "purple")
        img = Image.open(tmp_path / "ds" / f"{i:04d}.png")
        assert img.tobytes() == s.image.tobytes()
        assert (tmp_path / "ds" / f"{i:04d}.txt").read_text() == s.caption == \
            toy.full_caption("square", "purple", s.size, s.background)
    toy.make_dataset(tmp_path / "trig", 3, seed=5, caption="zq")
    assert {p.read_text() for p in (tmp_path / "trig").glob("*.txt")} == {"zq"}
    with pytest.raises(ValueError):
        toy.make_dataset(tmp_path / "bad", 1, seed=0, hue="red")


def test_cli_writes_dataset(tmp_path):
    assert toy.main(["--out", str(tmp_path), "--n", "3", "--seed", "1", "--size", "large",
                     "--caption", "sks"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 3
    assert {p.read_text() for p in tmp_path.glob("*.txt")} == {"sks"}


def test_make_pair_differs_only_in_size():
    a, b = toy.make_pair("circle", "blue", "white", 31.2, 33.4, 12.0, 18.0)
    bg = np.asarray(toy.BACKGROUNDS["white"], np.float32)
    fg = np.asarray(toy.COLORS["blue"], np.float32)
    covs = []
    for img in (a, b):
        x = np.asarray(img, np.float32)
        cov = ((x - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        covs.append(cov)
        assert (np.abs(x[cov > 0.99] - fg) <= 1).all()          # same colour
    ys, xs = np.mgrid[:64, :64] + 0.5
    for cov in covs:                                            # same centre
        assert abs((cov * xs).sum() / cov.sum() - 31.2) < 0.05
        assert abs((cov * ys).sum() / cov.sum() - 33.4) < 0.05
    assert covs[1].sum() / covs[0].sum() == pytest.approx((18 / 12) ** 2, rel=0.02)
