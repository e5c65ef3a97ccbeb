"""Dataset: discovery, captions, repeats, buckets, placements, latent cache, sampler, pairs."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.world import toy
from trainer.data import (BucketBatchSampler, DatasetOptions, collate, cover_crop, discover_pairs,
                          encode_dataset, join_caption, load_dataset, load_pixels, make_buckets)
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(image_size=(64, 64), image_buckets_step=32, image_min_length=32)


def _img(path: Path, h: int, w: int, color=(200, 30, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color if mode == "RGB" else (*color, 255)
    Image.new(mode, (w, h), fill).save(path)
    return path


def _opts(**kw) -> DatasetOptions:
    return DatasetOptions(**{**SMALL, **kw})


# ---------------------------------------------------------------------- buckets
def test_spec_bucket_example_7_plus_10():
    b = make_buckets((768, 512), 128, 256, 2.0)
    assert b.main == [(768, 384), (768, 512), (640, 512), (512, 512), (512, 640), (512, 768), (384, 768)]
    assert b.sub == [(512, 256), (640, 384), (384, 256), (512, 384), (256, 256), (384, 384),
                     (384, 512), (256, 384), (384, 640), (256, 512)]
    # TrainTrain's README lists the same sets as (width, height); both are transpose-closed.
    readme_main = {(384, 768), (512, 768), (512, 640), (512, 512), (640, 512), (768, 512), (768, 384)}
    assert {(w, h) for h, w in b.main} == readme_main


def test_bucket_rules_and_validation():
    assert make_buckets(512, 256, 512, 2.0).main == [(512, 512)]
    b = make_buckets((1024, 1024), 64, 512, 2.0)
    for h, w in b.main + b.sub:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 and min(h, w) >= 512
        assert 0.5 <= w / h <= 2.0
    assert set(b.main) == {(w, h) for h, w in b.main} and not set(b.main) & set(b.sub)
    with pytest.raises(UserError, match="image_buckets_step"):
        make_buckets(512, 0, 256, 2.0)
    with pytest.raises(UserError, match="image_size"):
        make_buckets((500, 512), 64, 256, 2.0)


def test_assignment_closest_ratio_and_centre_crop(tmp_path):
    b = make_buckets((768, 512), 128, 256, 2.0)
    assert b.closest(1000, 1000) == (512, 512)
    assert b.closest(300, 600) == (384, 768) and b.closest(600, 300) == (768, 384)
    assert b.closest(600, 480) == (640, 512)
    for h, w in [(999, 1001), (37, 301), (640, 512), (123, 77)]:
        bucket = b.closest(h, w)
        (rh, rw), (l, t, r, bt), _ = cover_crop(h, w, bucket)
        assert (bt - t, r - l) == bucket and rh >= bucket[0] and rw >= bucket[1]
    # a wide image whose centre is red and edges blue lands in the square bucket, edges cut off
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:] = (0, 0, 255)
    arr[:, 32:96] = (255, 0, 0)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    ds = load_dataset(tmp_path, _opts(image_buckets_step=64))
    (p,) = ds.placements
    assert p.bucket == (64, 64)
    px, mask = load_pixels(p)
    assert px.shape == (3, 64, 64) and mask is None
    assert px[0].min() > 0.9 and px[2].max() < -0.9      # all red: the blue edges were cropped


# ---------------------------------------------------------------------- discovery and captions
def test_discovery_hidden_case_recursion_order(tmp_path):
    _img(tmp_path / "b.PNG", 64, 64)
    _img(tmp_path / "a.JpG", 64, 64)
    _img(tmp_path / "sub" / "deeper" / "c.webp", 64, 64)
    _img(tmp_path / ".hidden.png", 64, 64)
    _img(tmp_path / ".cache" / "d.png", 64, 64)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path, _opts())
    assert [r.rel for r in ds.records] == ["a.JpG", "b.PNG", "sub/deeper/c.webp"]
    assert ds.report.images == 3 and ds.report.bucket_counts == {(64, 64): 3}


def test_captions_txt_wins_trigger_and_filename(tmp_path):
    _img(tmp_path / "both.png", 64, 64)
    (tmp_path / "both.txt").write_text("  from txt\nsecond line \n")
    (tmp_path / "both.caption").write_text("from caption")
    _img(tmp_path / "cap.png", 64, 64)
    (tmp_path / "cap.caption").write_text("from caption")
    _img(tmp_path / "red_circle_id_7.png", 64, 64)
    _img(tmp_path / "tagged_file.png", 64, 64)
    (tmp_path / "tagged_file.txt").write_text("file caption")
    caps = {r.rel: r.caption for r in load_dataset(tmp_path, _opts()).records}
    assert caps == {"both.png": "from txt second line", "cap.png": "from caption",
                    "red_circle_id_7.png": "", "tagged_file.png": "file caption"}
    caps = {r.rel: r.caption for r in load_dataset(
        tmp_path, _opts(lora_trigger_word=" zq ", image_use_filename_as_tag=True)).records}
    assert caps == {"both.png": "zq, from txt second line", "cap.png": "zq, from caption",
                    "red_circle_id_7.png": "zq, red, circle", "tagged_file.png": "zq, file caption"}
    assert join_caption("", "a cat") == "a cat" and join_caption("zq", "") == "zq"
    assert join_caption("", "") == "" and join_caption("zq", "a\ncat") == "zq, a cat"


def test_folder_repeats_and_num_multiply_override(tmp_path):
    toy.make_dataset(tmp_path / "3_dog", 2, seed=0)
    toy.make_dataset(tmp_path / "plain", 1, seed=1)
    ds = load_dataset(tmp_path, _opts())
    assert {r.rel: r.repeats for r in ds.records} == {
        "3_dog/0000.png": 3, "3_dog/0001.png": 3, "plain/0000.png": 1}
    assert ds.report.samples_per_epoch == 7
    assert ds.records[0].caption.startswith("a ")          # toy captions read from .txt
    ds = load_dataset(tmp_path, _opts(image_num_multiply=2))  # > 1: the user's value wins
    assert [r.repeats for r in ds.records] == [2, 2, 2] and ds.report.samples_per_epoch == 6
    freq = ds.tag_frequency()
    assert set(freq) == {"3_dog", "plain"} and sum(freq["3_dog"].values()) == 2


def test_corrupt_files_one_warning_and_errors(tmp_path, caplog):
    toy.make_dataset(tmp_path, 2, seed=0)
    (tmp_path / "x.png").write_bytes(b"this is not a png at all")
    good = (tmp_path / "0000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        ds = load_dataset(tmp_path, _opts())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "x.png" in warnings[0].getMessage() and "truncated.png" in warnings[0].getMessage()
    assert [u for u, _ in ds.report.unreadable] == ["truncated.png", "x.png"]
    assert ds.report.images == 2 and any("unreadable" in line for line in ds.report.lines())

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "y.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(UserError, match="bad"):
        load_dataset(bad, _opts())
    with pytest.raises(UserError, match="nowhere"):
        load_dataset(tmp_path / "nowhere", _opts())


def test_corrupt_image_messages_name_the_file_not_a_buffer(tmp_path, caplog):
    """A corrupt .png: the warning, the "nothing usable" error and a file spoilt after planning each say
    which file, in one line, and never PIL's ``<_io.BytesIO object at 0x…>``."""
    toy.make_dataset(tmp_path, 1, seed=0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        ds = load_dataset(tmp_path, _opts())
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "broken.png (unknown format or corrupt file)" in warning and "BytesIO" not in warning
    assert ds.report.unreadable == [("broken.png", "unknown format or corrupt file")]

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "broken.png").write_bytes(b"garbage")
    with pytest.raises(UserError) as e:
        load_dataset(only_bad, _opts())
    assert "broken.png (unknown format or corrupt file)" in str(e.value)
    assert "\n" not in str(e.value) and "BytesIO" not in str(e.value) and "0x" not in str(e.value)

    spoilt = ds.placements[0].record.path     # replaced between planning and encoding
    spoilt.write_bytes(b"garbage")
    with pytest.raises(UserError) as e:
        load_pixels(ds.placements[0])
    assert str(e.value) == f"{spoilt}: not a readable image (unknown format or corrupt file)"


