"""``log_with tensorboard`` (issue 16 "Must show 8"): event files beside the CSV, read back with tensorboard's
own reader, with kohya's tags and the right step counts; without the package, one line before any model work."""
import importlib.util

import pytest

from trainer.engine import StopRequest
from trainer.errors import UserError
from trainer.events import EventBus
from trainer.models.loader import random_tiny_bundle
from trainer.runner import run_job
from trainer.settings import Settings
from trainer.world import toy

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard is a test requirement (requirements-test.txt)")

BASE = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_iterations=4,
            train_batch_size=2, network_rank=4, network_alpha=4, train_seed=3, train_learning_rate=1e-3,
            train_lr_scheduler="constant", log_with="tensorboard")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 6, seed=1, image_size=64)
    return folder


def _run(folder, s, stop=None):
    return run_job(s, lora_dir=folder / "out", bundle=random_tiny_bundle(seed=0, device="cpu"), events=EventBus(),
                   stop=stop, log_dir=folder / "logs", json_dir=folder / "json")


def _read(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def test_event_files_hold_loss_validation_lr_and_samples(tmp_path, dataset):
    s = Settings.from_dict({**BASE, "lora_data_directory": str(dataset), "validation_split": 0.34,
                            "validate_every_n_steps": 2, "sample_every_n_steps": 4,
                            "sample_prompts": ["a red circle", "a blue square"], "network_blocks": "BASE,IN01,OUT08",
                            "train_textencoder_learning_rate": 5e-4, "save_lora_name": "tb"})
    result = _run(tmp_path, s)
    folder = result.csv.with_suffix("") / "tensorboard"          # logs/DATE/NAME-TIME/tensorboard
    assert folder.is_dir() and list(folder.glob("events.out.tfevents.*"))
    acc = _read(folder)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/validation"}
    for tag in ("loss/current", "loss/average", "lr/unet", "lr/textencoder"):
        assert _steps(acc, tag) == [1, 2, 3, 4], tag
    assert _steps(acc, "loss/validation") == [2, 4]
    from trainer.app.plot import read_loss_csv
    series = read_loss_csv(result.csv)
    assert [e.value for e in acc.Scalars("loss/current")] == pytest.approx(series.loss, rel=1e-5)
    assert [e.value for e in acc.Scalars("loss/validation")] == pytest.approx(series.val_loss, rel=1e-5)
    assert [e.value for e in acc.Scalars("lr/unet")] == pytest.approx([1e-3] * 4)
    assert [e.value for e in acc.Scalars("lr/textencoder")] == pytest.approx([5e-4] * 4)
    assert sorted(tags["images"]) == ["samples/prompt_0", "samples/prompt_1"]
    for tag in tags["images"]:
        images = acc.Images(tag)
        assert [e.step for e in images] == [4]
        assert (images[0].width, images[0].height) == (64, 64)


def test_a_resumed_run_continues_its_event_files_without_duplicates(tmp_path, dataset):
    s = Settings.from_dict({**BASE, "lora_data_directory": str(dataset), "save_lora_name": "tbr",
                            "save_state": True})
    stop = StopRequest()
    from trainer.events import StepEvent

    bus = EventBus([lambda e: stop.request("stop") if isinstance(e, StepEvent) and e.step == 2 else None])
    part = run_job(s, lora_dir=tmp_path / "out", bundle=random_tiny_bundle(seed=0, device="cpu"), events=bus,
                   stop=stop, log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    assert part.status == "stopped"
    state = tmp_path / "logs" / "states" / "tbr.state.pt"
    resumed = _run(tmp_path, s.with_overrides(train_resume_state=str(state)))
    assert resumed.csv == part.csv
    acc = _read(resumed.csv.with_suffix("") / "tensorboard")
    assert _steps(acc, "loss/current") == [1, 2, 3, 4]


def test_without_the_package_it_is_one_line_before_the_model_loads(tmp_path, dataset, monkeypatch):
    import trainer.runner as runner
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    monkeypatch.setattr(runner, "load_bundle", lambda *a, **k: pytest.fail("the model was loaded"))
    s = Settings.from_dict({**BASE, "lora_data_directory": str(dataset)})     # the settings still load
    with pytest.raises(UserError) as err:
        run_job(s, lora_dir=tmp_path / "out", log_dir=tmp_path / "logs")
    assert str(err.value) == ("log_with: tensorboard is not installed; install it with `pip install tensorboard` "
                              "(or set log_with to none)")
    assert not (tmp_path / "logs").exists()
    with pytest.raises(UserError, match="log_with: 'wandb' is not supported; Weights & Biases"):
        Settings.from_dict({**BASE, "log_with": "wandb"})
