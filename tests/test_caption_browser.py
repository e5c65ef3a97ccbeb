"""The Caption sub-tab in a real browser (Playwright + Debian's /usr/bin/chromium) against `python -m trainer`:
pick a folder and the tiny WD14 tagger, press Caption, watch it finish, find the captions on disk and listed."""
import importlib.util
import re
from pathlib import Path

import pytest
from PIL import Image

import caption_models
from app_server import ROOT, AppServer, make_root

CHROMIUM = Path("/usr/bin/chromium")
if importlib.util.find_spec("playwright") is None or not CHROMIUM.exists():
    pytest.skip("needs the playwright package and /usr/bin/chromium (README, .ci/run)", allow_module_level=True)
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
pytest.importorskip("onnx", reason="the test builds its ONNX tagger with the onnx package")

from playwright.sync_api import expect, sync_playwright  # noqa: E402


def _fill(page, elem_id, value):
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(str(value))
    box.press("Tab")


def test_caption_panel_in_the_browser(tmp_path):
    model = caption_models.write_wd14(tmp_path / "wd14")
    data = tmp_path / "images"
    data.mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(data / "red.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(data / "blue.png")
    (data / "blue.txt").write_text("kept as it is\n", encoding="utf-8")
    server = AppServer(make_root(tmp_path / "ext")).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                        args=["--no-sandbox", "--headless", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.url)
            page.locator("#shinkansen-tabs button", has_text=re.compile(r"^\s*Caption\s*$")).first.click()
            _fill(page, "shinkansen-caption-folder", data)
            _fill(page, "shinkansen-caption-model", model)
            _fill(page, "shinkansen-caption-trigger", "sks")
            for slider, value in (("threshold", "0.6"), ("character-threshold", "0.7")):
                number = page.locator(f"#shinkansen-caption-{slider} input[type=number]")
                number.fill(value)
                number.press("Tab")
            page.click("#shinkansen-caption-run")
            done = page.locator('#shinkansen-caption-progress [data-phase="done"]')
            expect(done).to_have_count(1, timeout=60_000)
            expect(done).to_contain_text("written 1, kept 1, failed 0")
            expect(page.locator('#shinkansen-caption-results tr[data-image="red.png"]')).to_contain_text(
                "sks, red theme, circle, hatsune miku")
            (ROOT / "test-output").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "test-output" / "caption-tab.png"), full_page=True)
            browser.close()
    finally:
        server.stop()
    assert (data / "red.txt").read_text(encoding="utf-8") == "sks, red theme, circle, hatsune miku\n"
    assert (data / "blue.txt").read_text(encoding="utf-8") == "kept as it is\n"
