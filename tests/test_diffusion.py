"""Shared objective pieces: timesteps, noise options, losses, min-SNR weights."""
import pytest
import torch

from trainer.diffusion import denoising_loss, loss_per_sample, make_noise, sample_timesteps, snr_weights
from trainer.models.schedule import NoiseSchedule


def test_timesteps_cover_the_range_and_can_be_fixed_per_batch():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, 200, 400, g, "cpu")
    assert int(t.min()) == 200 and int(t.max()) == 399
    fixed = sample_timesteps(8, 0, 1000, g, "cpu", fixed_in_batch=True)
    assert len(set(fixed.tolist())) == 1


def test_noise_is_seeded_and_options_change_it():
    like = torch.zeros(2, 4, 16, 16)
    a = make_noise(like, torch.Generator().manual_seed(1))
    b = make_noise(like, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    off = make_noise(like, torch.Generator().manual_seed(1), offset=0.1)
    assert not torch.equal(a, off)
    multi = make_noise(like, torch.Generator().manual_seed(1), multires_iterations=6, multires_discount=0.3)
    assert multi.std(dim=(1, 2, 3)).sub(1).abs().max() < 1e-4


def test_losses():
    p, t = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    assert loss_per_sample(p, t, "MSE").tolist() == [4.0, 4.0]
    assert loss_per_sample(p, t, "L1").tolist() == [2.0, 2.0]
    assert loss_per_sample(p, t, "Smooth-L1").tolist() == [1.5, 1.5]
    mask = torch.zeros(2, 1, 2, 2)
    mask[:, :, 0, 0] = 1
    t2 = t.clone()
    t2[:, :, 1, 1] = 100.0    # outside the mask: ignored
    assert loss_per_sample(p, t2, "MSE", mask).tolist() == [4.0, 4.0]
    with pytest.raises(ValueError):
        loss_per_sample(p, t, "Huber")


def test_min_snr_weights_for_eps_and_v():
    s = NoiseSchedule()
    t = torch.tensor([10, 500, 990])
    snr = s.snr(t)
    assert torch.allclose(snr_weights(s, t, 5.0, "epsilon"), torch.clamp(snr, max=5.0) / snr)
    assert torch.allclose(snr_weights(s, t, 5.0, "v_prediction"), torch.clamp(snr, max=5.0) / (snr + 1))
    assert torch.equal(snr_weights(s, t, 0, "epsilon"), torch.ones(3))


def test_denoising_loss_is_zero_for_a_perfect_prediction():
    s = NoiseSchedule()
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    assert denoising_loss(noise, x0, noise, t, s, "epsilon", snr_gamma=5).item() == 0.0
    v = s.v_target(x0, noise, t)
    assert denoising_loss(v, x0, noise, t, s, "v_prediction", snr_gamma=5).item() < 1e-10
