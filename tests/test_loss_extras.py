"""kohya's loss and noise extras (SPEC §16), each checked against its definition computed here independently.

The definitions, restated (sources: kohya-ss/sd-scripts ``library/train_util.py`` ``conditional_loss`` and
``get_huber_threshold_if_needed``, ``library/custom_train_functions.py`` ``apply_debiased_estimation``,
``get_noise_noisy_latents_and_timesteps``; papers named on each test):

- SD's noise schedule: betas linear in sqrt-space from 0.00085 to 0.012 over T = 1000 steps, ᾱ_t their
  cumulative product of (1 − β); σ_t = sqrt((1 − ᾱ_t)/ᾱ_t); SNR_t = ᾱ_t/(1 − ᾱ_t). Recomputed here in numpy.
- Huber threshold c(t): constant c·scale; exponential scale·c^(t/T) (the same curve as exp(−a·t) with
  a = −ln c / T, written differently here on purpose); snr (1 − c)/(1 + σ_t)² + c (no scale).
- Huber element loss 2c(sqrt(d² + c²) − c); kohya's smooth_l1 2(sqrt(d² + c²) − c).
- Debiased weight: 1/sqrt(min(SNR, 1000)) for ε, 1/(min(SNR, 1000) + 1) for v.
- Input perturbation: the UNet input is noised with noise + γ·ξ, the target is built from noise alone.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trainer.modes.lora as lora_mode
from trainer.diffusion import denoising_loss, loss_per_sample, make_noise
from trainer.events import EventBus, StepEvent
from trainer.loss_terms import LossOptions, debiased_weights, huber_threshold, perturbed_input_noise
from trainer.models.loader import DEFAULT_MODEL, load_model, random_tiny_bundle
from trainer.models.schedule import NoiseSchedule
from trainer.networks import load_lora
from trainer.runner import run_job
from trainer.settings import Settings, SettingsError
from trainer.world import toy

T = 1000
TIMESTEPS = [0, 1, 10, 100, 250, 500, 750, 999]


def _alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


AB = _alphas_cumprod()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


# ------------------------------------------------------------------------------ scheduled Huber c(t)
# Khrapov et al., "Improving Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss"
# (arXiv 2403.16728); kohya's get_huber_threshold_if_needed.
@pytest.mark.parametrize("c,scale", [(0.1, 1.0), (0.3, 1.5)])
def test_huber_threshold_of_each_schedule_is_its_formula(schedule, c, scale):
    t = torch.tensor(TIMESTEPS)
    got = {how: huber_threshold(schedule, t, c, how, scale).double().numpy()
           for how in ("constant", "exponential", "snr")}
    for i, step in enumerate(TIMESTEPS):
        sigma = math.sqrt((1 - AB[step]) / AB[step])
        want = {"constant": c * scale, "exponential": scale * c ** (step / T),
                "snr": (1 - c) / (1 + sigma) ** 2 + c}
        for how, value in want.items():
            assert got[how][i] == pytest.approx(value, rel=1e-5, abs=1e-7), (how, step)
    # what the schedules are for: snr ≈ 1 (L2-like) on clean steps, → c (L1-like) on noisy ones; exp falls to c·scale
    assert got["snr"][0] > 0.9 and got["snr"][-1] == pytest.approx(c, abs=0.01)
    assert got["exponential"][0] == pytest.approx(scale) and got["exponential"][-1] == pytest.approx(c * scale, rel=0.01)


def test_huber_losses_are_their_definitions():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g) * 2
    c = torch.tensor([0.05, 0.3, 1.0])
    d = (pred - target).double()
    cc = c.double().view(-1, 1, 1, 1)
    core = 2 * (torch.sqrt(d ** 2 + cc ** 2) - cc)
    want_huber = (cc * core).mean(dim=(1, 2, 3))
    want_smooth = core.mean(dim=(1, 2, 3))
    got_huber = loss_per_sample(pred, target, "Huber", huber_c=c).double()
    got_smooth = loss_per_sample(pred, target, "Smooth-L1-kohya", huber_c=c).double()
    assert torch.allclose(got_huber, want_huber, rtol=1e-5)
    assert torch.allclose(got_smooth, want_smooth, rtol=1e-5)
    # the shape that makes it a Huber: ≈ d² well inside c, ≈ 2c|d| − 2c² far outside
    small, big = torch.full((1, 1, 1, 1), 1e-2), torch.full((1, 1, 1, 1), 50.0)
    one = torch.tensor([0.5])
    assert float(loss_per_sample(small, torch.zeros_like(small), "Huber", huber_c=one)) == pytest.approx(1e-4, rel=2e-3)
    assert float(loss_per_sample(big, torch.zeros_like(big), "Huber", huber_c=one)) == pytest.approx(
        2 * 0.5 * 50 - 2 * 0.25, rel=1e-4)
    with pytest.raises(ValueError, match="huber_c"):
        loss_per_sample(pred, target, "Huber")


# ------------------------------------------------------------------------------ debiased estimation
# Yu et al., "Debias the Training of Diffusion Models" (arXiv 2310.08442); kohya's apply_debiased_estimation.
def test_debiased_weights_are_their_definition(schedule):
    t = torch.tensor(TIMESTEPS)
    snr = np.minimum(AB[TIMESTEPS] / (1 - AB[TIMESTEPS]), 1000.0)
    eps = debiased_weights(schedule, t, "epsilon").double().numpy()
    v = debiased_weights(schedule, t, "v_prediction").double().numpy()
    assert np.allclose(eps, 1 / np.sqrt(snr), rtol=1e-5)
    assert np.allclose(v, 1 / (snr + 1), rtol=1e-5)
    assert snr[0] == 1000.0 and eps[0] == pytest.approx(1 / math.sqrt(1000), rel=1e-5)   # the clamp at t = 0


def test_denoising_loss_weights_in_kohyas_order(schedule):
    """per-sample Huber(c(t)) × min-SNR weight × debiased weight, then the batch mean."""
    g = torch.Generator().manual_seed(1)
    x0, noise, pred = (torch.randn(4, 4, 6, 6, generator=g) for _ in range(3))
    t = torch.tensor([3, 200, 600, 990])
    opts = LossOptions(kind="Huber", snr_gamma=5.0, huber_schedule="snr", huber_c=0.1, debiased=True)
    got = float(denoising_loss(pred, x0, noise, t, schedule, "epsilon", options=opts))
    ab = AB[t.numpy()]
    snr = ab / (1 - ab)
    c = (1 - 0.1) / (1 + np.sqrt((1 - ab) / ab)) ** 2 + 0.1
    d = (pred - noise).double().numpy()
    per = (c[:, None, None, None] * 2 * (np.sqrt(d ** 2 + c[:, None, None, None] ** 2) - c[:, None, None, None])
           ).mean(axis=(1, 2, 3))
    want = (per * np.minimum(snr, 5.0) / snr / np.sqrt(np.minimum(snr, 1000))).mean()
    assert got == pytest.approx(want, rel=1e-5)
    # without the options it is the plain MSE it always was
    plain = float(denoising_loss(pred, x0, noise, t, schedule, "epsilon"))
    assert plain == pytest.approx(float(((pred - noise) ** 2).mean()), rel=1e-6)


# ------------------------------------------------------------------------------ input perturbation, offsets
# Ning et al., "Input Perturbation Reduces Exposure Bias in Diffusion Models" (arXiv 2301.11706).
def test_perturbed_noise_is_noise_plus_gamma_xi():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = perturbed_input_noise(noise, 0.2, False, g)
    assert torch.allclose(got, noise + 0.2 * torch.randn(noise.shape, generator=twin))
    g, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = perturbed_input_noise(noise, 0.2, True, g)
    u = float(torch.rand((1,), generator=twin))
    assert torch.allclose(got, noise + u * 0.2 * torch.randn(noise.shape, generator=twin))
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert perturbed_input_noise(noise, 0.0, True, g) is noise and torch.equal(g.get_state(), state)


def test_noise_offset_random_strength_scales_the_offset():
    like = torch.zeros(2, 4, 8, 8)
    g, twin = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    got = make_noise(like, g, offset=0.3, offset_random=True)
    base = torch.randn(like.shape, generator=twin)
    u = float(torch.rand((1,), generator=twin))
    want = base + u * 0.3 * torch.randn((2, 4, 1, 1), generator=twin)
    assert 0 < u < 1 and torch.allclose(got, want)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 4, seed=1, image_size=64)
    return folder


BASE = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_batch_size=2,
            network_rank=4, network_alpha=4, train_seed=3, train_learning_rate=1e-3, train_lr_scheduler="constant",
            logging_save_csv=False, save_overwrite=True)


def test_ip_noise_changes_the_input_not_the_target(tmp_path, dataset, monkeypatch):
    """In LoRA mode: what reaches the UNet is noised with noise + γ·ξ, the loss gets the plain noise."""
    seen = []
    real_loss = lora_mode.denoising_loss

    def spy_loss(pred, x0, noise, t, *a, **kw):
        seen[-1].update(x0=x0.detach().clone(), noise=noise.detach().clone(), t=t.clone())
        return real_loss(pred, x0, noise, t, *a, **kw)

    monkeypatch.setattr(lora_mode, "denoising_loss", spy_loss)
    bundle = random_tiny_bundle(seed=0, device="cpu")
    real_unet = bundle.unet_call

    def spy_unet(x, t, cond):
        seen.append({"x_in": x.detach().clone()})
        return real_unet(x, t, cond)

    bundle.unet_call = spy_unet
    residual_std = {}
    for gamma, random in ((0.0, False), (0.5, False), (0.5, True)):
        seen.clear()
        s = Settings.from_dict({**BASE, "lora_data_directory": str(dataset), "train_iterations": 1,
                                "ip_noise_gamma": gamma, "ip_noise_gamma_random_strength": random,
                                "save_lora_name": f"ip{gamma}{random}"})
        run_job(s, lora_dir=tmp_path / "out", bundle=bundle, events=EventBus(), log_dir=tmp_path / "logs",
                json_dir=tmp_path / "json")
        stds = []
        for rec in seen:
            ab = torch.tensor(AB, dtype=torch.float32)[rec["t"]].view(-1, 1, 1, 1)
            # the noise that went into x_in, solved from x_in = sqrt(ab)·x0 + sqrt(1 − ab)·n_in
            n_in = (rec["x_in"] - ab.sqrt() * rec["x0"]) / (1 - ab).sqrt()
            stds.append(float((n_in - rec["noise"]).std()))
            assert float(rec["noise"].std()) == pytest.approx(1.0, abs=0.15)   # the target's noise is plain N(0,1)
        residual_std[(gamma, random)] = stds
    assert max(residual_std[(0.0, False)]) < 1e-3                    # off: the input is made from the target's noise
    assert all(0.4 < x < 0.6 for x in residual_std[(0.5, False)])    # γ·ξ with std γ in the input only
    assert all(0 <= x < 0.5 for x in residual_std[(0.5, True)])      # a random fraction of γ


def test_kohya_loss_spellings_and_bad_values():
    assert Settings.from_dict({"train_loss_function": "huber"}).train_loss_function == "Huber"
    assert Settings.from_dict({"train_loss_function": "l2"}).train_loss_function == "MSE"
    assert Settings.from_dict({"train_loss_function": "Smooth-L1"}).train_loss_function == "Smooth-L1"  # TrainTrain's
    for bad in ({"huber_schedule": "linear"}, {"huber_c": 0}, {"ip_noise_gamma": -0.1}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            Settings.from_dict(bad)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"embedded model not built: {DEFAULT_MODEL}")
def test_short_run_with_every_extra_on_the_tiny_model(tmp_path, dataset):
    losses = []
    s = Settings.from_dict({**BASE, "lora_data_directory": str(dataset), "train_iterations": 3,
                            "train_loss_function": "Huber", "huber_schedule": "snr", "huber_c": 0.1,
                            "debiased_estimation": True, "ip_noise_gamma": 0.1,
                            "ip_noise_gamma_random_strength": True, "noise_offset": 0.05,
                            "noise_offset_random_strength": True, "save_lora_name": "extras"})
    result = run_job(s, lora_dir=tmp_path / "out", bundle=load_model(DEFAULT_MODEL, device="cpu"),
                     events=EventBus([lambda e: losses.append(e.loss) if isinstance(e, StepEvent) else None]),
                     log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    md = load_lora(result.saved[0])[1]
    assert {k: md[k] for k in ("ss_loss_type", "ss_huber_schedule", "ss_huber_c", "ss_huber_scale",
                               "ss_debiased_estimation", "ss_ip_noise_gamma", "ss_ip_noise_gamma_random_strength",
                               "ss_noise_offset_random_strength", "ss_noise_offset")} == {
        "ss_loss_type": "huber", "ss_huber_schedule": "snr", "ss_huber_c": "0.1", "ss_huber_scale": "1.0",
        "ss_debiased_estimation": "True", "ss_ip_noise_gamma": "0.1", "ss_ip_noise_gamma_random_strength": "True",
        "ss_noise_offset_random_strength": "True", "ss_noise_offset": "0.05"}
