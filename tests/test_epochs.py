"""Epochs, and one run with every kohya workflow option: derived steps, epoch-end saves and samples, kohya's
metadata, text-encoder caching only when captions allow it, and resume mid-epoch = the uninterrupted run."""
import math

import pytest
import torch

from trainer.engine import StopRequest
from trainer.events import EventBus, RunEvent, StepEvent
from trainer.models.loader import random_tiny_bundle
from trainer.modes import lora
from trainer.networks import load_lora
from trainer.runner import run_job
from trainer.settings import BLOCKS_SD, Settings
from trainer.world import toy

BASE = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_batch_size=2,
            network_rank=4, network_alpha=4, train_seed=3, train_learning_rate=1e-3, train_lr_scheduler="constant",
            logging_save_csv=False, save_overwrite=True,
            network_blocks=[b for b in BLOCKS_SD if b != "BASE"])   # frozen text encoder: its outputs can be cached
# every kohya workflow option at once (the trigger word is the first tag and kept there)
ALL = dict(lora_trigger_word="zkx", shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.2,
           caption_tag_dropout_rate=0.2, caption_dropout_every_n_epochs=2, caption_prefix="", prior_loss_weight=0.7)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    work = tmp_path_factory.mktemp("ep")
    toy.make_dataset(work / "train" / "1_zkx", 3, seed=1, caption="red, circle, large, white background")
    toy.make_dataset(work / "reg" / "1_circle", 2, seed=2, shape="circle")
    for f in (work / "reg").rglob("*.txt"):
        f.unlink()
    return work


def settings(folders, **kw):
    return Settings.from_dict({**BASE, "lora_data_directory": str(folders / "train"), **kw})


def _job(out, s, stop_at=None, encoder_calls=None):
    stop, events = StopRequest(), []

    def sink(e):
        events.append(e)
        if isinstance(e, StepEvent) and e.step == stop_at:
            stop.request("stop")

    bundle = random_tiny_bundle(seed=0, device="cpu")
    encoder = None
    if encoder_calls is not None:
        def encoder(prompts, **kw):
            encoder_calls.append((len([e for e in events if isinstance(e, StepEvent)]), list(prompts)))
            return bundle.encode_prompts(prompts, **kw)
    result = run_job(s, lora_dir=out / "out", bundle=bundle, events=EventBus([sink]), stop=stop,
                     log_dir=out / "logs", json_dir=out / "json", prompt_encoder=encoder)
    return result, events


def test_iterations_are_derived_exactly(folders):
    # 3 train images x 1 repeat; 2 reg images balanced to 3 samples (kohya: [2, 1]); 6 samples in one bucket
    s = settings(folders, lora_reg_directory=str(folders / "reg"), train_batch_size=4, train_epochs=5)
    plan = lora.prepare(s).plan
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.iterations) == (2, 2, 10)   # ceil(6/4) batches
    accum = lora.prepare(s.with_overrides(train_batch_size=1, gradient_accumulation_steps=4)).plan
    assert (accum.batches_per_epoch, accum.steps_per_epoch, accum.iterations) == (6, 2, 10)  # ceil(6/4) steps
    by_steps = lora.prepare(s.with_overrides(train_epochs=None, train_iterations=7)).plan
    assert (by_steps.epochs, by_steps.iterations, by_steps.by_epochs) == (math.ceil(7 / 2), 7, False)
    assert "5 epochs x 2 steps = 10 train_iterations" in lora.prepare(s).plan.lines()[0]
    assert any(a.startswith("train_iterations:") for a in s.with_overrides(train_iterations=50).advice())
    assert Settings.from_dict({"train_iterations": "500"}).train_epochs is None     # TrainTrain's files: steps decide
    no_prompt = s.with_overrides(sample_every_n_epochs=1)
    assert any(str(p).startswith("sample_prompts: sample_every_n_epochs") for p in no_prompt.problems())


