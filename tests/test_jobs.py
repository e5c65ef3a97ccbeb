"""The persistent queue without a browser: states, refusals, order, edit-back, crash recovery, the worker."""
import json
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.world import toy
from trainer.errors import UserError
from trainer.app.host import Host
from trainer.app.jobs import DuplicateJob, JobNotFound, JobQueue
from trainer.settings import Settings

TINY = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_iterations=3,
            train_batch_size=1, network_rank=4, network_alpha=4, train_seed=1, train_lr_scheduler="constant",
            network_blocks="IN01,OUT10")


@dataclass
class TinyHost(Host):
    """Standalone host that hands every job the same random tiny model (no file load per job)."""
    bundle: object = None

    def bundle_for(self, settings, device=None, log=None):
        if self.bundle is None:
            from trainer.models.loader import random_tiny_bundle
            self.bundle = random_tiny_bundle(seed=0, device="cpu")
        return self.bundle, {"name": "random-tiny"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 3, seed=1, image_size=64)
    return folder


@pytest.fixture
def host(tmp_path):
    return TinyHost(root=tmp_path / "ext", lora_dir=tmp_path / "loras")


def job_settings(dataset, name, **kw):
    return Settings.from_dict({**TINY, "lora_data_directory": str(dataset), "save_lora_name": name, **kw})


