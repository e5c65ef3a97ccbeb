"""The Dataset sub-tab in a real browser (Playwright + /usr/bin/chromium against `python -m trainer`).

A user points the Train form at a kohya folder (`2_red`, `1_blue`, three aspect ratios, one corrupt
file), opens Dataset, sees the thumbnails with their captions, repeats per folder and the bucket
histogram, which equals what training logs for the same folder and form settings; edits a caption that
did not exist yet, saves, reloads: the file holds the text and the panel shows it. The same JSON is
served at GET /dataset. A screenshot goes to test-output/dataset-panel.png.
"""
import re

from app_server import AppServer, make_root
from test_app_browser import SHOTS, browser, field, open_tab, set_field  # noqa: F401  (skips as that module does)
from test_dataset_panel import make_concept_folder

from playwright.sync_api import expect

from trainer.modes.lora import prepare
from trainer.settings import Settings


def histogram(page) -> list[tuple[str, int]]:
    rows = page.locator("#shinkansen-dataset-summary table.shinkansen-dataset-histogram tbody tr")
    return [(rows.nth(i).get_attribute("data-bucket"), int(rows.nth(i).get_attribute("data-count")))
            for i in range(rows.count())]


def caption_cell(page, rel):
    return page.locator(f'#shinkansen-dataset-table tr[data-rel="{rel}"] .shinkansen-dataset-caption-cell')


def logged_histogram(folder, **form) -> list[tuple[str, int]]:
    """The bucket lines training prints (modes/lora.py: run prints prepare(s).report.lines())."""
    s = Settings.from_dict({"mode": "LoRA", "lora_data_directory": str(folder), **form})
    lines = prepare(s).report.lines()
    return [(m.group(1), int(m.group(2))) for m in (re.match(r"  bucket (\d+x\d+): (\d+)$", ln) for ln in lines) if m]


def test_dataset_panel_browse_edit_save_reload(browser, tmp_path):  # noqa: F811
    SHOTS.mkdir(exist_ok=True)
    images = make_concept_folder(tmp_path / "images")
    server = AppServer(make_root(tmp_path / "ext")).start()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(server.url)
        expect(field(page, "image_size")).to_have_value("64", timeout=30_000)   # the tiny model's size
        set_field(page, "lora_data_directory", images)
        set_field(page, "image_size", 128)                 # step and min length are 64 for this model
        open_tab(page, "Dataset")
        page.click("#shinkansen-dataset-load")             # empty folder box: the form's folder

        table = page.locator("#shinkansen-dataset-summary table.shinkansen-dataset-histogram tbody tr")
        expect(table).to_have_count(3, timeout=30_000)
        form = {"image_size": "128", "image_buckets_step": 64, "image_min_length": 64}
        assert histogram(page) == logged_histogram(images, **form) == [("128x64", 1), ("128x128", 4), ("64x128", 2)]
        log_text = page.locator("#shinkansen-dataset-summary pre.shinkansen-dataset-log").inner_text()
        assert log_text.splitlines() == prepare(Settings.from_dict(
            {"mode": "LoRA", "lora_data_directory": str(images), **form})).lines()   # + the epoch plan
        concepts = page.locator("#shinkansen-dataset-summary table.shinkansen-dataset-concepts tbody tr")
        assert {concepts.nth(i).get_attribute("data-folder"): concepts.nth(i).get_attribute("data-repeats")
                for i in range(concepts.count())} == {"1_blue": "1", "2_red": "2"}

        tiles = page.locator("#shinkansen-dataset-gallery button.thumbnail-item")
        expect(tiles).to_have_count(8)                      # 7 images and the corrupt file, shown as such
        expect(page.locator('#shinkansen-dataset-table tr[data-rel="1_blue/broken.png"]')).to_have_attribute(
            "data-status", "unreadable")
        first_caption = (images / "2_red" / "0000.txt").read_text().strip()
        expect(caption_cell(page, "2_red/0000.png")).to_have_text(first_caption)
        expect(caption_cell(page, "1_blue/0002.png")).to_have_text("")

        tiles.nth(2).click()                                # 1_blue/0002.png: no caption file yet
        expect(page.locator("#shinkansen-dataset-image textarea, #shinkansen-dataset-image input").first
               ).to_have_value("1_blue/0002.png", timeout=10_000)
        info = page.locator("#shinkansen-dataset-info .shinkansen-dataset-info").first
        expect(info).to_contain_text("bucket 128x128")
        box = page.locator("#shinkansen-dataset-caption textarea").first
        expect(box).to_have_value("")
        box.fill("zq, a blue circle, edited")
        page.click("#shinkansen-dataset-save")
        expect(page.locator("#shinkansen-dataset-message").first).to_contain_text("saved 0002.txt", timeout=10_000)
        assert (images / "1_blue" / "0002.txt").read_text() == "zq, a blue circle, edited"
        expect(caption_cell(page, "1_blue/0002.png")).to_have_text("zq, a blue circle, edited")
        expect(info).to_contain_text("trained as: zq, a blue circle, edited")
        page.locator("#shinkansen-tab-dataset").screenshot(path=str(SHOTS / "dataset-panel.png"))

        page.reload()                                       # a fresh page: the form is back at 64 px
        open_tab(page, "Dataset")
        folder_box = page.locator("#shinkansen-dataset-folder textarea, #shinkansen-dataset-folder input").first
        folder_box.fill(str(images))
        page.click("#shinkansen-dataset-load")
        expect(caption_cell(page, "1_blue/0002.png")).to_have_text("zq, a blue circle, edited", timeout=30_000)
        expect(table).to_have_count(1)
        assert histogram(page) == logged_histogram(images, image_size="64", image_buckets_step=64,
                                                   image_min_length=64) == [("64x64", 7)]

        status, body = server.request("GET", "/dataset", query=f"?folder={images}&image_size=128"
                                      "&image_buckets_step=64&image_min_length=64")
        assert status == 200, body
        assert [(b["bucket"], b["count"]) for b in body["histogram"]] == logged_histogram(images, **form)
        assert {r["rel"]: r["caption"] for r in body["rows"]}["1_blue/0002.png"] == "zq, a blue circle, edited"
        assert server.request("GET", "/dataset", query=f"?folder={tmp_path}/missing")[0] == 400
        page.close()
    finally:
        server.stop(timeout=5)     # a server that served a page takes 60 s to exit on SIGTERM (not this tab's doing)