def test_a_run_with_every_option_saves_and_samples_at_epoch_ends_with_kohyas_metadata(tmp_path, folders):
    # 3 train + 3 reg samples, batch 2 -> 3 steps per epoch; 3 epochs -> 9 steps
    s = settings(folders, lora_reg_directory=str(folders / "reg"), train_epochs=3, save_every_n_epochs=1,
                 sample_every_n_epochs=2, sample_prompts=["a circle"], save_lora_name="all", **ALL)
    calls = []
    result, events = _job(tmp_path, s, encoder_calls=calls)
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == list(range(1, 10)) and {e.total for e in steps} == {9}
    messages = [e.message for e in events if isinstance(e, RunEvent) and e.kind == "message"]
    assert "3 epochs x 3 steps = 9 train_iterations (derived from train_epochs)" in messages
    assert sum("text-encoder outputs are computed each step" in m for m in messages) == 1
    assert [c[0] for c in calls] == list(range(9))            # no cache: one encoder call per step, at every step
    texts = [p for _, ps in calls for p in ps if p]
    assert all(p.startswith("zkx, ") or p == "circle" for p in texts)   # keep_tokens=1 keeps the trigger first
    assert len({p for p in texts if p != "circle"}) > 3                   # shuffled and tag-dropped
    # epoch 2 (steps 4-6) is a caption_dropout_every_n_epochs epoch: every caption empty
    assert all(p == "" for n, ps in calls if 3 <= n < 6 for p in ps)
    names = [p.name for p in result.saved]
    assert names == ["all-000001.safetensors", "all-000002.safetensors", "all.safetensors"]
    samples = [e.data["step"] for e in events if isinstance(e, RunEvent) and e.kind == "sample"]
    assert samples == [6]                                      # the end of epoch 2
    md = [load_lora(p)[1] for p in result.saved]
    assert [m["ss_epoch"] for m in md] == ["1", "2", "3"] and [m["ss_steps"] for m in md] == ["3", "6", "9"]
    want = {"ss_num_epochs": "3", "ss_num_batches_per_epoch": "3", "ss_max_train_steps": "9",
            "ss_num_train_images": "3", "ss_num_reg_images": "2", "ss_prior_loss_weight": "0.7",
            "ss_reg_dataset_dirs": '{"1_circle": {"n_repeats": 1, "img_count": 2}}',
            "ss_dataset_dirs": '{"1_zkx": {"n_repeats": 1, "img_count": 3}}',
            "ss_shuffle_caption": "True", "ss_keep_tokens": "1", "ss_caption_dropout_rate": "0.2",
            "ss_caption_dropout_every_n_epochs": "2", "ss_caption_tag_dropout_rate": "0.2"}
    assert {k: md[-1].get(k) for k in want} == want


def test_text_encoder_outputs_stay_cached_when_captions_only_drop(tmp_path, folders):
    s = settings(folders, train_iterations=3, caption_dropout_rate=0.5, caption_prefix="photo of")
    calls = []
    _, events = _job(tmp_path, s, encoder_calls=calls)
    assert calls and all(n == 0 for n, _ in calls)             # every text encoded before the first step
    texts = {p for _, ps in calls for p in ps}
    assert "" in texts and all(t == "" or t.startswith("photo of ") for t in texts)
    assert not any("computed each step" in (getattr(e, "message", "") or "") for e in events)


def test_resume_in_the_middle_of_an_epoch_equals_the_uninterrupted_run(tmp_path, folders):
    s = settings(folders, lora_reg_directory=str(folders / "reg"), train_epochs=2, save_state=True,
                 save_every_n_epochs=1, save_lora_name="mid",
                 **{**ALL, "caption_dropout_every_n_epochs": 0})   # 3 steps per epoch, 6 steps; captions vary
    full, _ = _job(tmp_path / "a", s)
    part, _ = _job(tmp_path / "b", s, stop_at=4)                  # stopped in epoch 2, after its first step
    assert part.status == "stopped"
    state = tmp_path / "b" / "logs" / "states" / "mid.state.pt"
    resumed, events = _job(tmp_path / "b", s.with_overrides(train_resume_state=str(state)))
    assert [e.step for e in events if isinstance(e, StepEvent)] == [5, 6]
    a, b = load_lora(full.saved[-1])[0], load_lora(resumed.saved[-1])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