def wait_for(predicate, timeout=120.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def states(q):
    return [(j.name, j.state) for j in q.list()]


def test_jobs_persist_in_order_with_their_settings(host, dataset):
    q = JobQueue(host)
    a = q.add(job_settings(dataset, "a"))
    q.add(job_settings(dataset, "b", train_learning_rate=3e-4))
    again = JobQueue(host)                       # a new process reading the same file
    assert states(again) == [("a", "pending"), ("b", "pending")]
    assert Settings.from_dict(again.get(a.id).settings) == job_settings(dataset, "a")
    assert again.list()[1].settings["train_learning_rate"] == 3e-4
    assert host.queue_db.is_file()


def test_duplicate_names_and_existing_files_are_refused_and_nothing_is_stored(host, dataset):
    q = JobQueue(host)
    q.add(job_settings(dataset, "same"))
    with pytest.raises(DuplicateJob, match=r"save_lora_name: job #1 \(pending\) already writes 'Same'"):
        q.add(job_settings(dataset, "Same"))
    host.lora_dir.mkdir(parents=True)
    (host.lora_dir / "taken.safetensors").write_bytes(b"keep")
    with pytest.raises(UserError, match="already exists"):
        q.add(job_settings(dataset, "taken"))
    q.add(job_settings(dataset, "taken", save_overwrite=True))      # allowed with overwrite
    with pytest.raises(UserError, match="lora_data_directory: folder not found"):
        q.add(job_settings(dataset.parent / "nope", "other"))
    assert states(q) == [("same", "pending"), ("taken", "pending")]
    assert (host.lora_dir / "taken.safetensors").read_bytes() == b"keep"


def test_reorder_front_and_delete(host, dataset):
    q = JobQueue(host)
    ids = [q.add(job_settings(dataset, n)).id for n in "abc"]
    q.move(ids[2], -1)
    assert [j.name for j in q.list()] == ["a", "c", "b"]
    q.move(ids[0], +5)                           # clamped at the end
    assert [j.name for j in q.list()] == ["c", "b", "a"]
    q.add(job_settings(dataset, "urgent"), front=True)
    assert [j.name for j in q.list()] == ["urgent", "c", "b", "a"]
    q.delete(ids[1])
    assert [j.name for j in q.list()] == ["urgent", "c", "a"]
    with pytest.raises(JobNotFound):
        q.delete(ids[1])


def test_image_inputs_are_copied_and_edit_back_returns_the_job_to_the_form(host, tmp_path):
    uploads = tmp_path / "browser-tmp"
    uploads.mkdir()
    a, b = toy.make_pair("circle", "red", "white", 32, 32, 8, 14, image_size=64)
    a.save(uploads / "before.png")
    b.save(uploads / "after.png")
    s = Settings.from_dict({"mode": "ADDifT", "original_image": str(uploads / "before.png"),
                            "target_image": str(uploads / "after.png"), "save_lora_name": "slider"})
    q = JobQueue(host)
    job = q.add(s)
    for key in ("original_image", "target_image"):
        copy = Path(job.settings[key])
        assert copy.parent == host.root / "jobs" / str(job.id) and copy.is_file()
    for f in uploads.iterdir():                  # the browser's temp files go away
        f.unlink()
    back = q.edit_back(job.id)
    assert q.list() == [] and back.mode == "ADDifT" and back.save_lora_name == "slider"
    assert Path(back.original_image).is_file()   # the form still has the images
    again = q.add(back)                          # Add to Queue puts it back, with its own copies
    assert Path(again.settings["target_image"]).parent.name == str(again.id)
    q.delete(again.id)
    assert not (host.root / "jobs" / str(again.id)).exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_running_jobs_of_a_dead_process_become_interrupted_and_can_be_requeued(host, dataset):
    q = JobQueue(host)
    crashed = q.add(job_settings(dataset, "crashed"))
    q.add(job_settings(dataset, "waiting"))
    with sqlite3.connect(host.queue_db) as db:   # what a killed server leaves behind
        db.execute("UPDATE jobs SET state='running', owner=?, started=? WHERE id=?",
                   (_dead_pid(), time.time(), crashed.id))
    assert JobQueue(host).get(crashed.id).state == "running"   # opening (CLI) changes nothing
    after = JobQueue(host).start()
    try:
        assert states(after) == [("waiting", "pending"), ("crashed", "interrupted")]
        assert "interrupted" in after.get(crashed.id).message
        assert after.paused                      # a restart never starts training unasked
        time.sleep(1.5)
        assert after.get(crashed.id).state == "interrupted"
        with pytest.raises(UserError, match="already pending"):
            after.requeue(after.list()[0].id)
        after.requeue(crashed.id)
        assert states(after) == [("waiting", "pending"), ("crashed", "pending")]
    finally:
        after.close()


def test_worker_runs_jobs_records_failures_and_goes_on(host, dataset, tmp_path):
    doomed_dir = tmp_path / "doomed"
    toy.make_dataset(doomed_dir, 2, seed=2, image_size=64)
    q = JobQueue(host)
    q.add(job_settings(doomed_dir, "doomed"))
    q.add(job_settings(dataset, "good", train_iterations=4))
    for f in doomed_dir.iterdir():               # the folder empties after the job was queued
        f.unlink()
    q.start().resume()                           # jobs queued before the start wait for a resume
    try:
        wait_for(lambda: q.get(2).state in ("done", "failed"), what="the second job")
    finally:
        q.close()
    doomed, good = q.get(1), q.get(2)
    assert doomed.state == "failed" and "\n" not in doomed.message and "image" in doomed.message.lower()
    assert good.state == "done", good.message
    assert (host.lora_dir / "good.safetensors").is_file()
    assert Path(good.result["csv"]).is_file() and good.result["saved"] == [str(host.lora_dir / "good.safetensors")]
    p = q.progress.snapshot()
    assert (p.job_id, p.step, p.total, p.phase) == (2, 4, 4, "done") and p.loss is not None and p.it_per_s > 0


def test_stop_current_goes_on_stop_all_pauses(host, dataset):
    q = JobQueue(host)
    first = q.add(job_settings(dataset, "long1", train_iterations=100000))
    second = q.add(job_settings(dataset, "long2", train_iterations=100000))
    third = q.add(job_settings(dataset, "after", train_iterations=2))
    q.start().resume()
    try:
        wait_for(lambda: q.progress.snapshot().step >= 2 and q.running_job_id == first.id, what="steps of job 1")
        assert q.stop() == first.id
        wait_for(lambda: q.running_job_id == second.id and q.progress.snapshot().step >= 1, what="job 2 running")
        assert q.get(first.id).state == "stopped"
        assert q.stop_all(save=True) == second.id
        wait_for(lambda: q.get(second.id).state == "stopped", what="job 2 stopped")
        time.sleep(1.5)
        assert q.paused and q.get(third.id).state == "pending"
        assert (host.lora_dir / "long2.safetensors").is_file()      # Stop & Save wrote it
        assert not (host.lora_dir / "long1.safetensors").exists()   # plain Stop discards
        q.resume()
        wait_for(lambda: q.get(third.id).state == "done", what="job 3 after resume")
    finally:
        q.close()


def test_a_stopped_job_resumes_from_its_saved_training_state(host, dataset):
    """Resume (not Re-queue): the job continues from the state its run saved instead of starting over."""
    q = JobQueue(host)
    plain = q.add(job_settings(dataset, "plain", train_iterations=2))
    job = q.add(job_settings(dataset, "resumable", train_iterations=40, save_state=True, save_overwrite=True))
    q.start().resume()
    try:
        wait_for(lambda: q.running_job_id == job.id and q.progress.snapshot().step >= 5, what="steps of the job")
        q.stop_all()
        wait_for(lambda: q.get(job.id).state == "stopped", what="the job stopped")
        stopped_at, first_csv = q.progress.snapshot().step, q.get(job.id).result["csv"]
        with pytest.raises(UserError, match="saved no training state"):
            q.requeue(plain.id, resume=True)
        state = host.logs_dir / "states" / "resumable.state.pt"
        assert q.requeue(job.id, resume=True).settings["train_resume_state"] == str(state)
        q.resume()
        wait_for(lambda: q.get(job.id).state in ("done", "failed"), what="the resumed job")
        done = q.get(job.id)
        assert done.state == "done", done.message
        rows = Path(done.result["csv"]).read_text().splitlines()[1:]
        assert stopped_at >= 5 and done.result["csv"] == first_csv      # the run's one CSV goes on
        assert [int(r.split(",")[0]) for r in rows] == list(range(1, 41))
        assert q.requeue(job.id).settings["train_resume_state"] == ""      # Re-queue starts over
    finally:
        q.close()


def test_adaptive_optimizer_warning_shows_in_the_queue_and_when_the_job_starts(tmp_path, monkeypatch):
    """Prodigy at lr 1e-4: the queued job carries the warning (Queue tab, API, ``queue list``) and the run
    announces it before any model work."""
    import importlib.util
    from trainer.events import EventBus
    from trainer.runner import run_job
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",     # as if prodigyopt were installed
                        lambda name, *a, **kw: object() if name == "prodigyopt" else real(name, *a, **kw))
    s = Settings({"mode": "iLECO", "original_prompt": "red", "train_optimizer": "Prodigy", "save_lora_name": "p"})
    want = "warning: train_learning_rate: 0.0001 is too low for Prodigy"
    job = JobQueue(Host(root=tmp_path, lora_dir=tmp_path / "loras")).add(s)
    assert job.message.startswith(want) and "\n" not in job.message

    seen = []

    def stop_at_the_model(*args, **kwargs):
        raise UserError("model reached")
    monkeypatch.setattr("trainer.models.loader.load_model", stop_at_the_model)
    monkeypatch.setattr("trainer.models.loader.random_tiny_bundle", stop_at_the_model)
    with pytest.raises(UserError, match="model reached"):
        run_job(s, lora_dir=tmp_path, events=EventBus([seen.append]), log_dir=tmp_path, json_dir=tmp_path)
    assert [e.message for e in seen if getattr(e, "kind", "") == "message"][0].startswith(want)
