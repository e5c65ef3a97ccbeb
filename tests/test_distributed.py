"""Data-parallel training under torchrun (SPEC §14): 2 CPU processes on gloo, the embedded tiny model.

Every run here is a real ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer train``
(what a user types); faults on one rank come from the test-only ``SHINKANSEN_TEST_FAULT`` (trainer/dist.py).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app_server import ROOT, AppServer, make_root, tiny_job
from trainer.networks import load_lora
from trainer.world import toy

# LoRA over every block (incl. the text encoder, trained per step) so a wrong shard or weight shows everywhere.
COMMON = dict(train_iterations=3, train_batch_size=1, network_rank=4, network_alpha=4, train_seed=5,
              train_optimizer="SGD", train_learning_rate=1.0, train_lr_scheduler="constant", save_precision="fp32",
              save_overwrite=True)
BASE = dict(mode="LoRA", image_size=64, image_buckets_step=64, image_min_length=64, **COMMON)
ILECO = dict(mode="iLECO", original_prompt="a red circle", target_prompt="a blue circle", image_size=64,
             train_min_timesteps=500, **COMMON)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 4, seed=1, image_size=64)
    return folder


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", **extra}


def _train(tmp, job: dict, n: int, *args, env=None, timeout=240, popen=False):
    """``train`` of ``job`` on ``n`` processes (n == 1: the plain CLI, no torchrun)."""
    path = tmp / f"{job['save_lora_name']}.json"
    path.write_text(json.dumps(job))
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 \
        else [sys.executable]
    cmd = [*head, "-m", "trainer", "train", str(path), "--lora-dir", str(tmp / "out"), "--log-dir",
           str(tmp / "logs"), "--json-dir", str(tmp / "json"), *map(str, args)]
    if popen:   # output to a file: nothing blocks on a full pipe
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(**(env or {})), stdout=open(tmp / "out.log", "w"),
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=_env(**(env or {})), capture_output=True, text=True, timeout=timeout)


def _lora(tmp, name):
    tensors, meta = load_lora(tmp / "out" / f"{name}.safetensors")[:2]
    return tensors, meta


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _error(proc_output: str) -> str:
    # Every rank prints the agreed message, and torchrun merges the workers' streams: two ranks' lines can land
    # on one line ("…rank 1error: rank 1…"), so split there (a known cosmetic defect: only rank 0 should print).
    lines = [ln for ln in proc_output.replace("error: ", "\nerror: ").splitlines() if ln.startswith("error: ")]
    return lines[0] if lines else proc_output[-3000:]


# ----------------------------------------------------------------------------- must show 1: 2 × b == 1 × 2b
@pytest.mark.parametrize("job", [BASE, ILECO], ids=["LoRA", "iLECO"])
def test_two_ranks_of_batch_b_train_the_lora_of_one_rank_of_batch_2b(tmp_path, dataset, job):
    """Same seed, same data order: the saved fp32 LoRAs agree to 1e-6 absolute (weights ~1e-3..0.1).

    Why not bit-exact: the 2-sample batch's gradient is summed in another order (each rank reduces its own
    sample, gloo adds the halves) and the UNet runs batch 1 instead of 2 (other matmul blocking), which
    changes float32 results in the last bits (measured: 6e-8 after 3 steps). SGD, whose step is linear in
    the gradient, makes this a direct check of the all-reduced gradient; AdamW divides by sqrt(v) and turns
    last-bit noise in near-zero gradients (a lora_down while its lora_up is still ~0) into lr-sized steps
    (measured 4e-5 with lr 2e-3), a property of Adam, not of the sharding. A wrong shard, seed or gradient
    weighting changes the step itself (the LoRA moves ~5e-3 here), far beyond the tolerance.
    """
    job = {**job, "lora_data_directory": str(dataset)} if job["mode"] == "LoRA" else dict(job)
    one = _train(tmp_path, {**job, "save_lora_name": "one", "train_batch_size": 2}, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tmp_path, {**job, "save_lora_name": "two"}, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    (a, meta_a), (b, meta_b) = _lora(tmp_path, "one"), _lora(tmp_path, "two")
    moved = max(float(t.float().abs().max()) for k, t in b.items() if "lora_up" in k)
    assert moved > 1e-3, "the LoRA did not train"
    assert _max_diff(a, b) < 1e-6
    assert (meta_b["shinkansen_world_size"], meta_b["ss_batch_size_per_device"], meta_b["ss_total_batch_size"]) == \
        ("2", "1", "2")
    assert (meta_a["shinkansen_world_size"], meta_a["ss_batch_size_per_device"], meta_a["ss_total_batch_size"]) == \
        ("1", "2", "2")
    assert meta_a["ss_steps"] == meta_b["ss_steps"] == "3"
    # rank 0 alone writes: one LoRA, one CSV with one row per step
    csvs = list((tmp_path / "logs").glob("*/two-*.csv"))
    assert len(csvs) == 1 and len(csvs[0].read_text().splitlines()) == 1 + 3


# ----------------------------------------------------------------------------- must show 2: stop together
def _rank_pid(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker ``rank`` (a child of ``parent`` whose environment has RANK=rank)."""
    end = time.time() + timeout
    while time.time() < end:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
                if f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    return int(d.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


def _wait_for_rows(proc, logs: Path, rows: int, timeout: float = 120) -> None:
    """Until rank 0's loss CSV has ``rows`` steps (it is flushed per step)."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        csvs = list(logs.glob("*/*.csv"))
        if csvs and len(csvs[0].read_text().splitlines()) > rows:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {rows} (exit {proc.poll()})")


def test_stop_on_one_rank_stops_every_rank_with_the_weights_saved(tmp_path, dataset):
    """Ctrl-C (Stop & Save) delivered to rank 1 only: both ranks leave at the same step within seconds,
    rank 0 saves the LoRA and the training state (with both ranks' generators)."""
    job = {**BASE, "lora_data_directory": str(dataset), "save_lora_name": "stopped", "train_iterations": 400,
           "save_state": True}
    proc = _train(tmp_path, job, 2, popen=True)
    workers = []
    try:
        workers = [_rank_pid(proc.pid, r) for r in (0, 1)]
        rank1 = workers[1]
        _wait_for_rows(proc, tmp_path / "logs", 3)
        os.kill(rank1, signal.SIGINT)
        t0 = time.time()
        proc.wait(timeout=60)
        took = time.time() - t0
        out = (tmp_path / "out.log").read_text()
    finally:   # torchrun starts its workers in sessions of their own: end each
        for pid in ([proc.pid] if proc.poll() is None else []) + workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert took < 10, f"ranks took {took:.1f}s to stop"
    assert "stopped:" in out and "Traceback" not in out.split("stopped:")[0]
    tensors, meta = _lora(tmp_path, "stopped")
    steps = int(meta["ss_steps"])
    assert 3 <= steps < 400
    state = torch.load(tmp_path / "logs" / "states" / "stopped.state.pt", weights_only=True)
    assert state["step"] == steps and state["world_size"] == 2 and len(state["rng_ranks"]) == 2


def test_nan_on_one_rank_ends_every_rank_with_the_last_good_weights(tmp_path, dataset):
    job = {**BASE, "lora_data_directory": str(dataset), "save_lora_name": "nan", "train_iterations": 6}
    t0 = time.time()
    run = _train(tmp_path, job, 2, env={"SHINKANSEN_TEST_FAULT": "nan:1:3"}, timeout=120)
    assert run.returncode != 0
    error = _error(run.stdout + run.stderr)
    assert error.startswith("error: loss became nan at step 3 on rank 1 of 2; the last good weights (step 2)"), \
        error
    assert _lora(tmp_path, "nan_nan_at_2")[1]["ss_steps"] == "2"
    assert not (tmp_path / "out" / "nan.safetensors").exists()
    assert time.time() - t0 < 90


@pytest.mark.parametrize("fault", ["error", "exit"])
def test_a_crashed_rank_fails_the_job_with_its_message_without_a_hang(tmp_path, dataset, fault):
    """``error``: an exception on rank 1 (e.g. out of memory) reaches every rank as one line naming it;
    ``exit``: rank 1 dies outright (killed), and torchrun ends the job instead of rank 0 waiting forever."""
    job = {**BASE, "lora_data_directory": str(dataset), "save_lora_name": f"crash-{fault}", "train_iterations": 40}
    t0 = time.time()
    run = _train(tmp_path, job, 2, env={"SHINKANSEN_TEST_FAULT": f"{fault}:1:2"}, timeout=120)
    assert run.returncode != 0 and time.time() - t0 < 90
    if fault == "error":
        assert _error(run.stdout + run.stderr) == \
            "error: rank 1 of 2 failed at step 2: RuntimeError: injected test fault on rank 1"
    assert not (tmp_path / "out" / f"crash-{fault}.safetensors").exists()


# ----------------------------------------------------------------------------- must show 3: resume under 2 ranks
def test_a_two_rank_run_resumed_from_its_state_equals_the_uninterrupted_one(tmp_path, dataset):
    """The interrupted run dies on rank 1 at step 3 (its state from step 2 is what is left), resumes with
    2 ranks and ends bit-identical to the run that was never interrupted; resuming with 1 process is a
    one-line error before any model work."""
    job = {**BASE, "lora_data_directory": str(dataset), "train_iterations": 4, "train_seed": 11}
    full = _train(tmp_path, {**job, "save_lora_name": "full"}, 2)
    assert full.returncode == 0, full.stderr[-3000:]
    part = {**job, "save_lora_name": "part", "save_every_n_steps": 2, "save_state": True}
    cut = _train(tmp_path, part, 2, env={"SHINKANSEN_TEST_FAULT": "error:1:3"})
    assert cut.returncode != 0 and "failed at step 3" in _error(cut.stdout + cut.stderr)
    state = tmp_path / "logs" / "states" / "part.state.pt"
    assert torch.load(state, weights_only=True)["step"] == 2
    wrong = _train(tmp_path, part, 1, "--set", f"train_resume_state={state}", timeout=120)
    assert wrong.returncode == 2 and _error(wrong.stderr) == \
        f"error: train_resume_state: {state} was saved by 2 process(es); resume it with 2 " \
        "(processes / torchrun --nproc_per_node)"
    resumed = _train(tmp_path, part, 2, "--set", f"train_resume_state={state}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _lora(tmp_path, "full")[0], _lora(tmp_path, "part")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "logs").glob("*/part-*.csv")
    assert [len(p.read_text().splitlines()) - 1 for p in rows] == [4]   # one loss CSV, continued


# ----------------------------------------------------------------------------- must show 4: the app's queue
def test_a_queued_job_with_processes_2_runs_from_the_api_with_live_progress_and_stop(tmp_path, dataset):
    """The job runs on 2 torchrun processes; /status shows its steps as they happen, and Stop & Save from
    the API ends both ranks within seconds with the weights saved, as for a single process."""
    srv = AppServer(make_root(tmp_path / "ext")).start()
    try:
        status, added = srv.request("POST", "/jobs", tiny_job(dataset, "api-dp", steps=300, processes=2))
        assert status == 201, added
        seen = []

        def job() -> dict:
            return [j for j in srv.request("GET", "/jobs")[1] if j["id"] == added["id"]][0]

        def steps() -> bool:
            p = srv.request("GET", "/status")[1]["progress"]
            if p["job_id"] == added["id"] and p["step"]:
                seen.append((p["step"], p["total"], p["loss"] is not None))
            assert job()["state"] in ("pending", "running"), job()
            return len({s for s, _, _ in seen}) >= 3

        srv.wait(steps, timeout=240, what="live steps of the 2-process job", poll=0.2)
        assert all(total == 300 and has_loss for _, total, has_loss in seen), seen
        t0 = time.time()
        assert srv.request("POST", "/stop", {"save": True})[1]["stopped"] == added["id"]
        srv.wait(lambda: job()["state"] not in ("pending", "running"), timeout=60, what="the stop")
        took, done = time.time() - t0, job()
        assert done["state"] == "stopped" and took < 15, (done, took)
        saved = done["result"]["saved"]
        assert len(saved) == 1
        meta = load_lora(saved[0])[1]
        assert meta["shinkansen_world_size"] == "2" and 3 <= int(meta["ss_steps"]) < 300
        assert done["result"]["csv"] and Path(done["result"]["csv"]).is_file()
    finally:
        srv.stop()