def test_no_usable_images_fails_before_any_model_or_torch(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    code = ("import sys; from trainer.data import load_dataset; from trainer.errors import UserError\n"
            f"try:\n    load_dataset({str(tmp_path)!r})\nexcept UserError as e:\n    print('ERR', e)\n"
            "print('torch' in sys.modules, any(m.startswith('trainer.models') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ERR no usable training images" in out.stdout and str(tmp_path) in out.stdout
    assert out.stdout.strip().endswith("False False")


# ---------------------------------------------------------------------- placements
def test_mirroring_upscale_and_sub_images(tmp_path):
    _img(tmp_path / "big.png", 80, 80)
    _img(tmp_path / "small.png", 40, 40)
    base = load_dataset(tmp_path, _opts())
    assert len(base.placements) == 2
    mirrored = load_dataset(tmp_path, _opts(image_mirroring=True))
    assert len(mirrored.placements) == 4 and sorted(p.flip for p in mirrored.placements) == [False, False, True, True]

    no_up = load_dataset(tmp_path, _opts(image_disable_upscale=True))
    assert [p.record.rel for p in no_up.placements] == ["big.png"]
    assert no_up.report.too_small == [("small.png", (64, 64))]

    opts = _opts(image_size=(128, 128), image_min_length=32, sub_image_num=3, image_mirroring=True)
    ds = load_dataset(tmp_path, opts)
    big = [p for p in ds.placements if p.record.rel == "big.png"]
    assert len(big) == 8                                   # (1 main + 3 sub) x mirror: SPEC's "up to 8"
    main = [p.bucket for p in big if not p.sub][0]
    assert main == (128, 128)
    subs = {p.bucket for p in big if p.sub}
    assert len(subs) == 3 and subs <= set(ds.buckets.sub)
    assert all(h * w < 128 * 128 for h, w in subs)
    assert subs == {(96, 96), (64, 64), (32, 32)}          # square image: the square sub buckets first
    px, _ = load_pixels([p for p in big if p.bucket == (32, 32)][0])
    assert px.shape == (3, 32, 32)
    none = load_dataset(tmp_path, _opts(image_min_length=64, image_buckets_step=64, sub_image_num=2))
    assert not none.buckets.sub and any("sub_image_num" in n for n in none.report.notes)


def test_options_from_traintrain_settings():
    o = DatasetOptions.from_mapping({"image_size(height, width)": "768,512", "image_buckets_step": 128,
                                     "image_min_length": 256, "network_rank": 16})
    assert o.image_size == (768, 512) and len(o.buckets().main) == 7
    assert DatasetOptions(image_size=512).image_size == (512, 512)


def test_alpha_composited_and_masked(tmp_path):
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[..., :3] = (255, 0, 0)
    arr[:, :32, 3] = 255                                   # left half opaque red, right half transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    ds = load_dataset(tmp_path, _opts(background=(0, 0, 255), image_mirroring=True))
    assert ds.records[0].has_alpha
    (px, mask), (pxf, maskf) = (load_pixels(p) for p in ds.placements)
    assert px[:, :, :30].mean(axis=(1, 2)).round(2).tolist() == [1.0, -1.0, -1.0]     # red
    assert px[:, :, 34:].mean(axis=(1, 2)).round(2).tolist() == [-1.0, -1.0, 1.0]     # blue background
    assert mask.shape == (1, 8, 8) and mask[0, :, :4].min() == 1 and mask[0, :, 4:].max() == 0
    assert np.array_equal(maskf, mask[:, :, ::-1]) and np.allclose(pxf, px[:, :, ::-1])
    assert load_pixels(load_dataset(tmp_path, _opts(alpha_mask=False)).placements[0])[1] is None


# ---------------------------------------------------------------------- latent cache
class StubBundle:
    """encode_images returns a deterministic function of the pixels and records each batch."""

    def __init__(self):
        self.calls: list[tuple] = []

    def encode_images(self, images, generator=None, sample=True):
        self.calls.append(tuple(images.shape))
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1) * 0.5


def test_encode_once_grouped_by_bucket_and_disk_cache(tmp_path):
    data = tmp_path / "data"
    toy.make_dataset(data, 3, seed=0)
    _img(data / "tall.png", 96, 48)
    opts = _opts(image_size=(64, 64), image_min_length=32, image_mirroring=True)
    ds = load_dataset(data, opts)
    assert {p.bucket for p in ds.placements} == {(64, 64), (64, 32)}
    samples = ds.placements + ds.placements[:2]            # duplicates are encoded once
    stub, cache, seen = StubBundle(), tmp_path / "cache", []
    out = encode_dataset(samples, stub, batch_size=4, cache_dir=cache, vae_id="stub",
                         progress=lambda d, t: seen.append((d, t)))
    assert len(out) == len(samples) and sum(s[0] for s in stub.calls) == len(ds.placements) == 8
    assert sorted(stub.calls) == [(2, 3, 64, 32), (2, 3, 64, 64), (4, 3, 64, 64)]   # same size per batch
    assert seen[-1] == (8, 8)
    assert out[0].mean.shape == (4, 8, 8) and out[0].std is None and out[-1].mean is not None
    assert torch.equal(out[0].mean, out[-2].mean)
    assert out[0].caption == ds.records[0].caption and out[0].path == ds.records[0].path
    flipped = [s for s in out[:len(ds.placements)] if s.flip]
    plain = [s for s in out[:len(ds.placements)] if not s.flip]
    assert torch.allclose(flipped[0].mean, plain[0].mean.flip(-1), atol=1e-5)
    assert len(list(cache.glob("*.safetensors"))) == 8 and not list(cache.glob("*.tmp"))

    stub2 = StubBundle()
    again = encode_dataset(ds.placements, stub2, batch_size=4, cache_dir=cache, vae_id="stub")
    assert stub2.calls == []
    assert all(torch.equal(a.mean, b.mean) for a, b in zip(again, out))

    stub3 = StubBundle()                                    # another VAE: nothing reused
    encode_dataset(ds.placements, stub3, batch_size=8, cache_dir=cache, vae_id="other")
    assert sum(s[0] for s in stub3.calls) == 8

    _img(data / "tall.png", 96, 48, color=(10, 200, 10))    # new bytes: only its 2 placements
    stub4 = StubBundle()
    encode_dataset(load_dataset(data, opts).placements, stub4, batch_size=4, cache_dir=cache, vae_id="stub")
    assert stub4.calls == [(2, 3, 64, 32)]


def test_encode_with_tiny_vae_keeps_mean_and_std(tmp_path):
    from trainer.models.loader import random_tiny_bundle
    bundle = random_tiny_bundle(device="cpu")
    toy.make_dataset(tmp_path / "d", 2, seed=3)
    ds = load_dataset(tmp_path / "d", _opts())
    out = encode_dataset(ds.placements, bundle, batch_size=2, cache_dir=tmp_path / "c")
    x = torch.from_numpy(load_pixels(ds.placements[1])[0])[None]
    with torch.no_grad():
        ref = bundle.encode_images(x, sample=False)[0]
    assert torch.allclose(out[1].mean, ref, atol=1e-5)
    assert out[1].std is not None and out[1].std.shape == out[1].mean.shape and (out[1].std > 0).all()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(out[1].latent(g1), out[1].latent(g2)) and not torch.equal(out[1].latent(g1), out[1].mean)
    cached = encode_dataset(ds.placements, bundle, batch_size=2, cache_dir=tmp_path / "c")
    assert torch.equal(cached[1].std, out[1].std)


# ---------------------------------------------------------------------- sampler
def _fake_samples():
    buckets = [(64, 64)] * 5 + [(64, 32)] * 3 + [(32, 64)] * 2
    repeats = [1, 1, 2, 1, 1, 1, 3, 1, 1, 1]
    return buckets, repeats


def test_sampler_order_coverage_buckets_and_resume():
    buckets, repeats = _fake_samples()
    a = BucketBatchSampler(buckets, 2, seed=7, repeats=repeats)
    b = BucketBatchSampler(buckets, 2, seed=7, repeats=repeats)
    first = [next(a) for _ in range(3 * len(a))]
    assert first == [next(b) for _ in range(3 * len(b))]
    assert first != [next(BucketBatchSampler(buckets, 2, seed=8, repeats=repeats)) for _ in range(len(first))]
    n = len(a)
    for e in range(3):
        epoch = first[e * n:(e + 1) * n]
        flat = sorted(i for batch in epoch for i in batch)
        assert flat == sorted(i for i, r in enumerate(repeats) for _ in range(r))   # each sample x repeats
        assert all(len({buckets[i] for i in batch}) == 1 and 1 <= len(batch) <= 2 for batch in epoch)
    assert first[:n] != first[n:2 * n]                      # reshuffled each epoch

    c = BucketBatchSampler(buckets, 2, seed=7, repeats=repeats)
    for _ in range(n + 2):
        next(c)
    state = c.state_dict()
    d = BucketBatchSampler(buckets, 2, seed=7, repeats=repeats)
    d.load_state_dict(state)
    assert [next(d) for _ in range(n)] == first[n + 2:2 * n + 2]
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(buckets, 2, seed=9, repeats=repeats).load_state_dict(state)


def test_sampler_drop_last_and_ranks():
    buckets, repeats = _fake_samples()
    full = BucketBatchSampler(buckets, 2, seed=1, repeats=repeats, drop_last=True)
    assert all(len(b) == 2 for b in full.epoch_batches(0))
    # 2 ranks x batch 2: the global batches of batch 4, each rank its slice (trainer/dist.py); together
    # they are one process's batches of 4, every sample once per epoch; a bucket's short last batch is split
    # as evenly as it goes, the shares weighting each rank's loss so the average is the batch mean
    from trainer.dist import Dist
    whole = BucketBatchSampler(buckets, 4, seed=1, repeats=repeats).epoch_batches(0)
    ranks = [Dist(r, 2) for r in range(2)]
    for batch in whole:
        parts = [batch[d.shard(len(batch))] for d in ranks]
        weights = [d.take_weight() for d in ranks]
        if len(batch) > 1:
            assert parts[0] + parts[1] == batch and abs(len(parts[0]) - len(parts[1])) <= 1
            assert weights == [2 * len(p) / len(batch) for p in parts]
        else:   # one sample for two ranks: rank 1 joins the all-reduce at weight 0
            assert parts == [batch, batch] and weights == [2.0, 0.0]
    assert sorted(i for b in whole for i in b) == sorted(i for i, r in enumerate(repeats) for _ in range(r))


def test_collate_stacks_one_bucket(tmp_path):
    from trainer.data import LatentSample
    m = torch.ones(1, 2, 2)
    s = [LatentSample(torch.zeros(4, 2, 2), torch.ones(4, 2, 2), "a", m * 0.5, (16, 16), Path("a.png")),
         LatentSample(torch.zeros(4, 2, 2), None, "b", None, (16, 16), Path("b.png")),
         LatentSample(torch.zeros(4, 2, 4), None, "c", None, (16, 32), Path("c.png"))]
    batch = collate(s, [0, 1], torch.Generator().manual_seed(0))
    assert batch["latents"].shape == (2, 4, 2, 2) and batch["captions"] == ["a", "b"]
    assert batch["latents"][0].abs().sum() > 0 and batch["latents"][1].abs().sum() == 0
    assert batch["mask"].tolist() == [(m * 0.5).tolist(), m.tolist()] and batch["bucket"] == (16, 16)
    assert collate(s, [0], sample=False)["latents"].abs().sum() == 0
    with pytest.raises(ValueError, match="bucket"):
        collate(s, [0, 2])


# ---------------------------------------------------------------------- Multi-ADDifT pairs
def test_pairs_matching_reporting_and_captions(tmp_path, caplog):
    _img(tmp_path / "eyes.png", 64, 64)
    _img(tmp_path / "eyes_closed.png", 64, 64, color=(0, 0, 0))
    (tmp_path / "eyes.txt").write_text("a face")
    _img(tmp_path / "2_x" / "smile.jpg", 96, 64)
    _img(tmp_path / "2_x" / "smile_closed.png", 48, 32)           # other extension, half size: fine
    (tmp_path / "2_x" / "smile_closed.txt").write_text("smiling\n")
    _img(tmp_path / "lonely.png", 64, 64)
    _img(tmp_path / "orphan_closed.png", 64, 64)
    _img(tmp_path / "wide.png", 64, 64)
    _img(tmp_path / "wide_closed.png", 32, 64)                     # different aspect ratio
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        pd = discover_pairs(tmp_path, "_closed", _opts(lora_trigger_word="zq", image_mirroring=True))
    assert [(p.original.rel, p.target.rel, p.caption, p.repeats) for p in pd.pairs] == [
        ("2_x/smile.jpg", "2_x/smile_closed.png", "zq, smiling", 2), ("eyes.png", "eyes_closed.png", "zq, a face", 1)]
    unmatched = dict(pd.report.unmatched)
    assert set(unmatched) == {"lonely.png", "orphan_closed.png", "wide.png"}
    assert "target" in unmatched["lonely.png"] and "without an original" in unmatched["orphan_closed.png"]
    assert "aspect" in unmatched["wide.png"]
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    assert len(pd.placements) == 4
    for o, t in pd.placements:
        assert o.bucket == t.bucket and o.flip == t.flip and o.record is not t.record
        assert load_pixels(o)[0].shape == load_pixels(t)[0].shape
    assert pd.placements[0][0].bucket == (64, 32)
    with pytest.raises(UserError, match="diff_target_name"):
        discover_pairs(tmp_path, "", _opts())
    with pytest.raises(UserError, match="image pairs"):
        discover_pairs(tmp_path, "_nothing", _opts())
