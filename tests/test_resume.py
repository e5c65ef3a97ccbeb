"""Resuming from a saved training state: the run's own seed, one loss CSV, one-line errors (CLI, app, engine)."""
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app_server import ROOT, AppServer, make_root, tiny_job
from trainer.engine import StopRequest
from trainer.errors import UserError
from trainer.events import EventBus, StepEvent
from trainer.models.loader import random_tiny_bundle
from trainer.networks import load_lora
from trainer.runner import run_job
from trainer.settings import Settings
from trainer.world import toy

BASE = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_iterations=6,
            train_batch_size=2, network_rank=4, network_alpha=4, train_seed=3, train_learning_rate=1e-3,
            train_lr_scheduler="constant", save_state=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 4, seed=1, image_size=64)
    return folder


def settings(dataset, **kw):
    return Settings.from_dict({**BASE, "lora_data_directory": str(dataset), **kw})


def _job(folder, s, stop_at=None, **kw):
    """Run ``s`` on a fresh random tiny model in ``folder``; ``stop_at``: Stop after that step. (result, steps)."""
    stop, steps = StopRequest(), []

    def sink(e):
        if isinstance(e, StepEvent):
            steps.append(e.step)
            if e.step == stop_at:
                stop.request("stop")

    result = run_job(s, lora_dir=folder / "out", bundle=random_tiny_bundle(seed=0, device="cpu"),
                     events=EventBus([sink]), stop=stop, log_dir=folder / "logs", json_dir=folder / "json", **kw)
    return result, steps


def _state(folder, name):
    return folder / "logs" / "states" / f"{name}.state.pt"


def _same_lora(a, b):
    ta, tb = load_lora(a)[0], load_lora(b)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ----------------------------------------------------------------------------- item: the seed of a -1 run
def test_a_random_seed_run_resumes_with_its_own_seed(tmp_path, dataset):
    s = settings(dataset, train_seed=-1, save_lora_name="rnd")
    part, _ = _job(tmp_path / "b", s, stop_at=3)
    assert part.status == "stopped"
    seed = int(torch.load(_state(tmp_path / "b", "rnd"), weights_only=True)["seed"])
    resumed, steps = _job(tmp_path / "b", s.with_overrides(train_resume_state=str(_state(tmp_path / "b", "rnd"))))
    assert resumed.status == "done" and steps == [4, 5, 6]
    full, _ = _job(tmp_path / "a", s.with_overrides(train_seed=seed))
    assert load_lora(resumed.saved[0])[1]["ss_seed"] == str(seed)
    assert _same_lora(full.saved[0], resumed.saved[0])


def test_a_state_from_other_settings_is_a_one_line_error(tmp_path, dataset):
    s = settings(dataset, save_lora_name="other")
    _job(tmp_path, s, stop_at=2)
    for change in ({"train_batch_size": 1}, {"network_rank": 8}):
        with pytest.raises(UserError, match="train_resume_state: .* other settings") as err:
            _job(tmp_path, s.with_overrides(train_resume_state=str(_state(tmp_path, "other")), **change))
        assert "\n" not in str(err.value)


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_resumes_a_random_seed_state(tmp_path, dataset):
    job = tmp_path / "job.json"
    job.write_text(json.dumps(tiny_job(dataset, "cli-rnd", steps=300, train_seed=-1, save_state=True,
                                       save_overwrite=True)))
    first = _cli("train", job, "--lora-dir", tmp_path / "out")
    for line in first.stderr:                  # Ctrl-C after the first step: Stop & Save writes the state
        if " 1/300 " in line:
            first.send_signal(signal.SIGINT)
            break
    first.communicate(timeout=300)
    assert first.returncode == 3, "the first run should stop on Ctrl-C"
    state = ROOT / "logs" / "states" / "cli-rnd.state.pt"
    assert state.is_file()
    try:
        seed = int(torch.load(state, weights_only=True)["seed"])
        resumed = _cli("train", job, "--lora-dir", tmp_path / "out", "--set", f"train_resume_state={state}")
        out, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err[-2000:]
        meta = load_lora(tmp_path / "out" / "cli-rnd.safetensors")[1]
        assert meta["ss_seed"] == str(seed) and meta["ss_steps"] == "300"

        wrong = _cli("train", job, "--lora-dir", tmp_path / "out", "--set", f"train_resume_state={state}",
                     "--set", "network_rank=8")
        out, err = wrong.communicate(timeout=300)
        assert wrong.returncode == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: train_resume_state:")
    finally:   # the CLI writes its logs into the checkout
        for leftover in [state, *(ROOT / "logs").glob("*/cli-rnd-*.csv")]:
            leftover.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- item: one run, one loss CSV
def _csv_steps(path):
    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _states_at(folder, name, steps):
    """A sink copying the state file each time it is saved after one of ``steps`` (what a crash would leave)."""
    last = {"step": 0}

    def sink(e):
        if isinstance(e, StepEvent):
            last["step"] = e.step
        elif getattr(e, "path", None) and e.path.endswith(".state.pt") and last["step"] in steps:
            copy = folder / f"{name}-at{last['step']}-{e.data.get('phase', '') if e.data else ''}.pt"
            copy.write_bytes(Path(e.path).read_bytes())
    return sink


