"""A full disk while saving: one line naming the folder and the space needed, and the weights kept elsewhere."""
import builtins
import errno
import json
import re
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from app_server import ROOT, tiny_job
from trainer.app.host import Host
from trainer.app.jobs import JobQueue
from trainer.cli import main
from trainer.networks import load_lora
from trainer.world import toy


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 3, seed=1, image_size=64)
    return folder


class _FullFile:
    """A file on a full disk: the first write fails with ENOSPC, as the kernel reports it."""

    def __init__(self, real):
        self._real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """A folder whose disk is full: Python's writes fail with ENOSPC there, and so do safetensors' and torch's
    own writers, each with the exception type it raises on a full disk. Writes elsewhere work."""
    full = tmp_path / "full"
    full.mkdir()
    real_open, real_save_file, real_torch_save = builtins.open, safetensors.torch.save_file, torch.save

    def inside(path):
        return isinstance(path, (str, Path)) and Path(path).resolve().parent == full.resolve()

    def open_(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        return _FullFile(f) if inside(file) and any(c in mode for c in "wxa") else f

    def save_file(tensors, filename, metadata=None):
        if inside(filename):
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              "message: \"No space left on device\" })")
        return real_save_file(tensors, filename, metadata=metadata)

    def torch_save(obj, f, *a, **kw):
        if inside(f):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        return real_torch_save(obj, f, *a, **kw)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(torch, "save", torch_save)
    return full


def _kept(message):
    """The file the message says holds the weights; it must load as a LoRA."""
    found = re.search(r"kept in (\S+\.safetensors)", message)
    assert found, message
    path = Path(found.group(1))
    tensors, meta = load_lora(path)
    assert any(k.endswith("lora_up.weight") for k in tensors) and meta["ss_output_name"]
    return path


def test_cli_says_in_one_line_where_the_weights_are(tmp_path, dataset, full_disk, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps(tiny_job(dataset, "full-cli", steps=3)))
    kept = None
    try:
        code = main(["train", str(job), "--lora-dir", str(full_disk)])
        err = capsys.readouterr().err
        assert code != 0 and "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
        assert f"disk full: {full_disk} needs " in errors[0] and re.search(r"needs [\d.]+ KB free", errors[0])
        kept = _kept(errors[0])
        assert not list(full_disk.iterdir())                        # no half-written file left behind
    finally:   # the CLI writes its logs (and so the kept weights) into the checkout
        for leftover in [kept, *(ROOT / "logs").glob("*/full-cli-*.csv")]:
            if leftover is not None:
                leftover.unlink(missing_ok=True)


def test_a_queued_job_fails_with_that_line(tmp_path, dataset, full_disk):
    host = Host(root=tmp_path / "ext", lora_dir=full_disk)
    q = JobQueue(host)
    job = q.add(tiny_job(dataset, "full-queue", steps=3))
    q.start().resume()
    try:
        end = time.time() + 300
        while q.get(job.id).state not in ("done", "failed") and time.time() < end:
            time.sleep(0.2)
    finally:
        q.close()
    done = q.get(job.id)
    assert done.state == "failed" and "\n" not in done.message
    assert done.message.startswith(f"disk full: {full_disk} needs ")
    assert _kept(done.message).parent == host.logs_dir / "states"
