"""Validation loss (SPEC §16, issue 16 "Must show 2"): held-out images, fixed noise and timesteps, the loss
printed, in the CSV, the plot, the progress and the metadata; it falls while the LoRA learns, repeats exactly
with the same seed, and leaves training (and resuming) bit-identical."""
import csv
import io
from pathlib import Path

import pytest
import torch

from trainer.app.jobs import Progress, ProgressTracker
from trainer.app.plot import figure, legend_labels, read_loss_csv, series_dict
from trainer.app.views import progress_html
from trainer.data.holdout import held_out_rels, holdout_count, split
from trainer.demo import demo_settings
from trainer.engine import StopRequest
from trainer.errors import UserError
from trainer.events import ConsoleProgress, CsvLogger, EventBus, RunEvent, StepEvent
from trainer.models.loader import DEFAULT_MODEL, random_tiny_bundle
from trainer.networks import load_lora
from trainer.runner import run_job
from trainer.settings import BLOCKS_SD, Settings
from trainer.validation import fixed_timesteps
from trainer.world import toy

BASE = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_iterations=6,
            train_batch_size=2, network_rank=4, network_alpha=4, train_seed=3, train_learning_rate=1e-3,
            train_lr_scheduler="constant")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 6, seed=1, image_size=64)
    return folder


def _settings(dataset, **kw):
    return Settings.from_dict({**BASE, "lora_data_directory": str(dataset), **kw})


class Recorder:
    def __init__(self, stop_at=None):
        self.steps, self.messages, self.stop, self.stop_at = [], [], StopRequest(), stop_at

    def __call__(self, e):
        if isinstance(e, StepEvent):
            self.steps.append(e)
            if e.step == self.stop_at:
                self.stop.request("stop")
        elif isinstance(e, RunEvent):
            self.messages.append((e.kind, e.message, e.data))


def _job(folder, s, stop_at=None, console=None):
    rec = Recorder(stop_at)
    sinks = [rec] + ([console] if console else [])
    result = run_job(s, lora_dir=folder / "out", bundle=random_tiny_bundle(seed=0, device="cpu"),
                     events=EventBus(sinks), stop=rec.stop, log_dir=folder / "logs", json_dir=folder / "json")
    return result, rec


# ----------------------------------------------------------------------------- the split (model-free)
def test_split_is_a_function_of_seed_and_paths_and_never_trains_a_held_out_image(dataset):
    rels = [f"img_{i:02d}.png" for i in range(20)]
    held = held_out_rels(rels, 0.25, seed=7)
    assert len(held) == holdout_count(20, 0.25) == 5
    assert held == held_out_rels(list(reversed(rels)), 0.25, seed=7)        # listing order does not matter
    assert held != held_out_rels(rels, 0.25, seed=8)                         # the seed does
    assert holdout_count(3, 0.01) == 1                                       # on = at least one image

    s = _settings(dataset, validation_split=0.34, image_mirroring=True)
    from trainer.modes.lora import prepare
    ds = prepare(s)
    train, val = split(ds, ds.holdout, seed=3)
    held_rels = {p.record.rel for p in val}
    assert len(held_rels) == len(val) == 2 and all(not p.flip for p in val)
    assert not held_rels & {p.record.rel for p in train}                      # mirrors included
    assert {p.record.rel for p in train} | held_rels == {r.rel for r in ds.records}


def test_bad_validation_settings_are_one_line_before_any_model_work(dataset, tmp_path, monkeypatch):
    import trainer.runner as runner

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(runner, "load_bundle", no_model)
    cases = [({"validation_split": 0.99}, "validation_split: 0.99 of 6 image"),
             ({"validation_split": 0.1, "validation_directory": str(dataset)}, "validation_split: set "),
             ({"validate_every_n_steps": 5}, "validate_every_n_steps: there are no validation images"),
             ({"validation_directory": str(tmp_path / "nope")}, "validation_directory: folder not found"),
             ({"validation_directory": str(tmp_path)}, "validation_directory: no usable training images")]
    for kw, expected in cases:
        with pytest.raises(UserError) as err:
            run_job(_settings(dataset, **kw), lora_dir=tmp_path / "out", log_dir=tmp_path / "logs")
        assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(UserError, match="validation_split: 1.0 holds out every image"):
        _settings(dataset, validation_split=1)


def test_fixed_timesteps_are_kohyas_inside_the_trained_range():
    assert fixed_timesteps(0, 1000) == [10, 350, 500, 650, 990]
    assert fixed_timesteps(200, 600) == [200, 350, 500, 599]


