"""Start the standalone app (``python -m trainer``) as a subprocess on a free port, for the app tests."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = "/shinkansen/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_root(path: Path) -> Path:
    """A fresh extension folder with the shipped presets (what the tab's preset picker lists)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "presets", path / "presets", dirs_exist_ok=True)
    return path


class AppServer:
    def __init__(self, root: Path, *extra: str, port: int | None = None, auth: tuple | None = None):
        self.root, self.extra, self.port, self.auth = Path(root), extra, port or free_port(), auth
        self.proc: subprocess.Popen | None = None
        self.log = self.root / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> "AppServer":
        args = [sys.executable, "-m", "trainer", "--root", str(self.root), "--port", str(self.port), *self.extra]
        if self.auth:
            args += ["--auth", ":".join(self.auth)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:   # 404 until the API routes are added, right after gradio starts listening
                if self.request("GET", "/status", auth=self.auth)[0] == 200:
                    return self
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server did not come up in {timeout}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def kill(self) -> None:
        """What a crash looks like: SIGKILL, no cleanup at all."""
        self.stop(signal.SIGKILL)

    def request(self, method: str, path: str, body=None, auth=None, query: str = "", raw: bytes | None = None):
        """``(status, json)`` of an API call; HTTP errors are returned, not raised. ``raw``: send these
        bytes as the body instead of ``body`` as JSON."""
        data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{API}{path}{query}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text or b"null")
            except ValueError:
                return e.code, text.decode(errors="replace")

    def wait(self, predicate, timeout: float = 300, what: str = "condition", poll: float = 0.5):
        end = time.time() + timeout
        while time.time() < end:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server died while waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.output()[-2000:]}")


def tiny_job(dataset: Path, name: str, steps: int = 20, **kw) -> dict:
    """A LoRA job that trains in seconds on the tiny model at 64x64."""
    return {"mode": "LoRA", "lora_data_directory": str(dataset), "save_lora_name": name, "image_size": 64,
            "image_buckets_step": 64, "image_min_length": 64, "train_iterations": steps, "train_batch_size": 1,
            "network_rank": 4, "network_alpha": 4, "train_lr_scheduler": "constant", "train_seed": 1,
            "network_blocks": "IN01,IN02,OUT09,OUT10", **kw}
