"""Captioning end to end on tiny models of the real formats (built in the test, nothing downloaded).

WD14: an ONNX tagger with the SmilingWolf signature whose probabilities are fixed by the image's colour
(``caption_models.RED`` / ``BLUE``), so thresholds, exclusions, ratings and kaomoji are checked exactly.
BLIP and Florence-2: random tiny models saved with ``save_pretrained`` and loaded by transformers' own
classes; the written caption must be what the model generates.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import caption_models
from trainer.caption.run import CaptionOptions, run_all
from trainer.caption.tags import compose
from trainer.caption.wd14 import preprocess
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wd14(tmp_path_factory):
    """The tiny tagger; both packages are in requirements-test.txt (install.py --test installs them)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    pytest.importorskip("onnx", reason="the test builds its ONNX tagger with the onnx package (pip install onnx)")
    return caption_models.write_wd14(tmp_path_factory.mktemp("wd14"))


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (48, 64), (0, 0, 255)).save(folder / "blue.bmp")   # not square: padded
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "mine.png")
    (folder / "mine.txt").write_text("my own words, red theme\n", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    return folder


def _cli(*args, env=None, timeout=120):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer", "caption", *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").rstrip("\n")


def test_wd14_cli_thresholds_exclusions_trigger_and_existing_captions(tmp_path, wd14):
    data = _images(tmp_path / "data")
    r = _cli(data, "--model", wd14, "--trigger", "sks", "--threshold", "0.5", "--character-threshold", "0.75",
             "--exclude", "circle")
    assert r.returncode == 0, r.stderr
    # red: general >= 0.5 (red_theme .875, circle .625 excluded, ^_^ .5 at the boundary, kept with its underscore),
    # characters >= 0.75 (hatsune_miku at the boundary; kirby .5 passes the general but not the character threshold)
    assert _read(data / "red.txt") == "sks, red theme, ^_^, hatsune miku"
    assert _read(data / "blue.txt") == "sks, blue theme, no humans, kirby (series)"
    assert _read(data / "mine.txt") == "my own words, red theme"            # kept: no --overwrite/--append
    assert not (data / "broken.txt").exists() and not (data / "notes.txt").exists()
    assert "broken.png" in r.stderr and "failed" in r.stderr                # listed, skipped, not fatal
    assert "4/4" in r.stderr and "100%" in r.stderr                         # the progress bar reached the end
    assert r.stdout.strip().endswith("written 2, kept 1, failed 1")

    r = _cli(data, "--model", wd14, "--trigger", "sks", "--thresh", "0.25", "--append")   # kohya's --thresh
    assert r.returncode == 0, r.stderr
    assert _read(data / "red.txt") == ("sks, red theme, ^_^, hatsune miku, circle, no humans, simple background, "
                                      "kirby (series)")                    # only what was missing, once
    assert _read(data / "mine.txt") == ("sks, my own words, red theme, circle, ^_^, no humans, simple background, "
                                       "hatsune miku, kirby (series)")

    r = _cli(data, "--model", wd14 / "model.onnx", "--overwrite", "--threshold", "0.8", "--character-threshold",
             "0.9", "--caption_extension", "txt")                        # the .onnx file itself; kohya's spelling
    assert r.returncode == 0, r.stderr
    assert _read(data / "mine.txt") == "red theme"
    assert _read(data / "blue.txt") == "blue theme, kirby (series)"
    assert r.stdout.strip().endswith("written 3, kept 0, failed 1")