def test_a_resumed_run_continues_its_loss_csv(tmp_path, dataset):
    """Killed after step 5 with the last state from step 4: the CSV goes on from step 4, in the same file."""
    s = settings(dataset, save_every_n_steps=2, save_lora_name="series", save_overwrite=True)
    (tmp_path / "copies").mkdir()
    first = run_job(s, lora_dir=tmp_path / "out", bundle=random_tiny_bundle(seed=0, device="cpu"),
                    events=EventBus([_states_at(tmp_path / "copies", "series", {4})]),
                    log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    keep_5 = first.csv.read_text().splitlines(keepends=True)[:6]          # header + steps 1-5, as at the crash
    first.csv.write_text("".join(keep_5) + "5,0.1")                          # and half a row being written
    state = next((tmp_path / "copies").glob("series-at4*"))
    resumed, steps = _job(tmp_path, s.with_overrides(train_resume_state=str(state)))
    assert steps == [5, 6] and resumed.csv == first.csv
    assert _csv_steps(resumed.csv) == [1, 2, 3, 4, 5, 6]
    assert list((tmp_path / "logs").glob("*/*.csv")) == [first.csv]
    from trainer.app.plot import list_runs
    assert list_runs(tmp_path / "logs")[0] == first.csv                     # the Plot tab's "latest run"
    assert _same_lora(first.saved[-1], resumed.saved[-1])


def test_a_stopped_and_resumed_run_keeps_one_csv_and_new_runs_get_their_own(tmp_path, dataset):
    s = settings(dataset, save_lora_name="twice")
    part, _ = _job(tmp_path, s, stop_at=3)
    resumed, _ = _job(tmp_path, s.with_overrides(train_resume_state=str(_state(tmp_path, "twice"))))
    assert resumed.csv == part.csv and _csv_steps(resumed.csv) == [1, 2, 3, 4, 5, 6]
    again, _ = _job(tmp_path, s.with_overrides(save_overwrite=True))           # a new run: a CSV of its own
    assert again.csv != part.csv and _csv_steps(again.csv) == [1, 2, 3, 4, 5, 6]


def test_a_difference_run_resumed_in_pass_2_logs_each_step_once(tmp_path):
    a, b = toy.make_pair("circle", "red", "white", 32, 32, 8, 20)
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    s = Settings.from_dict({**BASE, "mode": "Difference", "original_image": str(tmp_path / "a.png"),
                            "target_image": str(tmp_path / "b.png"), "train_iterations": 4,
                            "save_lora_name": "diff", "save_overwrite": True})
    part, _ = _job(tmp_path, s)
    full_rows = _csv_steps(part.csv)
    assert full_rows == [1, 2, 3, 4, 1, 2, 3, 4]                            # pass 1, then pass 2
    stop = StopRequest()

    def stop_in_pass_2(e):
        if isinstance(e, StepEvent) and e.phase == "pass 2" and e.step == 2:
            stop.request("stop")

    run_job(s, lora_dir=tmp_path / "b" / "out", bundle=random_tiny_bundle(seed=0, device="cpu"),
            events=EventBus([stop_in_pass_2]), stop=stop, log_dir=tmp_path / "b" / "logs",
            json_dir=tmp_path / "b" / "json")
    state = tmp_path / "b" / "logs" / "states" / "diff-pass2.state.pt"
    resumed, _ = _job(tmp_path / "b", s.with_overrides(train_resume_state=str(state)))
    assert _csv_steps(resumed.csv) == full_rows
    assert len(list((tmp_path / "b" / "logs").glob("*/*.csv"))) == 1
    assert _same_lora(part.saved[-1], resumed.saved[-1])


@pytest.fixture
def one_thread(monkeypatch):
    """Bit-equal LoRAs need one CPU thread: with two, the backward's reductions vary from run to run (~1e-7)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")          # for the app subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_app_killed_during_a_random_seed_job_resumes_to_the_uninterrupted_lora(tmp_path, dataset, one_thread):
    root = make_root(tmp_path / "ext")
    name, steps = "kill-rnd", 200
    state = root / "logs" / "states" / f"{name}.state.pt"
    srv = AppServer(root).start()
    try:
        _, job = srv.request("POST", "/jobs", tiny_job(dataset, name, steps=steps, train_seed=-1, save_state=True,
                                                       save_every_n_steps=10))
        srv.wait(lambda: state.is_file() and srv.request("GET", "/status")[1]["progress"]["step"] >= 13,
                 what="a saved state and steps after it")
        srv.kill()                                           # SIGKILL: no cleanup, like a crash
        srv = AppServer(root).start()
        assert srv.request("GET", f"/jobs/{job['id']}")[1]["state"] == "interrupted"
        status, body = srv.request("POST", f"/jobs/{job['id']}/requeue", query="?resume=true")
        assert status == 200 and body["state"] == "pending", body
        done = srv.wait(lambda: (j := srv.request("GET", f"/jobs/{job['id']}")[1])["state"] in ("done", "failed")
                        and j, what="the resumed job")
        assert done["state"] == "done", done["message"]
    finally:
        srv.stop()
    resumed = root / "output" / f"{name}.safetensors"
    seed = int(load_lora(resumed)[1]["ss_seed"])
    assert seed == int(torch.load(state, weights_only=True)["seed"])
    full = run_job(Settings.from_dict(tiny_job(dataset, name, steps=steps, train_seed=seed)),
                   lora_dir=tmp_path / "full", log_dir=tmp_path / "logs", json_dir=tmp_path / "json",
                   events=EventBus())
    assert _same_lora(full.saved[0], resumed)
