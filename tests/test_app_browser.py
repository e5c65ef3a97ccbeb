"""The tab in a real browser (Playwright driving Debian's /usr/bin/chromium) against `python -m trainer`.

One user session: load the LoRA preset, point it at a toy image folder, Start Training and watch the
step counter move with no reload; queue a second job, queue a third and delete it; see the running
job's curve on the Plot tab; the run ends with a LoRA file; after a server restart the pending job is
still listed. Screenshots of the Train, Queue and Plot tabs go to test-output/.
"""
import importlib.util
import re
import time
from pathlib import Path

import pytest

from app_server import ROOT, AppServer, make_root, tiny_job
from trainer.world import toy

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-output"


def _missing() -> str:
    """README's two prerequisites; only their absence skips. A broken install still fails below."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install playwright; .ci/run does it)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does it)"
    return ""


if _missing():
    pytest.skip(_missing(), allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def field(page, name):
    return page.locator(f"#shinkansen-{name}").locator("input, textarea").first


def set_field(page, name, value):
    box = field(page, name)
    box.fill(str(value))
    box.press("Tab")                      # gradio 3.41 takes the value on input/blur


def pick(page, elem_id, option):
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f'ul.options li[data-value="{option}"]').first.click()


def open_tab(page, label):
    page.locator("#shinkansen-tabs button", has_text=re.compile(f"^\\s*{label}\\s*$")).first.click()


def progress(page):
    box = page.locator("#shinkansen-progress .shinkansen-progress").first
    return int(box.get_attribute("data-step") or 0), box.get_attribute("data-phase")


def row(page, name, state=None):
    sel = f'#shinkansen-queue-table tr[data-name="{name}"]' + (f'[data-state="{state}"]' if state else "")
    return page.locator(sel)


def test_train_queue_plot_and_restart_in_the_browser(browser, tmp_path):
    SHOTS.mkdir(exist_ok=True)
    root = make_root(tmp_path / "ext")
    images = tmp_path / "images"
    toy.make_dataset(images, 8, seed=3, image_size=64)
    server = AppServer(root).start()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server.url)
        pick(page, "shinkansen-preset", "LoRA")
        page.click("#shinkansen-preset-load")
        expect(field(page, "save_lora_name")).to_have_value("LoRA", timeout=30_000)
        expect(field(page, "train_iterations")).to_have_value("1000")
        # the mode radio shows only LoRA's fields
        assert page.locator("#shinkansen-lora_data_directory").is_visible()
        assert not page.locator("#shinkansen-original_prompt").is_visible()

        for name, value in (("lora_data_directory", images), ("image_size", 64), ("train_iterations", 40),
                            ("train_batch_size", 1), ("network_rank", 4), ("network_alpha", 4),
                            ("save_lora_name", "first")):
            set_field(page, name, value)
        page.locator("#shinkansen-optional").get_by_text("Optional parameters").first.click()
        for name, value in (("image_buckets_step", 64), ("image_min_length", 64)):
            set_field(page, name, value)
        page.screenshot(path=str(SHOTS / "train-tab.png"), full_page=True)

        page.click("#shinkansen-start")
        expect(page.locator("#shinkansen-message").first).to_contain_text("job #1 first started", timeout=30_000)
        # the step counter advances on screen, with no reload and no click
        server.wait(lambda: progress(page)[0] >= 1, timeout=180, what="the first step on screen", poll=0.3)
        first_seen = progress(page)[0]
        server.wait(lambda: progress(page)[0] >= first_seen + 3, timeout=120, what="the counter to advance")
        expect(page.locator("#shinkansen-progress").first).to_contain_text("it/s")

        set_field(page, "save_lora_name", "second")
        page.click("#shinkansen-add")
        expect(page.locator("#shinkansen-message").first).to_contain_text("job #2 second added")
        set_field(page, "save_lora_name", "third")
        page.click("#shinkansen-add")
        expect(page.locator("#shinkansen-message").first).to_contain_text("job #3 third added")

        open_tab(page, "Queue")
        expect(row(page, "first", "running")).to_have_count(1, timeout=10_000)
        expect(row(page, "second", "pending")).to_have_count(1, timeout=10_000)
        expect(row(page, "third", "pending")).to_have_count(1)
        pick(page, "shinkansen-queue-select", "#3 third")
        page.click("#shinkansen-queue-delete")
        expect(row(page, "third")).to_have_count(0, timeout=10_000)
        expect(page.locator("#shinkansen-queue-message").first).to_contain_text("deleted job #3")
        page.click("#shinkansen-queue-pause")          # let "first" finish, keep "second" waiting
        expect(page.locator("#shinkansen-queue-table .shinkansen-queue-state")).to_contain_text("paused")
        page.screenshot(path=str(SHOTS / "queue-tab.png"), full_page=True)

        open_tab(page, "Plot")
        plot_img = page.locator("#shinkansen-plot img")
        expect(plot_img.first).to_be_visible(timeout=30_000)
        expect(page.locator("#shinkansen-plot-info").first).to_contain_text("first-", timeout=10_000)
        steps_then = int(page.locator("#shinkansen-plot-info .shinkansen-run").first.get_attribute("data-steps"))
        assert steps_then >= 1

        server.wait(lambda: progress(page)[1] == "done", timeout=300, what="the run to finish", poll=1)
        assert (root / "output" / "first.safetensors").is_file()
        # the plot followed the run to its end (auto-refresh)
        server.wait(lambda: page.locator("#shinkansen-plot-info .shinkansen-run").first.get_attribute("data-steps")
                    == "40", timeout=30, what="the plot to show all 40 steps")
        page.screenshot(path=str(SHOTS / "plot-tab.png"), full_page=True)
        open_tab(page, "Queue")
        expect(row(page, "first", "done")).to_have_count(1, timeout=10_000)
        time.sleep(2)
        expect(row(page, "second", "pending")).to_have_count(1)     # paused: it did not start
        page.close()

        began = time.monotonic()
        server.stop(timeout=20)      # SIGTERM (Ctrl-C) ends the app promptly, also after pages were served
        assert (server.proc.returncode, time.monotonic() - began < 20) == (0, True), server.output()[-2000:]
        server = AppServer(root).start()
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server.url)
        open_tab(page, "Queue")
        expect(row(page, "second", "pending")).to_have_count(1, timeout=30_000)
        expect(row(page, "first", "done")).to_have_count(1)

        # edit the pending job back into the form: it leaves the queue and fills the Train tab
        pick(page, "shinkansen-queue-select", "#2 second")
        page.click("#shinkansen-queue-edit")
        expect(field(page, "save_lora_name")).to_have_value("second", timeout=10_000)
        expect(field(page, "train_iterations")).to_have_value("40")
        open_tab(page, "Queue")
        expect(row(page, "second")).to_have_count(0, timeout=10_000)

        page.close()
    finally:
        server.stop()


def test_fresh_page_labels_model_size_and_empty_plot(browser, tmp_path):
    """What a new user sees first: human labels with the settings key beside them (Ctrl-F finds it), an
    image size that fits the default embedded model (64 px) with a note saying so, and a Plot tab that
    says "no data yet" for a run that has not logged a step, not an empty frame with made-up axes."""
    SHOTS.mkdir(exist_ok=True)
    root = make_root(tmp_path / "ext")
    early = root / "logs" / "20260101" / "early-20260101_000000.csv"    # a run stopped before its first step
    early.parent.mkdir(parents=True)
    early.write_text("step,loss,loss_ema,lr,elapsed_s\n")
    server = AppServer(root).start()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server.url)
        box = page.locator("#shinkansen-train_lr_scheduler_settings")
        expect(box.locator("[data-testid='block-info']").first).to_have_text("LR scheduler settings",
                                                                           timeout=30_000)
        expect(box).to_contain_text("train_lr_scheduler_settings")           # the key, as TrainTrain names it
        expect(page.get_by_text("train_lr_scheduler_settings", exact=False).first).to_be_visible()
        expect(page.locator("#shinkansen-mode [data-testid='block-info']").first).to_have_text("Mode")

        expect(field(page, "image_size")).to_have_value("64")
        expect(page.locator("#shinkansen-native-size").first).to_contain_text("64×64")
        page.screenshot(path=str(SHOTS / "train-tab-fresh.png"), full_page=True)

        open_tab(page, "Plot")
        expect(page.locator("#shinkansen-plot-info").first).to_contain_text("no data yet", timeout=30_000)
        expect(page.locator("#shinkansen-plot-info").first).to_contain_text("early-20260101_000000")
        assert page.locator("#shinkansen-plot img").count() == 0              # no empty frame
        page.screenshot(path=str(SHOTS / "plot-tab-no-data.png"), full_page=True)
        page.close()
    finally:
        server.stop()


def test_page_opened_during_a_run_shows_it_its_samples_and_its_lora(browser, tmp_path):
    """A page opened while a job runs shows that job at once, from a page-load event outside gradio's
    queue: here the queue's websocket is held back, as when the pollers of other pages occupy it, and the
    old build-time "No job has run yet" stayed until the next poll. Samples drawn during the run appear
    in the Train tab as they are written, and the finished LoRA is in the Samples tab's list with no
    Refresh click."""
    SHOTS.mkdir(exist_ok=True)
    root = make_root(tmp_path / "ext")
    images = tmp_path / "images"
    toy.make_dataset(images, 8, seed=3, image_size=64)
    server = AppServer(root).start()
    try:
        watcher = browser.new_page(viewport={"width": 1400, "height": 1100})     # open before the run
        watcher.goto(server.url)
        expect(watcher.locator("#shinkansen-progress").first).to_contain_text("No job has run yet", timeout=30_000)

        job = tiny_job(images, "live", steps=40, sample_every_n_steps=10, sample_prompts=["a red circle"])
        assert server.request("POST", "/jobs", {"settings": job, "front": True})[0] == 201
        server.wait(lambda: server.request("GET", "/status")[1]["progress"]["step"] >= 2, timeout=240,
                    what="the job to take steps", poll=0.3)

        late = browser.new_page(viewport={"width": 1400, "height": 1100})
        late.route_web_socket(re.compile(r".*/queue/join.*"), lambda ws: None)   # queued events never answer
        late.goto(server.url)
        box = late.locator("#shinkansen-progress .shinkansen-progress").first
        expect(box).to_have_attribute("data-job", "1", timeout=20_000)
        assert int(box.get_attribute("data-step")) >= 2
        expect(late.locator("#shinkansen-progress").first).to_contain_text("#1 live")
        late.close()

        gallery = watcher.locator("#shinkansen-train-samples img")
        server.wait(lambda: gallery.count() >= 1, timeout=240, what="a sample image in the Train tab")
        watcher.screenshot(path=str(SHOTS / "train-tab-samples.png"), full_page=True)
        server.wait(lambda: progress(watcher)[1] == "done", timeout=300, what="the run to finish", poll=1)
        assert gallery.count() >= 2                                     # steps 10..60: one per sample_every
        assert (root / "output" / "live.safetensors").is_file()

        open_tab(watcher, "Samples")
        watcher.locator("#shinkansen-sample-lora input").first.click()
        expect(watcher.locator('ul.options li[data-value="live.safetensors"]')).to_have_count(1, timeout=10_000)
        watcher.close()
    finally:
        server.stop()
