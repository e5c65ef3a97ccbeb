"""The Dataset panel's model-free side (trainer/data/overview.py, trainer/app/dataset_panel.py): a folder of
`N_concept` subfolders planned exactly as training plans it (repeats, each image's bucket, the histogram
a run logs), captions saved atomically where training reads them, corrupt files listed, large folders
paged. The browser side is tests/test_dataset_browser.py."""
import os
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from trainer.data import load_dataset
from trainer.data.overview import PER_PAGE, dataset_overview, save_caption
from trainer.errors import UserError
from trainer.settings import Settings, field
from trainer.world import toy

# 128 px with 64 px steps: buckets 128x64 (tall), 128x128, 64x128 (wide), so the folder below fills three
PANEL_SETTINGS = {"image_size": (128, 128), "image_buckets_step": 64, "image_min_length": 64}


def _reshape(path: Path, width: int, height: int) -> None:
    """Put a square toy image on a canvas of another aspect ratio (its background colour around it)."""
    im = Image.open(path).convert("RGB")
    canvas = Image.new("RGB", (width, height), im.getpixel((0, 0)))
    canvas.paste(im, ((width - im.width) // 2, (height - im.height) // 2))
    canvas.save(path)


def make_concept_folder(root: Path) -> Path:
    """kohya's layout: ``2_red`` (4 images, 2 repeats) and ``1_blue`` (3 images + a corrupt file, one image
    without a caption), in three aspect ratios."""
    toy.make_dataset(root / "2_red", 4, seed=1, color="red", image_size=64)
    toy.make_dataset(root / "1_blue", 3, seed=2, color="blue", image_size=64)
    _reshape(root / "2_red" / "0001.png", 128, 64)       # wide
    _reshape(root / "2_red" / "0002.png", 64, 128)       # tall
    _reshape(root / "1_blue" / "0000.png", 128, 64)      # wide
    (root / "1_blue" / "0002.txt").unlink()              # no caption yet
    (root / "1_blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def options(**kw):
    from trainer.modes.lora import dataset_options
    return dataset_options(Settings.from_dict({**PANEL_SETTINGS, **kw}))


@pytest.fixture
def folder(tmp_path):
    return make_concept_folder(tmp_path / "images")


def test_the_overview_is_trainings_plan(folder):
    o = options()
    ov = dataset_overview(folder, o)
    plan = load_dataset(folder, o)                                  # what modes/lora.py:prepare runs
    assert ov.histogram == list(plan.report.bucket_counts.items())
    assert ov.log_lines == plan.report.lines()
    assert ov.histogram_lines() == [ln for ln in plan.report.lines() if ln.startswith("  bucket ")]
    assert dict(ov.histogram) == {(128, 64): 1, (128, 128): 4, (64, 128): 2}
    rows = {r.rel: r for r in ov.page(0)}
    for p in plan.placements:                                       # each image's bucket = its placement's
        assert rows[p.record.rel].bucket == f"{p.bucket[0]}x{p.bucket[1]}"
        assert rows[p.record.rel].repeats == p.record.repeats
    assert rows["2_red/0001.png"].bucket == "64x128" and rows["2_red/0002.png"].bucket == "128x64"
    assert (rows["1_blue/broken.png"].status, rows["1_blue/broken.png"].bucket) == ("unreadable", None)
    assert "corrupt" in rows["1_blue/broken.png"].reason
    concepts = {c.folder: (c.repeats, c.images, c.samples_per_epoch) for c in ov.concepts}
    assert concepts == {"2_red": (2, 4, 8), "1_blue": (1, 3, 3)}
    assert ov.samples_per_epoch == plan.report.samples_per_epoch == 11
    assert rows["2_red/0000.png"].caption == (folder / "2_red" / "0000.txt").read_text().strip()
    assert (rows["1_blue/0002.png"].caption, rows["1_blue/0002.png"].caption_file) == ("", "")


def test_form_settings_change_the_histogram_as_they_change_training(folder):
    """The Train form's values reach the panel through the LoRA mode's own option mapping."""
    square = dataset_overview(folder, options(image_size=(64, 64)))
    assert dict(square.histogram) == {(64, 64): 7}                   # one bucket at 64 px
    mirrored = dataset_overview(folder, options(image_mirroring=True, image_num_multiply=3))
    assert dict(mirrored.histogram) == {(128, 64): 2, (128, 128): 8, (64, 128): 4}
    assert {c.folder: c.repeats for c in mirrored.concepts} == {"2_red": 3, "1_blue": 3}
    assert mirrored.log_lines == load_dataset(folder, options(image_mirroring=True, image_num_multiply=3)
                                              ).report.lines()
    triggered = dataset_overview(folder, options(lora_trigger_word="zq"))
    row = next(r for r in triggered.page(0, 48, "zq") if r.rel == "1_blue/0002.png")
    assert row.trained_caption == "zq"                               # no caption file: the trigger alone


def test_save_caption_writes_where_training_reads_atomically(folder):
    o = options()
    before = dataset_overview(folder, o)
    made = save_caption(folder, "1_blue/0002.png", "a blue circle, zq\n")
    assert made == (folder / "1_blue" / "0002.txt").resolve() and made.read_text() == "a blue circle, zq"
    (folder / "2_red" / "0003.txt").rename(folder / "2_red" / "0003.caption")
    kept = save_caption(folder, "2_red/0003.png", "red, edited")
    assert kept.name == "0003.caption" and not (folder / "2_red" / "0003.txt").exists()
    assert not [p for p in folder.rglob("*.tmp")]                    # no temporary file left behind
    after = dataset_overview(folder, o)
    assert after is before                                           # captions do not change the plan: cached
    rows = {r.rel: r for r in after.page(0)}
    assert (rows["1_blue/0002.png"].caption, rows["1_blue/0002.png"].caption_file) == ("a blue circle, zq",
                                                                                       "0002.txt")
    assert rows["2_red/0003.png"].trained_caption == "red, edited"
    assert {r.caption for r in load_dataset(folder, o).records} >= {"a blue circle, zq", "red, edited"}
    for bad, why in (("../outside.png", "not inside"), ("1_blue/0002.txt", "no such image"),
                     ("1_blue/none.png", "no such image"), ("", "select an image")):
        with pytest.raises(UserError, match=why):
            save_caption(folder, bad, "x")
    assert not (folder.parent / "outside.txt").exists()


def test_a_changed_image_is_planned_again(folder):
    o = options()
    first = dataset_overview(folder, o)
    _reshape(folder / "2_red" / "0003.png", 64, 128)
    os.utime(folder / "2_red" / "0003.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    second = dataset_overview(folder, o)
    assert second is not first and dict(second.histogram)[(128, 64)] == 2


def test_nothing_usable_is_shown_not_raised(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    ov = dataset_overview(bad, options())
    assert ov.error.startswith("no usable training images") and ov.files == ["a.png"]
    assert ov.page(0)[0].status == "unreadable" and ov.histogram == []
    with pytest.raises(UserError, match="image folder not found"):
        dataset_overview(tmp_path / "missing", options())


def test_a_large_folder_is_paged(tmp_path):
    big = tmp_path / "10_big"
    big.mkdir()
    for i in range(PER_PAGE * 2 + 5):
        Image.new("RGB", (16, 8) if i % 2 else (8, 8), (i, 0, 0)).save(big / f"{i:04d}.png")
    o = options(image_size=(16, 16), image_buckets_step=8, image_min_length=8)
    ov = dataset_overview(tmp_path, o)
    d = ov.to_dict(page=2, options=o)
    assert (d["files"], d["pages"], len(d["rows"])) == (PER_PAGE * 2 + 5, 3, 5)
    assert d["rows"][0]["rel"] == f"10_big/{PER_PAGE * 2:04d}.png"
    assert len(ov.to_dict(page=99, options=o)["rows"]) == 5          # clamped to the last page
    assert d["samples_per_epoch"] == 10 * (PER_PAGE * 2 + 5)
    from trainer.app.dataset_panel import gallery_items
    assert len(gallery_items(ov, ov.page(0))) == PER_PAGE


def test_panel_html_carries_the_histogram_and_repeats(folder):
    from trainer.app.dataset_panel import DATASET_FIELDS, gallery_items, rows_html, summary_html
    ov = dataset_overview(folder, options())
    html = summary_html(ov)
    shown = [(b, int(n)) for b, n in re.findall(r'data-bucket="(\d+x\d+)" data-count="(\d+)"', html)]
    assert shown == [(f"{h}x{w}", n) for (h, w), n in ov.histogram]
    assert 'data-folder="2_red" data-repeats="2" data-images="4" data-samples="8"' in html
    assert all(line.strip() in html for line in ov.log_lines)
    assert 'data-rel="1_blue/broken.png" data-status="unreadable"' in rows_html(ov.page(0))
    tiles = gallery_items(ov, ov.page(0))
    caption = (folder / "1_blue" / "0001.txt").read_text().strip()
    assert len(tiles) == 8 and tiles[1][1] == f"{caption} · 1_blue/0001.png · 128x128"
    assert tiles[2][1] == "(no caption) · 1_blue/0002.png · 128x128"
    assert tiles[3][1].endswith("1_blue/broken.png · unreadable") and "corrupt" in tiles[3][1]
    for name in DATASET_FIELDS:                                      # every name is a schema field
        field(name)


def test_the_histogram_is_what_a_run_logs(folder, tmp_path):
    """A real run (random tiny model) prints the same dataset lines the panel shows. It is stopped once it
    starts encoding, which comes after the dataset lines: the training step would only cost time."""
    from trainer.engine import StopRequest
    from trainer.events import EventBus, RunEvent
    from trainer.models.loader import random_tiny_bundle
    from trainer.modes.lora import dataset_options
    from trainer.runner import run_job
    messages, stop = [], StopRequest()

    def sink(e):
        if isinstance(e, RunEvent):
            messages.append(e.message)
            if e.message.startswith("encoding"):
                stop.request("stop")
    s = Settings.from_dict({**PANEL_SETTINGS, "mode": "LoRA", "lora_data_directory": str(folder),
                            "train_iterations": 1, "train_batch_size": 1, "network_rank": 2, "network_alpha": 2})
    result = run_job(s, lora_dir=tmp_path / "out", bundle=random_tiny_bundle(seed=0, device="cpu"),
                     events=EventBus([sink]), stop=stop, log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    assert result.status == "stopped" and any(m.startswith("training LoRA") for m in messages)
    ov = dataset_overview(folder, dataset_options(s))
    logged = [m for m in messages if m.startswith("  bucket ")]
    assert logged == ov.histogram_lines() and len(logged) == 3
    start = messages.index(ov.log_lines[0])
    assert messages[start:start + len(ov.log_lines)] == ov.log_lines     # every line, in order


@pytest.mark.parametrize("length", [{"train_epochs": 3, "gradient_accumulation_steps": 2},
                                    {"train_iterations": 7}])
def test_the_panel_shows_the_runs_length_as_training_plans_it(folder, length):
    """``train_epochs`` or ``train_iterations``: the other is derived and shown before the run, by the same
    epoch plan ``modes.lora.prepare`` makes (same-bucket batches)."""
    from trainer.app.dataset_panel import epoch_lines, overview_json, summary_html
    from trainer.modes.lora import prepare
    s = Settings.from_dict({**PANEL_SETTINGS, "lora_data_directory": str(folder), "train_batch_size": 3, **length})
    ov = dataset_overview(folder, options())
    lines = epoch_lines(ov, s)
    assert lines == prepare(s).plan.lines()
    # samples per bucket (repeats counted) 64x128: 3, 128x64: 2, 128x128: 6 at batch 3: 1 + 1 + 2 batches
    assert lines[-1] == "4 batches per epoch"
    if "train_epochs" in length:
        assert lines[0] == "3 epochs x 2 steps = 6 train_iterations (derived from train_epochs)"
    else:
        assert lines[0] == "7 train_iterations = 2 epochs of 4 steps (the last one partial)"
    assert all(line in summary_html(ov, lines) for line in lines)
    query = {"folder": str(folder), "image_size": "128", "image_buckets_step": "64", "image_min_length": "64",
             "train_batch_size": "3", **{k: str(v) for k, v in length.items()}}
    assert overview_json(query)["epochs"] == lines
