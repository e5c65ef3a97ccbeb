"""The WebUI's own interrogators (CLIP, DeepBooru) as caption kinds, through the adapter, on the faked WebUI.

``tests/fake_webui.py`` gives ``shared.interrogator`` and ``modules.deepbooru.model`` with A1111 1.10's
methods; the run must hold the WebUI's generation lock while they work, start/stop DeepBooru once around the
whole folder, ask it for tags without ranks, and apply our trigger/exclusion/existing-caption rules.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
from PIL import Image

import fake_webui
from trainer.app.caption_panel import kinds, run_panel
from trainer.caption.run import CaptionOptions, run_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def webui(tmp_path, monkeypatch):
    mods = fake_webui.make_modules(tmp_path, sd_model=None)
    fake_webui.install(monkeypatch, mods)
    for name in ("trainer.webui.adapter", "trainer.webui.interrogate"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    host = importlib.import_module("trainer.webui.adapter").WebUIHost.create()
    host.root = tmp_path / "ext"
    return host, mods


def _data(folder: Path) -> Path:
    folder.mkdir()
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("green", (0, 255, 0))):
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 255)).save(folder / "mine.png")
    (folder / "mine.txt").write_text("my words\n", encoding="utf-8")
    return folder


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").rstrip("\n")


def test_clip_interrogator_under_the_generation_lock(webui, tmp_path):
    host, mods = webui
    data = _data(tmp_path / "d")
    extra = host.caption_kinds()
    assert sorted(extra) == ["clip", "deepbooru"]
    lock = mods["modules.call_queue"].queue_lock
    summary = run_all(data, CaptionOptions(kind="clip", trigger="sks", exclude="minimalism"), extra)
    assert summary.line() == "written 2, kept 1, failed 1"
    assert _read(data / "red.txt") == "sks, a red picture, flat colour"
    assert _read(data / "blue.txt") == "sks, a blue picture, flat colour"
    assert _read(data / "mine.txt") == "my words"
    assert not (data / "green.txt").exists()                          # "<error>" is a failure, not a caption
    assert [i.reason for i in summary.items if i.status == "failed"] == ["the captioner failed on this image"]
    calls = mods["modules.shared"].interrogator.calls
    assert sorted(c for c, _, _ in calls) == ["blue", "green", "red"]
    assert all(mode == "RGB" and locked for _, mode, locked in calls)  # RGB images, under the WebUI's lock
    assert lock.holds == 1 and not lock.locked()                      # held once for the run, released after


def test_deepbooru_started_once_and_tags_without_ranks(webui, tmp_path):
    host, mods = webui
    data = _data(tmp_path / "d")
    model = mods["modules.deepbooru"].model
    opts = CaptionOptions(kind="deepbooru", trigger="sks", exclude="no_humans", mode="append")
    summary = run_all(data, opts, host.caption_kinds())
    assert summary.line() == "written 4, kept 0, failed 0"
    # the WebUI's threshold (0.5) and spaces setting apply; rating tags are dropped by DeepBooru itself
    assert _read(data / "red.txt") == "sks, red background, circle"
    assert _read(data / "blue.txt") == "sks, blue background, square"
    assert _read(data / "green.txt") == "sks"
    assert _read(data / "mine.txt") == "sks, my words, red background, circle"
    assert (model.started, model.stopped) == (1, 1)
    assert all(started and locked for _, started, locked in model.calls)
    assert not mods["modules.call_queue"].queue_lock.locked()


def test_caption_panel_offers_and_runs_the_webui_kinds(webui, tmp_path):
    host, _ = webui
    data = _data(tmp_path / "d")
    assert kinds(host) == ["wd14", "blip", "florence2", "clip", "deepbooru"]
    steps = list(run_panel(host, str(data), "deepbooru", "", 0.35, 0.35, "sks", "", "overwrite existing captions",
                           ".txt", False, 1, "none", False, False, "more_detailed"))
    progress, results = steps[-1]
    assert 'data-phase="done"' in progress and 'data-done="4"' in progress and "written 4" in progress
    assert 'data-image="red.png"' in results and "sks, red background, no humans, circle" in results
    assert _read(data / "mine.txt") == "sks, red background, no humans, circle"
    assert len(steps) >= 5                                           # live: an update per image


def test_core_reaches_the_webui_only_through_the_adapter():
    """No module outside trainer/webui imports ``modules`` (the WebUI's package)."""
    offenders = []
    for path in (ROOT / "trainer").rglob("*.py"):
        if "webui" in path.relative_to(ROOT / "trainer").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "modules" or n.startswith("modules.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
