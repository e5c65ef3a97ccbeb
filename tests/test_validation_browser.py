"""The Plot tab draws the validation loss as a second series (Playwright + Debian's /usr/bin/chromium, like
tests/test_app_browser.py): a job with validation_split runs on the app's queue, the plot's legend lists
"NAME validation" with its points, the progress line shows the last validation loss, and the API's loss and
status JSON carry it."""
import importlib.util
import re
from pathlib import Path

import pytest

from app_server import AppServer, make_root, tiny_job
from trainer.world import toy

CHROMIUM = Path("/usr/bin/chromium")
if importlib.util.find_spec("playwright") is None or not CHROMIUM.exists():
    pytest.skip("needs the playwright package and /usr/bin/chromium (.ci/run installs both)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402


def test_plot_tab_shows_the_validation_series(tmp_path):
    root = make_root(tmp_path / "ext")
    images = tmp_path / "images"
    toy.make_dataset(images, 6, seed=3, image_size=64)
    server = AppServer(root).start()
    try:
        job = tiny_job(images, "val", steps=8, validation_split=0.34, validate_every_n_steps=4)
        status, body = server.request("POST", "/jobs", job)
        assert status == 201, body
        server.request("POST", "/queue/resume")
        job_id = body["id"]
        server.wait(lambda: server.request("GET", f"/jobs/{job_id}")[1]["state"] in ("done", "failed"),
                    timeout=400, what="the job to finish")
        assert server.request("GET", f"/jobs/{job_id}")[1]["state"] == "done", server.output()[-2000:]
        loss = server.request("GET", f"/jobs/{job_id}/loss")[1]
        assert loss["val_steps"] == [4, 8] and len(loss["val_loss"]) == 2
        progress = server.request("GET", "/status")[1]["progress"]
        assert progress["val_step"] == 8 and progress["val_loss"] == pytest.approx(loss["val_loss"][-1], rel=1e-4)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                        args=["--no-sandbox", "--headless", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(server.url)
                expect(page.locator("#shinkansen-progress .shinkansen-val").first).to_contain_text(
                    "validation", timeout=60_000)
                page.locator("#shinkansen-tabs button", has_text=re.compile(r"^\s*Plot\s*$")).first.click()
                expect(page.locator("#shinkansen-plot img").first).to_be_visible(timeout=60_000)
                legend = page.locator("#shinkansen-plot-info .shinkansen-legend").first
                expect(legend).to_contain_text("val-", timeout=30_000)
                series = legend.get_attribute("data-series").split(" | ")
                assert len(series) == 2 and series[1] == series[0] + " validation", series
                run = page.locator("#shinkansen-plot-info .shinkansen-run").first
                assert run.get_attribute("data-val-points") == "2"
                expect(run).to_contain_text("validation")
                page.screenshot(path=str(tmp_path / "plot-validation.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.stop()
