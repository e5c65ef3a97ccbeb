"""The tab under gradio 4.x (Forge's 4.40.0), in the side environment `.venv-gradio4`.

``python install.py --test`` (README's test command) creates the venv with ``.ci/gradio4.sh``. In it
the tab is built the way the WebUI builds it (rendered inside an outer Blocks), served, and the HTTP
API is mounted on gradio 4's FastAPI app. Without the venv the test skips, except under CI where a
missing venv is a failure.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv-gradio4" / "bin" / "python"

SCRIPT = r"""
import json, socket, sys, urllib.request
from pathlib import Path
import gradio as gr
from trainer.app import compat
from trainer.app.api import register_api
from trainer.app.host import Host
from trainer.app.jobs import queue_for
from trainer.settings import FIELDS
from trainer.app.ui import build_tab

root = Path(sys.argv[1])
host = Host(root=root, lora_dir=root / "output")
queue = queue_for(host)
tab = build_tab(host, queue)
with gr.Blocks() as demo:                      # the WebUI's pattern: the tab rendered inside its Blocks
    with gr.Tabs():
        with gr.Tab("Shinkansen"):
            tab.render()
config = demo.get_config_file()
ids = {c["props"].get("elem_id") for c in config["components"]}
types = [c["type"] for c in config["components"]]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
demo.queue(**compat.queue_kwargs(4))
app, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
register_api(app, queue, host, auth=("u", "p"))
def get(path, auth=False):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        req.add_header("Authorization", "Basic dTpw")   # u:p
    try:
        return urllib.request.urlopen(req, timeout=20).status
    except urllib.error.HTTPError as e:
        return e.code
out = {"gradio": gr.__version__, "timer": compat.HAS_TIMER, "ids": sorted(i for i in ids if i),
       "types": types, "page": get("/"), "config": get("/config"), "api_no_auth": get("/shinkansen/v1/jobs"),
       "api_auth": get("/shinkansen/v1/jobs", True), "fields": [f.name for f in FIELDS]}
demo.close()
print("RESULT " + json.dumps(out))
"""


def test_tab_builds_and_serves_under_gradio_4(tmp_path):
    if not VENV_PY.is_file():
        if os.environ.get("CI"):
            pytest.fail("missing .venv-gradio4: `python install.py --test` must create it (.ci/gradio4.sh)")
        pytest.skip("missing .venv-gradio4; run `python install.py --test` (or bash .ci/gradio4.sh --setup-only)")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([str(VENV_PY), "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["gradio"].startswith("4."), out["gradio"]
    assert out["timer"] and "timer" in out["types"]           # live progress polls through gr.Timer
    for elem in ("shinkansen-mode", "shinkansen-start", "shinkansen-add", "shinkansen-progress",
                 "shinkansen-queue-table", "shinkansen-plot", "shinkansen-sample-generate", "shinkansen-2nd-pass"):
        assert elem in out["ids"], elem
    assert all(f"shinkansen-{name}" in out["ids"] for name in out["fields"])   # every schema field has a widget
    assert (out["page"], out["config"]) == (200, 200)
    assert (out["api_no_auth"], out["api_auth"]) == (401, 200)
