"""EMA of the LoRA weights (``ema_decay``, ``ema_warmup``): the saved files are the average, computed here
independently from the raw weights recorded after every optimizer step; resume continues the same average."""
from __future__ import annotations

import pytest
import torch

import trainer.modes.lora as lora_mode
from trainer.engine import StopRequest
from trainer.errors import UserError
from trainer.events import EventBus, StepEvent
from trainer.models.loader import random_tiny_bundle
from trainer.networks import load_lora
from trainer.runner import run_job
from trainer.settings import Settings
from trainer.world import toy

BASE = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_batch_size=2,
            network_rank=4, network_alpha=4, train_seed=3, train_learning_rate=3e-3, train_lr_scheduler="constant",
            logging_save_csv=False, save_overwrite=True, save_precision="fp32")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 2, seed=1, image_size=64)
    return folder


def _weights(network) -> dict:
    return {k: v.detach().double().clone() for k, v in network.kohya_state_dict().items() if not k.endswith("alpha")}


@pytest.mark.parametrize("warmup", [False, True])
def test_saved_lora_is_the_ema_of_the_recorded_weights(tmp_path, dataset, monkeypatch, warmup):
    decay, steps = 0.7, 4
    record, holder = [], {}
    real_new = lora_mode.new_network

    def spy_new(run, s, *a, **kw):
        holder["net"] = net = real_new(run, s, *a, **kw)
        record.append(_weights(net))          # the weights before step 1: where the average starts
        return net

    monkeypatch.setattr(lora_mode, "new_network", spy_new)

    def sink(e):
        if isinstance(e, StepEvent):          # emitted after the step: the raw weights of that step
            record.append(_weights(holder["net"]))

    s = Settings.from_dict({**BASE, "lora_data_directory": str(dataset), "train_iterations": steps,
                            "ema_decay": decay, "ema_warmup": warmup, "save_every_n_steps": 2,
                            "save_lora_name": f"ema{warmup}"})
    result = run_job(s, lora_dir=tmp_path, bundle=random_tiny_bundle(seed=0, device="cpu"),
                     events=EventBus([sink]), log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    assert len(record) == steps + 1
    # the recurrence, by hand: shadow_0 = initial weights; after step n (0-based) with d_n as documented
    shadow, expected = dict(record[0]), {}
    for n, raw in enumerate(record[1:]):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        shadow = {k: d * shadow[k] + (1 - d) * raw[k] for k in shadow}
        expected[n + 1] = shadow
    files = {int(p.stem.split("_")[-1][:-5]) if p.stem.endswith("steps") else steps: p for p in result.saved}
    assert sorted(files) == [2, steps]        # the every-2-steps save and the final file
    for step, path in files.items():
        tensors, md = load_lora(path)
        for k, want in expected[step].items():
            assert torch.allclose(tensors[k].double(), want, atol=1e-6, rtol=1e-5), (step, k)
        assert md["shinkansen_ema_decay"] == str(decay)
    # and it is not simply the last weights (the test could not tell otherwise)
    last = load_lora(files[steps])[0]
    ups = [k for k in expected[steps] if "lora_up" in k]
    gap = max(float((last[k].double() - record[-1][k]).abs().max()) for k in ups)
    assert gap > 1e-4


def _job(folder, s, stop_at=None):
    stop = StopRequest()

    def sink(e):
        if isinstance(e, StepEvent) and e.step == stop_at:
            stop.request("stop")

    return run_job(s, lora_dir=folder / "out", bundle=random_tiny_bundle(seed=0, device="cpu"),
                   events=EventBus([sink]), stop=stop, log_dir=folder / "logs", json_dir=folder / "json")


def test_resume_with_ema_equals_an_uninterrupted_run(tmp_path, dataset):
    s = Settings.from_dict({**BASE, "lora_data_directory": str(dataset), "train_iterations": 4, "ema_decay": 0.8,
                            "ema_warmup": True, "save_state": True, "save_lora_name": "emares"})
    full = _job(tmp_path / "a", s)
    part = _job(tmp_path / "b", s, stop_at=2)
    assert part.status == "stopped"
    state = tmp_path / "b" / "logs" / "states" / "emares.state.pt"
    data = torch.load(state, weights_only=True)
    assert data["ema"]["updates"] == 2
    resumed = _job(tmp_path / "b", s.with_overrides(train_resume_state=str(state)))
    ta, tb = load_lora(full.saved[0])[0], load_lora(resumed.saved[0])[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # resuming that state without EMA is "other settings": one line, nothing half-restored
    with pytest.raises(UserError, match="train_resume_state: .* other settings .*ema_decay"):
        _job(tmp_path / "c", s.with_overrides(train_resume_state=str(state), ema_decay=0.0))