def test_missing_weights_and_bad_input_are_one_line_exit_2(tmp_path, wd14):
    data = _images(tmp_path / "data")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    for kind, hint in (("wd14", "hf download SmilingWolf/wd-v1-4-convnext-tagger-v2 model.onnx selected_tags.csv"),
                       ("blip", "hf download Salesforce/blip-image-captioning-large"),
                       ("florence2", "hf download florence-community/Florence-2-large")):
        r = _cli(data, "--kind", kind, "--overwrite", env=offline)
        assert r.returncode == 2, (kind, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and hint in lines[0], r.stderr
        assert "--model" in lines[0]
    assert not (data / "red.txt").exists()                                  # nothing written, nothing lost
    for args, words in (([tmp_path / "nowhere"], "folder not found"),
                        ([data, "--model", wd14, "--threshold", "1.5"], "between 0 and 1"),
                        ([data, "--model", tmp_path / "no-model-here"], "not found"),
                        ([data, "--kind", "blip", "--model", wd14], "not a BLIP model folder"),
                        ([data, "--model", wd14, "--caption-extension", ".png"], "extension"),
                        ([data, "--kind", "blip", "--model", _config_only(tmp_path), "--device", "gpu0"],
                         "not a device name")):
        r = _cli(*args, env=offline)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, (args, r.stderr)
    assert _read(data / "mine.txt") == "my own words, red theme"


def _config_only(tmp_path: Path) -> Path:
    (tmp_path / "blip-like").mkdir(exist_ok=True)
    (tmp_path / "blip-like" / "config.json").write_text("{}")
    return tmp_path / "blip-like"


def test_default_weights_come_from_the_hugging_face_cache(tmp_path, wd14):
    """No --model: the default repository's snapshot in the user's cache (laid out as huggingface_hub does)."""
    import shutil
    data = _images(tmp_path / "data")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--SmilingWolf--wd-v1-4-convnext-tagger-v2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(wd14, repo / "snapshots" / commit)
    r = _cli(data, "--threshold", "0.8", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 0, r.stderr
    assert _read(data / "red.txt") == "red theme"


def test_wd14_ratings_order_underscores_and_preprocessing(tmp_path, wd14):
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(data / "b.png")
    Image.new("RGBA", (40, 20), (255, 0, 0, 255)).save(data / "r.png")         # alpha: flattened on white
    opts = CaptionOptions(model=str(wd14), threshold=0.7, character_threshold=0.7, rating="first",
                          character_first=True, underscores_to_spaces=False, mode="overwrite", batch_size=2)
    summary = run_all(data, opts)
    assert summary.line() == "written 2, kept 0, failed 0"
    assert _read(data / "b.txt") == "general, kirby_(series), blue_theme, no_humans"   # argmax rating first
    assert _read(data / "r.txt") == "sensitive, hatsune_miku, red_theme"
    run_all(data, CaptionOptions(model=str(wd14), threshold=0.7, rating="last", mode="overwrite"))
    assert _read(data / "b.txt") == "blue theme, no humans, kirby (series), general"
    (data / "sub").mkdir()
    (data / ".hidden").mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(data / "sub" / "s.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(data / ".hidden" / "h.png")
    assert run_all(data, CaptionOptions(model=str(wd14))).line() == "written 0, kept 2, failed 0"
    assert run_all(data, CaptionOptions(model=str(wd14), recursive=True, threshold=0.8)).line() == \
        "written 1, kept 2, failed 0"                                   # subfolders on request; hidden ones never
    assert _read(data / "sub" / "s.txt") == "red theme" and not (data / ".hidden" / "h.txt").exists()
    # the tagger's input: square, white padding, BGR, 0..255 float32 at the model's size
    x = preprocess(Image.new("RGB", (40, 20), (255, 0, 0)), 448)
    assert x.shape == (448, 448, 3) and x.dtype.name == "float32"
    assert tuple(x[224, 224]) == (0.0, 0.0, 255.0) and tuple(x[5, 224]) == (255.0, 255.0, 255.0)


def test_panel_handler_reports_bad_input_in_one_line(tmp_path):
    from trainer.app.caption_panel import run_panel
    from trainer.app.host import Host
    for folder, words in (("", "folder: enter the folder"), (str(tmp_path / "nope"), "folder not found")):
        progress, _ = list(run_panel(Host(root=tmp_path), folder, "wd14", "", 0.35, 0.35, "", "",
                                     "keep existing captions", ".txt", False, 1, "none", False, False,
                                     "more_detailed"))[-1]
        assert 'data-phase="failed"' in progress and words in progress and "Traceback" not in progress


def test_compose_rules():
    assert compose(["a", "b"], None, trigger="t") == "t, a, b"
    assert compose(["a", "t", "b"], None, trigger="t") == "t, a, b"                 # once, first
    assert compose(["a"], "x", "keep") is None
    assert compose(["a", "Long hair"], "long_hair, z", "append") == "long_hair, z, a"   # same tag: not repeated
    assert compose(["A red circle, on black."], "A red circle, on black.", "append") == "A red circle, on black."
    assert compose(["long_hair", "no humans"], None, exclude=["long hair", "no_humans"]) == ""
    with pytest.raises(ValueError):
        compose(["a"], None, "merge")


def test_options_checked_before_any_model(tmp_path):
    data = _images(tmp_path / "d")
    for bad, words in ((dict(threshold=-0.1), "between 0 and 1"), (dict(character_threshold=float("nan")), "between"),
                       (dict(batch_size=0), "batch-size"), (dict(kind="gpt"), "unknown captioner"),
                       (dict(trigger="a, b"), "without commas")):
        with pytest.raises(UserError, match=words):
            run_all(data, CaptionOptions(**bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        run_all(tmp_path / "empty", CaptionOptions())


# ---------------------------------------------------------------------------------------------- transformers
def _expected(model_cls, processor_cls, folder, images, **generate):
    """What the model itself generates for these images (transformers alone, no code of ours)."""
    import torch
    processor = processor_cls.from_pretrained(folder)
    model = model_cls.from_pretrained(folder).eval()
    extra = {"text": [generate.pop("task")] * len(images), "padding": True} if "task" in generate else {}
    with torch.inference_mode():
        out = model.generate(**processor(images=images, return_tensors="pt", **extra), do_sample=False, **generate)
    return [" ".join(t.split()) for t in processor.batch_decode(out, skip_special_tokens=True)]


def _two_images(folder: Path) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    ims = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 255))]
    for i, im in enumerate(ims):
        im.save(folder / f"{i}.png")
    return ims


def test_blip_captions_are_the_models_own(tmp_path):
    from transformers import BlipForConditionalGeneration, BlipProcessor
    model = caption_models.write_blip(tmp_path / "blip")
    data = tmp_path / "d"
    ims = _two_images(data)
    expected = _expected(BlipForConditionalGeneration, BlipProcessor, model, ims, num_beams=3, max_length=12,
                         min_length=3)
    assert all(expected)
    opts = dict(kind="blip", model=str(model), trigger="sks", max_length=12, min_length=3, device="cpu")
    assert run_all(data, CaptionOptions(**opts, batch_size=2)).line() == "written 2, kept 0, failed 0"
    assert [_read(data / f"{i}.txt") for i in range(2)] == [f"sks, {t}" for t in expected]
    assert run_all(data, CaptionOptions(**opts, mode="append")).line() == "written 2, kept 0, failed 0"
    assert [_read(data / f"{i}.txt") for i in range(2)] == [f"sks, {t}" for t in expected]   # nothing repeated


def test_florence2_native_class_captions(tmp_path):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration
    model = caption_models.write_florence2(tmp_path / "florence2")
    data = tmp_path / "d"
    ims = _two_images(data)
    expected = _expected(Florence2ForConditionalGeneration, AutoProcessor, model, ims, num_beams=3,
                         max_new_tokens=10, task="<CAPTION>")
    assert all(expected)
    opts = CaptionOptions(kind="florence2", model=str(model), trigger="sks", max_length=10, task="caption",
                          device="cpu", batch_size=2)
    assert run_all(data, opts).line() == "written 2, kept 0, failed 0"
    assert [_read(data / f"{i}.txt") for i in range(2)] == [f"sks, {t}" for t in expected]
    assert run_all(data, opts).line() == "written 0, kept 2, failed 0"      # existing captions kept
