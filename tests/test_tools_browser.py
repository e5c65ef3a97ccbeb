"""The Tools sub-tab in a real browser: resize a LoRA from the LoRA folder, see the per-module report, and
the new file exists and loads like a trained one (Playwright + /usr/bin/chromium, as test_app_browser.py)."""
import json

import pytest
import torch

from app_server import AppServer, make_root
from test_app_browser import CHROMIUM, _missing, field, open_tab, set_field

if _missing():
    pytest.skip(_missing(), allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402


def test_resize_from_the_tools_tab(tmp_path):
    from trainer.models.loader import load_model_or_default
    from trainer.networks.file import read_metadata, save_lora
    from trainer.networks.network import NetworkSpec, create_network
    from trainer.tools import lora_delta as D
    from trainer.tools.inspect_lora import inspect

    root = make_root(tmp_path / "ext")
    bundle = load_model_or_default(None, device="cpu")
    net = create_network(bundle, NetworkSpec(network_type="lierla", rank=4, alpha=4, seed=0))
    with torch.no_grad():
        for a in net.adapters.values():
            a.lora_up.weight.normal_(0, 0.05)
    save_lora(net, root / "output" / "mine.safetensors", {"ss_output_name": "mine"})
    server = AppServer(root).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                        args=["--no-sandbox", "--headless", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            frames = []      # the queue's replies, to say why if the run does not end in "saved:"
            page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(str(f)[:400])))
            page.goto(server.url)
            open_tab(page, "Tools")
            box = field(page, "tools-resize-lora")
            box.fill("mine.safetensors")
            box.press("Enter")
            set_field(page, "tools-resize-out", "mine-r2")
            set_field(page, "tools-resize-rank", 2)
            page.click("#shinkansen-tools-resize-run")
            try:
                expect(page.locator("#shinkansen-tools-resize-message").first).to_contain_text("saved:",
                                                                                            timeout=180_000)
            except AssertionError:
                done = [f for f in frames if "process_completed" in f]
                raise AssertionError(f"no 'saved:'; completed events: {done[-3:]}; server: {server.output()[-1500:]}")
            report = field(page, "tools-resize-report").input_value()
            browser.close()
        out = root / "output" / "mine-r2.safetensors"
        assert out.is_file()
        assert report.count("rank 4→2") == len(net.adapters) and "mean fro kept" in report
        info = inspect(out)
        assert info["unmatched_modules"] == [] and info["ranks"] == {2: len(net.adapters)}
        assert all(m.rank == 2 for m in D.read_lora(out)[0].values())
        assert json.loads(read_metadata(out)["shinkansen_tool"])["tool"] == "resize"
    finally:
        server.stop()
