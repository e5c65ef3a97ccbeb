"""``scripts/shinkansen.py`` loaded the way A1111 1.10 loads extension scripts, against fake ``modules.*``.

``modules.script_loading.load_module``: ``spec_from_file_location(basename, path)`` + ``exec_module``
with the extension folder first on ``sys.path`` during the import, the module itself not in
``sys.modules``. Then the registered callbacks are called as the WebUI calls them.
"""
import asyncio
import base64
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

import fake_webui

EXT_DIR = Path(__file__).resolve().parents[1]
SCRIPT = EXT_DIR / "scripts" / "shinkansen.py"
PACKAGE = "shinkansen_trainer"


def load_like_webui(path: Path):
    sys.path.insert(0, str(path.parent.parent))
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path), str(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent.parent))


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """Fake ``modules.*``, no ``shinkansen_trainer`` loaded yet; afterwards our modules and queues go away."""
    mods = fake_webui.make_modules(tmp_path, sd_model=None, ext_dir=EXT_DIR)
    fake_webui.install(monkeypatch, mods)
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        monkeypatch.delitem(sys.modules, name)
    yield mods, tmp_path
    jobs = sys.modules.get(PACKAGE + ".app.jobs")
    for q in list(getattr(jobs, "_QUEUES", {}).values()):
        q.close(timeout=5)
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def _load(mods, tmp_path):
    script = load_like_webui(SCRIPT)
    script.webui.ROOT = tmp_path / "ext"          # the queue database and logs of this test
    return script


def _request(app, path, auth=None):
    import httpx
    headers = {"Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()} if auth else {}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://webui") as client:
            return await client.get(path, headers=headers)
    return asyncio.run(go()).status_code


def test_registers_tab_settings_routes_and_cleanup(webui):
    mods, tmp_path = webui
    script = _load(mods, tmp_path)
    callbacks = mods["modules.script_callbacks"].callbacks
    assert {k: len(v) for k, v in callbacks.items()} == {"before_ui": 1, "ui_tabs": 1, "ui_settings": 1,
                                                         "app_started": 1, "script_unloaded": 1, "model_loaded": 0}
    assert script.__name__ == "shinkansen.py" and "shinkansen.py" not in sys.modules
    assert Path(sys.modules[PACKAGE].__file__).parent == EXT_DIR / "trainer"

    callbacks["ui_settings"][0]()
    labels = mods["modules.shared"].opts.data_labels
    assert {"shinkansen_share_model", "shinkansen_refresh_loras"} <= set(labels)
    assert labels["shinkansen_share_model"].section == ("shinkansen", "Shinkansen")
    assert labels["shinkansen_share_model"].category_id == "training"

    import gradio as gr
    tabs = callbacks["ui_tabs"][0]()
    assert len(tabs) == 1 and tabs[0][1:] == ("Shinkansen", "shinkansen") and isinstance(tabs[0][0], gr.Blocks)
    assert "cannot run" not in str(tabs[0][0].config), "the real tab was not built"

    from fastapi import FastAPI
    app = FastAPI()
    mods["modules.shared"].cmd_opts.api_auth = "alice:secret,bob:pw2"
    callbacks["app_started"][0](None, app)
    paths = {getattr(r, "path", "") for r in app.routes}
    assert "/shinkansen/v1/status" in paths
    assert _request(app, "/shinkansen/v1/status") == 401
    assert _request(app, "/shinkansen/v1/status", ("alice", "wrong")) == 401
    assert _request(app, "/shinkansen/v1/status", ("alice", "secret")) == 200
    assert _request(app, "/shinkansen/v1/status", ("bob", "pw2")) == 200

    callbacks["script_unloaded"][0]()


def test_routes_open_without_api_auth(webui):
    mods, tmp_path = webui
    _load(mods, tmp_path)
    from fastapi import FastAPI
    app = FastAPI()
    mods["modules.script_callbacks"].callbacks["app_started"][0](None, app)
    assert _request(app, "/shinkansen/v1/status") == 200


def test_reload_ui_keeps_the_package_and_its_queue(webui):
    """"Reload UI" re-executes the script; the package (and a running job's queue) must stay the same."""
    mods, tmp_path = webui
    first = _load(mods, tmp_path)
    queue = first.webui.job_queue()
    package = sys.modules[PACKAGE]
    second = load_like_webui(SCRIPT)
    assert sys.modules[PACKAGE] is package and second.webui is first.webui
    assert second.webui.job_queue() is queue