# ----------------------------------------------------------------------------- CSV, plot, progress
def test_csv_column_plot_series_and_progress(tmp_path):
    path = tmp_path / "run.csv"
    log = CsvLogger(path, with_te_lr=False, with_val=True)
    for step in range(1, 7):
        log(StepEvent(step, 6, 1.0 / step, 0.5, 1e-3, None, 1.0, 0.0, step, 10.0,
                      val_loss=0.4 - step * 0.01 if step % 3 == 0 else None))
    log.close()
    rows = list(csv.reader(io.StringIO(path.read_text())))
    assert rows[0] == ["step", "loss", "loss_ema", "lr", "elapsed_s", "val_loss"]
    assert [r[-1] for r in rows[1:]] == ["", "", "0.37", "", "", "0.34"]
    series = read_loss_csv(path)
    assert series.steps == [1, 2, 3, 4, 5, 6] and series.val_steps == [3, 6] and series.val_loss == [0.37, 0.34]
    assert series_dict(series)["val_loss"] == [0.37, 0.34]
    assert legend_labels(figure([series])) == ["run", "run validation"]
    # an old CSV (no val_loss column) and TrainTrain's still read, with no validation series
    old = tmp_path / "old.csv"
    old.write_text("step,loss,loss_ema,lr,elapsed_s\n1,0.5,0.5,0.001,0.1\n")
    assert read_loss_csv(old).val_steps == [] and legend_labels(figure([read_loss_csv(old)])) == ["old"]
    tt = tmp_path / "tt.csv"
    tt.write_text("Model,x\nStep,Loss,Learning Rate 1\n1,0.5,0.001\n2,0.4,0.001\n")
    assert read_loss_csv(tt).loss == [0.5, 0.4] and read_loss_csv(tt).val_steps == []

    tracker = ProgressTracker(tmp_path)
    tracker(StepEvent(3, 6, 0.3, 0.3, 1e-3, None, 1.0, 0.0, 3, 10.0, val_loss=0.37))
    tracker(StepEvent(4, 6, 0.3, 0.3, 1e-3, None, 1.0, 0.0, 4, 10.0))
    p = tracker.snapshot()
    assert (p.val_loss, p.val_step) == (0.37, 3)                 # the latest measurement stays shown
    html = progress_html(Progress(**{**p.__dict__, "job_id": 1}))
    assert 'data-val-step="3"' in html and "validation 0.3700" in html


# ----------------------------------------------------------------------------- a run (random tiny model)
def test_a_run_prints_writes_and_stores_the_validation_loss(tmp_path, dataset):
    stream = io.StringIO()
    s = _settings(dataset, validation_split=0.34, validate_every_n_steps=2, save_lora_name="v")
    result, rec = _job(tmp_path, s, console=ConsoleProgress(stream))
    vals = {e.step: e.val_loss for e in rec.steps if e.val_loss is not None}
    assert sorted(vals) == [2, 4, 6]
    again, _ = _job(tmp_path / "again", s)                   # same seed: the very same curve (from the CSVs)
    assert read_loss_csv(again.csv).val_loss == read_loss_csv(result.csv).val_loss
    assert len(set(vals.values())) == 3                      # and it moves with the LoRA
    printed = [m for k, m, _ in rec.messages if k == "validation"]
    assert printed == [f"step {k}: validation loss {v:.4f}" for k, v in vals.items()]
    assert all(line in stream.getvalue() for line in printed)
    series = read_loss_csv(result.csv)
    assert series.val_steps == [2, 4, 6] and series.val_loss == pytest.approx(list(vals.values()), rel=1e-5)
    meta = load_lora(result.saved[0])[1]
    assert (meta["ss_validation_split"], meta["ss_validation_seed"], meta["ss_num_validation_images"],
            meta["ss_validate_every_n_steps"], meta["ss_num_train_images"]) == ("0.34", "3", "2", "2", "4")


def test_validation_leaves_training_and_resume_bit_identical(tmp_path, dataset):
    """A run with validation, stopped at step 3 and resumed, ends with the very LoRA of a run without validation;
    its CSV is one series with every validation row."""
    plain, _ = _job(tmp_path / "a", _settings(dataset, save_lora_name="r", save_state=True))
    s = _settings(dataset, validation_directory=str(dataset), validate_every_n_steps=2, save_lora_name="r",
                  save_state=True)
    part, rec_part = _job(tmp_path / "c", s, stop_at=3)
    state = tmp_path / "c" / "logs" / "states" / "r.state.pt"
    resumed, rec_res = _job(tmp_path / "c", s.with_overrides(train_resume_state=str(state)))
    assert part.status == "stopped" and resumed.status == "done"
    a, c = (load_lora(r.saved[-1])[0] for r in (plain, resumed))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    vals = [(e.step, e.val_loss) for r in (rec_part, rec_res) for e in r.steps if e.val_loss is not None]
    assert [k for k, _ in vals] == [2, 4, 6]
    series = read_loss_csv(resumed.csv)
    assert series.steps == [1, 2, 3, 4, 5, 6] and series.val_steps == [2, 4, 6]
    assert series.val_loss == pytest.approx([v for _, v in vals], rel=1e-5)


# ----------------------------------------------------------------------------- the embedded model learns
pytest_tiny = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"embedded model not built: {DEFAULT_MODEL}")


@pytest_tiny
def test_validation_loss_falls_while_a_lora_learns(tmp_path):
    """Held-out orange circles captioned "zq": the base model cannot draw them from "zq", the LoRA learns to,
    and the loss on images it never saw falls at every measurement (the training loss only wanders)."""
    toy.make_dataset(tmp_path / "data", 16, seed=0, caption="zq", shape="circle", color="orange")
    s = demo_settings(tmp_path / "data", 30, "zq", seed=0).with_overrides(
        validation_split=0.25, validate_every_n_steps=10, train_lr_scheduler="constant",
        network_blocks=[b for b in BLOCKS_SD if b != "BASE"])
    stream = io.StringIO()
    result = run_job(s, lora_dir=tmp_path / "out", log_dir=tmp_path / "logs", events=EventBus([ConsoleProgress(stream)]))
    series = read_loss_csv(result.csv)
    print(f"\nvalidation loss by step: {list(zip(series.val_steps, series.val_loss))}")
    assert series.val_steps == [10, 20, 30]
    for step, value in zip(series.val_steps, series.val_loss):
        assert f"step {step}: validation loss {value:.4f}" in stream.getvalue()          # printed
    values = series.val_loss
    assert all(b < a for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.97 * values[0], values
    assert legend_labels(figure([series]))[-1] == f"{series.name} validation"           # plotted
