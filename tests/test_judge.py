"""The judge: held-out accuracy, robustness to soft/noisy images, inputs, determinism."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from trainer.world import judge, toy

HELD_OUT_SEED = 20250101          # the classifier trains on seed judge.TRAIN_SEED
ATTRS = ("color", "shape", "size", "background")


def _world(seed, n):
    rng = np.random.default_rng(seed)
    return [toy.sample_world(rng) for _ in range(n)]


def _expected(samples):
    return {a: [getattr(s, a) for s in samples] for a in ATTRS}


def _soften(img, rng):
    """Blur radius 1 + uniform noise ±10: roughly how a small diffusion model's samples look."""
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1)), np.int16)
    return np.clip(a + rng.integers(-10, 11, size=a.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def held_out():
    return _world(HELD_OUT_SEED, 1200)


def test_shipped_weights_load_and_are_small():
    assert judge.WEIGHTS_PATH.exists() and judge.WEIGHTS_PATH.stat().st_size < 200_000
    from safetensors import safe_open
    with safe_open(str(judge.WEIGHTS_PATH), "pt") as f:
        meta = f.metadata()
    assert meta == {"seed": str(judge.TRAIN_SEED), "n_images": str(judge.TRAIN_IMAGES),
                    "steps": str(judge.TRAIN_STEPS)}
    assert judge.load_classifier() is judge.load_classifier()      # cached


def test_held_out_accuracy(held_out):
    js = judge.judge([s.image for s in held_out])
    acc = judge.accuracy(js, _expected(held_out))
    assert all(acc[a] >= 0.995 for a in ATTRS), acc
    assert all(j.fg_found for j in js)
    err = np.abs([j.area - s.area_fraction for j, s in zip(js, held_out)])
    assert err.max() < 0.003                                        # area is the exact coverage


def test_robust_to_blur_and_noise(held_out):
    rng = np.random.default_rng(1)
    sub = held_out[:600]
    js = judge.judge(np.stack([_soften(s.image, rng) for s in sub]))
    acc = judge.accuracy(js, _expected(sub))
    assert all(acc[a] >= 0.95 for a in ATTRS), acc
    err = np.abs([j.area - s.area_fraction for j, s in zip(js, sub)])
    assert np.median(err) < 0.003


def test_nothing_drawn():
    flat = np.full((64, 64, 3), 128, np.uint8)
    noisy = np.clip(flat + np.random.default_rng(0).integers(-10, 11, flat.shape), 0, 255).astype(np.uint8)
    for img in (flat, noisy, Image.new("RGB", (64, 64), (255, 255, 255))):
        j = judge.judge(img)[0]
        assert not j.fg_found and (j.color, j.shape, j.size) == (None, None, None) and j.area == 0.0
    assert judge.judge(flat)[0].background == "gray"


def test_input_formats_agree():
    img = toy.render("triangle", "yellow", "small", "black", 29.0, 35.0)
    a = np.array(img)
    forms = [img, a, a[None], [img, img], torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255]
    results = [judge.judge(f)[0] for f in forms]
    assert all((r.color, r.shape, r.size) == ("yellow", "triangle", "small") for r in results)
    assert max(r.area for r in results) - min(r.area for r in results) < 1e-3


def test_background_estimated_not_assumed():
    img = toy.render("square", "red", "large", "white", 32, 32)
    a = np.asarray(img).copy()
    a[np.all(a == 255, axis=-1)] = (200, 220, 240)        # an off-palette background
    j = judge.judge(a)[0]
    assert (j.color, j.shape, j.size) == ("red", "square", "large")


def test_area_is_monotone_in_radius():
    areas = [judge.judge(toy.make_pair("circle", "green", "black", 32, 32, r, r)[0])[0].area
             for r in (8, 10, 12, 14, 16, 18)]
    assert all(x < y for x, y in zip(areas, areas[1:]))


def test_labelling_fallback_matches(monkeypatch):
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = rng.random((64, 64)) < rng.uniform(0.3, 0.6)
        fallback = judge._largest_component_numpy(m)
        assert fallback.sum() > 0
        if judge._ndimage is not None:
            assert (fallback == judge._largest_component_scipy(m)).all()
    imgs = [s.image for s in _world(3, 20)]
    fast = judge.judge(imgs)
    monkeypatch.setattr(judge, "_ndimage", None)
    assert [j.as_dict() for j in judge.judge(imgs)] == [j.as_dict() for j in fast]


def test_accuracy_helper():
    js = judge.judge([toy.render("circle", "red", "large", "white", 32, 32),
                      toy.render("square", "blue", "small", "black", 32, 32)])
    assert judge.accuracy(js, {"color": "red", "shape": ["circle", "square"]}) == {"color": 0.5, "shape": 1.0}
    with pytest.raises(ValueError):
        judge.accuracy(js, {"shape": ["circle"]})


def test_retraining_is_deterministic():
    a = judge.train_classifier(seed=7, n_images=256, steps=25)
    b = judge.train_classifier(seed=7, n_images=256, steps=25)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = judge.train_classifier(seed=8, n_images=256, steps=25)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_cli(tmp_path, capsys):
    toy.render("circle", "purple", "large", "gray", 32, 32).save(tmp_path / "x.png")
    assert judge.main([str(tmp_path / "x.png")]) == 0
    assert "large purple circle on gray" in capsys.readouterr().out
    out = tmp_path / "w.safetensors"
    assert judge.main(["--train", "--out", str(out), "--steps", "3", "--n-images", "64"]) == 0
    net = judge.load_classifier(str(out))
    assert sum(p.numel() for p in net.parameters()) == 4339