def test_unbuildable_tab_says_so_instead_of_breaking_the_webui(webui, monkeypatch):
    mods, tmp_path = webui
    script = _load(mods, tmp_path)
    broken = types.ModuleType(PACKAGE + ".app.ui")

    def build_tab(host, queue=None):
        raise ImportError("gradio 9 is not supported")
    broken.build_tab = build_tab
    monkeypatch.setitem(sys.modules, PACKAGE + ".app.ui", broken)
    monkeypatch.setattr(sys.modules[PACKAGE], "ui", broken, raising=False)
    blocks, title, _ = mods["modules.script_callbacks"].callbacks["ui_tabs"][0]()[0]
    assert title == "Shinkansen" and "gradio 9 is not supported" in str(blocks.config)


def test_side_by_side_with_traintrain(webui, monkeypatch, tmp_path):
    """TrainTrain's package is also called ``trainer``; with it already imported, our tab loads our code."""
    mods, _ = webui
    tt_dir = tmp_path / "sd-webui-traintrain"
    (tt_dir / "trainer").mkdir(parents=True)
    (tt_dir / "trainer" / "__init__.py").write_text("WHO = 'traintrain'\n")
    (tt_dir / "trainer" / "train.py").write_text("def train(*a):\n    return 'traintrain train'\n")
    (tt_dir / "scripts").mkdir()
    (tt_dir / "scripts" / "traintrain.py").write_text(
        "from modules import script_callbacks\nfrom trainer import train\n"
        "script_callbacks.on_ui_tabs(lambda: [(None, 'TrainTrain', 'traintrain')])\n")
    for name in [n for n in sys.modules if n == "trainer" or n.startswith("trainer.")]:
        monkeypatch.delitem(sys.modules, name)   # this test process imported ours as "trainer"; TrainTrain's here
    load_like_webui(tt_dir / "scripts" / "traintrain.py")       # A1111 loads scripts in folder order
    theirs = sys.modules["trainer"]
    assert theirs.WHO == "traintrain"

    script = _load(mods, tmp_path)
    assert sys.modules["trainer"] is theirs and sys.modules["trainer.train"].train() == "traintrain train"
    assert not [n for n in sys.modules if n.startswith("trainer.") and n != "trainer.train"], \
        "our code must never be imported as trainer.*"
    ours = [n for n in sys.modules if n.startswith(PACKAGE + ".")]
    assert PACKAGE + ".webui.adapter" in ours and PACKAGE + ".engine" in ours
    assert all(Path(sys.modules[n].__file__).is_relative_to(EXT_DIR / "trainer") for n in ours + [PACKAGE])

    callbacks = mods["modules.script_callbacks"].callbacks
    ours_tab = callbacks["ui_tabs"][-1]()
    assert ours_tab[0][1] == "Shinkansen" and "cannot run" not in str(ours_tab[0][0].config)
    assert type(script.webui.host()).__module__ == PACKAGE + ".webui.adapter"
    assert [t()[0][1] for t in callbacks["ui_tabs"][:1]] == ["TrainTrain"]


def test_console_says_once_that_jobs_of_the_previous_session_wait(webui, monkeypatch, capsys):
    """A1111 configures no logging handler: only warnings reach its console (Python's last-resort handler)."""
    import logging
    mods, tmp_path = webui
    script = _load(mods, tmp_path)
    importlib.import_module(PACKAGE + ".world.toy").make_dataset(tmp_path / "ds", 2, seed=1, image_size=64)
    jobs = importlib.import_module(PACKAGE + ".app.jobs")
    previous = jobs.JobQueue(script.webui.host())                 # the last session's queue, never started
    for name in ("first", "second"):
        previous.add({"mode": "LoRA", "lora_data_directory": str(tmp_path / "ds"), "save_lora_name": name})
    monkeypatch.setattr(logging.root, "handlers", [])     # the WebUI's console, not pytest's log capture
    capsys.readouterr()

    callbacks = mods["modules.script_callbacks"].callbacks
    callbacks["app_started"][0](None, __import__("fastapi").FastAPI())     # starts the queue, as at startup
    load_like_webui(SCRIPT).webui.job_queue()                               # "Reload UI": no second notice
    err = capsys.readouterr().err
    assert err.count("2 job(s) from the previous session are waiting; press Run queue") == 1, err
    assert script.webui.job_queue().paused
