"""Regularisation images: kohya's epoch composition, per-sample loss weights, one-line errors."""
from collections import Counter

import pytest
import torch

from trainer.data import BucketBatchSampler, DatasetOptions, load_dataset
from trainer.data.regularisation import balance, load_reg_images
from trainer.diffusion import denoising_loss, loss_per_sample
from trainer.errors import UserError
from trainer.settings import Settings
from trainer.world import toy

OPTS = DatasetOptions(image_size=(64, 64), image_buckets_step=64, image_min_length=64, lora_trigger_word="zkz")


def _folders(tmp_path, n_train, train_repeats, n_reg, reg_repeats=1, reg_captions=False):
    toy.make_dataset(tmp_path / "train" / f"{train_repeats}_zkz", n_train, seed=0, caption="circle", shape="circle",
                     color="red")
    toy.make_dataset(tmp_path / "reg" / f"{reg_repeats}_circle", n_reg, seed=1, shape="circle")
    if not reg_captions:
        for f in (tmp_path / "reg").rglob("*.txt"):
            f.unlink()
    return tmp_path / "train", tmp_path / "reg"


def _epoch(tmp_path, n_train, train_repeats, n_reg, reg_repeats=1, batch=4):
    train_dir, reg_dir = _folders(tmp_path, n_train, train_repeats, n_reg, reg_repeats)
    ds = load_dataset(train_dir, OPTS)
    reg = load_reg_images(reg_dir, ds.options, ds.buckets, sum(r.repeats for r in ds.records))
    placements = ds.placements + reg.placements
    sampler = BucketBatchSampler.from_samples(placements, batch, seed=0)
    counts = Counter(placements[i].record.rel for b in sampler.epoch_batches(0) for i in b)
    is_reg = {p.record.rel: i >= len(ds.placements) for i, p in enumerate(placements)}
    return ds, reg, counts, is_reg


def test_balance_is_kohyas_rule():
    assert balance([1] * 50, 20) == [1] * 20 + [0] * 30          # surplus reg images unused
    assert balance([1] * 10, 20) == [2] * 10                     # too few: each repeated
    assert balance([3] * 10, 20) == [3] * 7 + [0] * 3            # first pass may overshoot (21)
    assert balance([1] * 3, 7) == [3, 2, 2]                      # extra repeats go round in file order
    assert balance([2, 1], 9) == [5, 4]


def test_more_reg_images_than_train_samples_are_subsampled(tmp_path):
    ds, reg, counts, is_reg = _epoch(tmp_path, 10, 2, 50)
    train = {k: v for k, v in counts.items() if not is_reg[k]}
    regs = {k: v for k, v in counts.items() if is_reg[k]}
    assert sum(train.values()) == 20 and set(train.values()) == {2}
    assert sum(regs.values()) == 20 and set(regs.values()) == {1} and len(regs) == 20
    assert reg.num_reg_images == 50 and reg.unused == 30
    assert reg.dirs == {"1_circle": {"n_repeats": 1, "img_count": 50}}
    # reg captions: the class from the folder name, never the trigger word
    assert {p.record.caption for p in reg.placements} == {"circle"}
    assert {r.caption for r in ds.records} == {"zkz, circle"}


def test_fewer_reg_images_are_repeated(tmp_path):
    _, reg, counts, is_reg = _epoch(tmp_path, 10, 2, 10)
    regs = {k: v for k, v in counts.items() if is_reg[k]}
    assert len(regs) == 10 and set(regs.values()) == {2}        # each reg image twice per epoch
    assert reg.num_reg_images == 10 and reg.samples_per_epoch == 20


def test_reg_loss_is_weighted_per_sample():
    torch.manual_seed(0)
    from trainer.models.schedule import NoiseSchedule
    sched = NoiseSchedule()
    x0, noise, pred = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 900])
    per = loss_per_sample(pred, sched.target(x0, noise, t, "epsilon"))
    plain = denoising_loss(pred, x0, noise, t, sched, "epsilon")
    assert torch.allclose(denoising_loss(pred, x0, noise, t, sched, "epsilon", weights=torch.ones(3)), plain)
    w = torch.tensor([1.0, 0.5, 0.0])                            # train, reg at prior_loss_weight 0.5, reg at 0
    got = denoising_loss(pred, x0, noise, t, sched, "epsilon", weights=w)
    assert torch.allclose(got, (per[0] + 0.5 * per[1]) / 3)
    # a weight-0 sample gets no gradient at all
    p = pred.clone().requires_grad_()
    denoising_loss(p, x0, noise, t, sched, "epsilon", weights=w).backward()
    assert p.grad[2].abs().max() == 0 and p.grad[0].abs().max() > 0


def test_bad_reg_folder_is_one_line_before_model_work(tmp_path):
    from trainer.modes import lora
    train_dir, reg_dir = _folders(tmp_path, 2, 1, 2)
    missing = Settings.from_dict({"lora_data_directory": str(train_dir), "lora_reg_directory": str(tmp_path / "nope")})
    problems = [str(p) for p in missing.problems()]
    assert any(p.startswith("lora_reg_directory: folder not found") for p in problems)
    flat = tmp_path / "flat"
    toy.make_dataset(flat, 2, seed=3)                            # images, but no N_class folder
    s = missing.with_overrides(lora_reg_directory=str(flat), image_size=(64, 64), image_buckets_step=64,
                               image_min_length=64)
    with pytest.raises(UserError, match=r"^lora_reg_directory: .*N_class folder") as err:
        lora.prepare(s)
    assert "\n" not in str(err.value)
