"""The training engine and LoRA mode on a random tiny SD1 model (fast wiring tests)."""
import csv
import math

import pytest
import torch

from trainer.world import toy
from trainer.engine import StopRequest, TrainingError
from trainer.errors import UserError
from trainer.events import EventBus, RunEvent, StepEvent
from trainer.models.loader import random_tiny_bundle
from trainer.networks import load_lora
from trainer.runner import run_job
from trainer.settings import Settings

BASE = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_iterations=6,
            train_batch_size=2, network_rank=4, network_alpha=4, train_seed=3, train_learning_rate=1e-3,
            train_lr_scheduler="constant")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 4, seed=1, caption="zq", shape="square", color="purple")
    return folder


@pytest.fixture
def bundle():
    return random_tiny_bundle(seed=0, device="cpu")


def settings(dataset, **kw):
    return Settings.from_dict({**BASE, "lora_data_directory": str(dataset), **kw})


class Recorder:
    def __init__(self):
        self.steps, self.runs = [], []

    def __call__(self, e):
        (self.steps if isinstance(e, StepEvent) else self.runs).append(e)


def _job(tmp_path, s, bundle, **kw):
    rec = Recorder()
    result = run_job(s, lora_dir=tmp_path / "out", bundle=bundle, events=EventBus([rec]),
                     log_dir=tmp_path / "logs", json_dir=tmp_path / "json", **kw)
    return result, rec


def test_exactly_n_steps_csv_and_file(tmp_path, dataset, bundle):
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    result, rec = _job(tmp_path, settings(dataset, gradient_accumulation_steps=2, save_as_json=True), bundle)
    assert [e.step for e in rec.steps] == list(range(1, 7))
    assert result.status == "done" and [p.name for p in result.saved] == ["untitled.safetensors"]
    rows = list(csv.reader(open(result.csv)))
    assert rows[0] == ["step", "loss", "loss_ema", "lr", "lr_te", "elapsed_s"] and len(rows) == 7  # BASE: TE lr too
    tensors, meta = load_lora(result.saved[0])
    assert meta["ss_steps"] == "6" and meta["ss_network_dim"] == "4" and meta["shinkansen_mode"] == "LoRA"
    assert meta["ss_seed"] == "3" and "sshs_model_hash" in meta
    assert all(torch.equal(before[k], v) for k, v in bundle.unet.state_dict().items())   # frozen
    assert not bundle.unet._forward_hooks and result.json.is_file()
    assert all(not m._forward_hooks for m in bundle.unet.modules() if isinstance(m, torch.nn.Linear))


def test_noise_settings_are_in_the_files_metadata(tmp_path, dataset, bundle):
    """kohya writes its noise settings (``ss_noise_offset``, ``ss_multires_noise_iterations``,
    ``ss_multires_noise_discount``); a file trained with multires noise says so."""
    s = settings(dataset, train_iterations=1, noise_offset=0.05, multires_noise_iterations=6,
                 multires_noise_discount=0.25)
    result, _ = _job(tmp_path, s, bundle)
    _, meta = load_lora(result.saved[0])
    assert (meta["ss_noise_offset"], meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"]) \
        == ("0.05", "6", "0.25")


def test_existing_output_is_refused_before_work(tmp_path, dataset, bundle):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "untitled.safetensors").write_bytes(b"keep me")
    with pytest.raises(UserError, match="already exists"):
        _job(tmp_path, settings(dataset), bundle)
    assert (tmp_path / "out" / "untitled.safetensors").read_bytes() == b"keep me"


def test_bad_inputs_fail_before_the_model_loads(tmp_path, dataset):
    # no bundle given: the model would load only after these checks, and they must fail first
    with pytest.raises(UserError, match="lora_data_directory"):
        run_job(settings(tmp_path / "missing"), lora_dir=tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError):
        run_job(settings(empty), lora_dir=tmp_path / "o")
    with pytest.raises(UserError, match="save_lora_name"):
        run_job(settings(dataset, save_lora_name="../evil"), lora_dir=tmp_path / "o")
    with pytest.raises(UserError, match="network_rank"):
        run_job(settings(dataset, network_rank=0), lora_dir=tmp_path / "o")
    with pytest.raises(UserError, match="train_optimizer"):
        run_job(settings(dataset, train_optimizer="Adamm"), lora_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_nan_loss_stops_with_last_good_weights(tmp_path, dataset, bundle, monkeypatch):
    import trainer.diffusion as diffusion
    real = diffusion.denoising_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr("trainer.modes.lora.denoising_loss", flaky)
    with pytest.raises(TrainingError, match="nan at step 4.*step 3"):
        _job(tmp_path, settings(dataset), bundle)
    saved = list((tmp_path / "out").glob("*.safetensors"))
    assert [p.name for p in saved] == ["untitled_nan_at_3.safetensors"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_stop_and_save(tmp_path, dataset, bundle):
    stop = StopRequest()
    rec = Recorder()

    def sink(e):
        rec(e)
        if isinstance(e, StepEvent) and e.step == 2:
            stop.request("save")

    result = run_job(settings(dataset), lora_dir=tmp_path / "out", bundle=bundle, events=EventBus([sink]),
                     stop=stop, log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    assert result.status == "stopped" and len(rec.steps) == 2
    assert load_lora(result.saved[0])[1]["ss_steps"] == "2"


def test_stop_discards(tmp_path, dataset, bundle):
    stop = StopRequest()
    events = EventBus([lambda e: stop.request("stop") if isinstance(e, StepEvent) and e.step == 1 else None])
    result = run_job(settings(dataset), lora_dir=tmp_path / "out", bundle=bundle, events=events, stop=stop,
                     log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    assert result.status == "stopped" and result.saved == []


def test_interrupted_run_resumes_to_the_same_lora(tmp_path, dataset):
    s = settings(dataset, save_state=True, train_lr_scheduler="cosine", save_lora_name="r")
    full, _ = _job(tmp_path / "a", s, random_tiny_bundle(seed=0, device="cpu"))
    stop = StopRequest()
    events = EventBus([lambda e: stop.request("stop") if isinstance(e, StepEvent) and e.step == 3 else None])
    part = run_job(s, lora_dir=tmp_path / "b" / "out", bundle=random_tiny_bundle(seed=0, device="cpu"),
                   events=events, stop=stop, log_dir=tmp_path / "b" / "logs", json_dir=tmp_path / "b" / "json")
    assert part.status == "stopped"
    state = tmp_path / "b" / "logs" / "states" / "r.state.pt"
    assert state.is_file()
    resumed, rec = _job(tmp_path / "b", s.with_overrides(train_resume_state=str(state)),
                        random_tiny_bundle(seed=0, device="cpu"))
    assert [e.step for e in rec.steps] == [4, 5, 6]
    a, _ = load_lora(full.saved[0])
    b, _ = load_lora(resumed.saved[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_images_every_n_steps(tmp_path, dataset, bundle):
    s = settings(dataset, sample_every_n_steps=3, sample_prompts=["zq", "a red circle"])
    result, rec = _job(tmp_path, s, bundle)
    samples = [e for e in rec.runs if isinstance(e, RunEvent) and e.kind == "sample"]
    assert [(e.data["step"], e.message) for e in samples] == [(3, "zq"), (3, "a red circle"), (6, "zq"),
                                                              (6, "a red circle")]
    from PIL import Image
    assert all(Image.open(e.path).size == (64, 64) for e in samples)
    assert bundle.unet.training is False
