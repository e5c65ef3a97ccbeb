"""The standalone app: ``python -m trainer`` serves the tab and the HTTP API on 127.0.0.1.

The tab is rendered inside an outer Blocks exactly as the WebUI does it (``interface.render()``),
so the standalone app exercises the WebUI's layout path. The queue is enabled here (the WebUI
enables it itself): gradio 3.41's ``every=`` polling runs through it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..engine import ROOT
from ..errors import UserError


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", action="store_true", help="listen on all interfaces (default: 127.0.0.1 only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", metavar="USER:PASS", help="require this login for the UI and HTTP basic for the API")
    p.add_argument("--root", default=str(ROOT),
                   help="extension folder holding presets/, logs/, json/, jobs.sqlite (default: this checkout)")
    p.add_argument("--lora-dir", help="where LoRA files go (default: ROOT/output)")
    p.add_argument("--model", default="", help="default checkpoint of the form (default: the embedded tiny model)")
    p.add_argument("--model-dir", help="folder the model picker lists checkpoints from")
    p.add_argument("--vae-dir", help="folder the VAE picker lists VAEs from")


def make_host(args: argparse.Namespace):
    from .host import Host
    from .api import parse_auth
    root = Path(args.root).resolve()
    if not root.is_dir():
        raise UserError(f"--root: {root} is not a folder")
    creds = parse_auth(args.auth) if args.auth else {}
    return Host(root=root, lora_dir=Path(args.lora_dir).resolve() if args.lora_dir else root / "output",
                model_dir=Path(args.model_dir) if args.model_dir else None,
                vae_dir=Path(args.vae_dir) if args.vae_dir else None, default_model=args.model or "",
                auth=next(iter(creds.items())) if creds else None)


def serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    host = make_host(args)
    import gradio as gr
    from . import compat
    from .api import register_api
    from .jobs import queue_for
    from .ui import build_tab

    queue = queue_for(host)
    tab = build_tab(host, queue)
    css_file = ROOT / "style.css"
    with gr.Blocks(title="Shinkansen", analytics_enabled=False,
                   css=css_file.read_text(encoding="utf-8") if css_file.is_file() else None) as demo:
        tab.render()
    demo.queue(**compat.queue_kwargs(8))
    name = "0.0.0.0" if args.listen else "127.0.0.1"
    app, local_url, _ = demo.launch(server_name=name, server_port=args.port, auth=host.auth,
                                    prevent_thread_lock=True, show_api=False, inbrowser=False, quiet=True)
    register_api(app, queue, host, auth=host.auth)
    print(f"Shinkansen: serving on http://{name}:{args.port}/ (API under /shinkansen/v1; root {host.root})",
          flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("Shinkansen: shutting down", file=sys.stderr, flush=True)
    finally:
        queue.shutdown()
        # gradio 3.41's close waits for uvicorn, which waits for every open page's connection to end: a
        # served page held a Ctrl-C'd app for a minute. The queue is already committed, so give it a moment.
        closer = threading.Thread(target=demo.close, name="gradio-close", daemon=True)
        closer.start()
        closer.join(3)
    # Handler threads (a Samples generation, a polling event) must not keep a stopped server alive; the
    # queue's state is already committed, so a hard exit loses nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
