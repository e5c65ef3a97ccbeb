"""Noise schedule arithmetic, DDIM / Euler samplers and the CFG wrapper."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.models.sampling import (cfg_denoiser, concat_cond, ddim_sample, ddim_timesteps, euler_sample,
                                     euler_timesteps)
from trainer.models.schedule import NoiseSchedule

PRED_TYPES = ["epsilon", "v_prediction"]
SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule()


def _numpy_schedule() -> tuple[np.ndarray, np.ndarray]:
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return betas, np.cumprod(1.0 - betas)


# -- schedule ------------------------------------------------------------------------------------
def test_tables_match_numpy(sched):
    betas, ab = _numpy_schedule()
    for i in (0, 499, 999):
        assert sched.betas[i].item() == pytest.approx(betas[i], rel=1e-6)
        assert sched.alphas_cumprod[i].item() == pytest.approx(ab[i], rel=1e-6)
    assert sched.betas.dtype == torch.float32 and sched.alphas_cumprod.dtype == torch.float32
    # Known SD values: ab[0] = 1 - 0.00085, ab[999] ~ 0.0047
    assert sched.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert sched.alphas_cumprod[999].item() == pytest.approx(0.0046600, abs=1e-6)
    torch.testing.assert_close(sched.sigmas, torch.from_numpy(np.sqrt((1 - ab) / ab)).float())


def test_snr_monotone_decreasing(sched):
    snr = sched.snr(torch.arange(1000))
    assert snr.shape == (1000,)
    assert bool((snr[1:] < snr[:-1]).all())


def test_add_noise_identity(sched):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 777], dtype=torch.long)
    _, ab = _numpy_schedule()
    xt = sched.add_noise(x0, eps, t)
    for b in range(2):
        a = ab[t[b].item()]
        torch.testing.assert_close(xt[b], math.sqrt(a) * x0[b] + math.sqrt(1 - a) * eps[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_inversions_exact(sched, pred):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 999], dtype=torch.long)
    xt = sched.add_noise(x0, eps, t)
    target = sched.target(x0, eps, t, pred)
    if pred == "epsilon":
        assert torch.equal(target, eps)
    else:
        torch.testing.assert_close(target, sched.v_target(x0, eps, t))
    torch.testing.assert_close(sched.pred_x0(xt, target, t, pred), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(sched.pred_eps(xt, target, t, pred), eps, rtol=0, atol=1e-5)
    # also mid-schedule, including batched t
    t_mid = torch.tensor([100, 500], dtype=torch.long)
    xt = sched.add_noise(x0, eps, t_mid)
    target = sched.target(x0, eps, t_mid, pred)
    torch.testing.assert_close(sched.pred_x0(xt, target, t_mid, pred), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(sched.pred_eps(xt, target, t_mid, pred), eps, rtol=0, atol=1e-5)


def test_min_snr_weights(sched):
    _, ab = _numpy_schedule()
    t = torch.tensor([10, 200, 600, 999], dtype=torch.long)
    gamma = 5.0
    snr = ab[t.numpy()] / (1 - ab[t.numpy()])
    # Hand check of the regime: SNR(10) ~ 100 > gamma (clipped), SNR(999) ~ 0.0047 < gamma (weight 1 for eps).
    assert snr[0] > gamma and snr[3] < gamma
    w_eps = sched.min_snr_weight(t, gamma, "epsilon")
    w_v = sched.min_snr_weight(t, gamma, "v_prediction")
    np.testing.assert_allclose(w_eps.numpy(), np.minimum(snr, gamma) / snr, rtol=1e-5)
    np.testing.assert_allclose(w_v.numpy(), np.minimum(snr, gamma) / (snr + 1), rtol=1e-5)
    assert w_eps[3].item() == pytest.approx(1.0)
    assert w_v[0].item() == pytest.approx(gamma / (snr[0] + 1), rel=1e-5)


def test_bad_prediction_type(sched):
    with pytest.raises(ValueError):
        sched.pred_x0(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]), "sample")


# -- samplers --------------------------------------------------------------------------------------
class Oracle:
    """A perfect denoiser for one known x0; counts calls and batch sizes."""

    def __init__(self, sched: NoiseSchedule, x0: torch.Tensor, pred: str) -> None:
        self.sched, self.x0, self.pred = sched, x0, pred
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        self.calls.append((x_t.shape[0], t.tolist()))
        ab = self.sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        x_t, x0 = x_t.double(), self.x0.double()
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = eps if self.pred == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.float()


@pytest.fixture(scope="module")
def x0() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).clamp(-2, 2)


SAMPLERS = {"ddim": ddim_sample, "euler": euler_sample}


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_oracle_recovers_x0(sched, x0, pred, name):
    oracle = Oracle(sched, x0, pred)
    out = SAMPLERS[name](oracle, SHAPE, sched, steps=10, generator=torch.Generator().manual_seed(3),
                         prediction_type=pred)
    assert (out - x0).abs().max().item() < 1e-3
    assert len(oracle.calls) == 10


def test_ddim_eta_oracle_and_alpha0_convention(sched, x0):
    g = torch.Generator().manual_seed(3)
    out = ddim_sample(Oracle(sched, x0, "epsilon"), SHAPE, sched, steps=8, eta=1.0, generator=g)
    assert (out - x0).abs().max().item() < 1e-3
    # denoise_last=False: ldm/diffusers (set_alpha_to_one=False) stop at noise level ab[0]. Deterministic
    # DDIM with an exact model keeps the eps that x_T implies at the first timestep.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = ddim_sample(Oracle(sched, x0, "epsilon"), SHAPE, sched, steps=8, x_T=noise, denoise_last=False)
    ab = sched.alphas_cumprod.double()
    a_T, a0 = ab[ddim_timesteps(8)[0]], ab[0]
    eps = (noise.double() - a_T.sqrt() * x0.double()) / (1 - a_T).sqrt()
    expected = a0.sqrt() * x0.double() + (1 - a0).sqrt() * eps
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_timestep_grids():
    assert ddim_timesteps(20) == list(range(951, 0, -50))
    assert ddim_timesteps(1) == [1]
    ts = euler_timesteps(10)
    assert ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_seed_determinism(sched, name):
    def toy(x, t):  # a smooth, t-dependent non-oracle model
        return torch.tanh(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    def run(seed):
        return SAMPLERS[name](toy, SHAPE, sched, steps=5, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # x_T given explicitly equals drawing it from the same seed
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    assert torch.equal(SAMPLERS[name](toy, SHAPE, sched, steps=5, x_T=noise), a)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_once_per_step(sched, x0, name):
    seen = []
    SAMPLERS[name](Oracle(sched, x0, "epsilon"), SHAPE, sched, steps=4,
                   generator=torch.Generator().manual_seed(0), callback=lambda d: seen.append(d["i"]))
    assert seen == [0, 1, 2, 3]


# -- CFG -----------------------------------------------------------------------------------------
def _toy_unet(calls: list):
    def unet_call(x, t, cond):
        calls.append((x.shape[0], t.shape[0], {k: tuple(v.shape) for k, v in cond.items()}))
        scale = cond["context"].mean(dim=(1, 2)) + cond["y"].sum(dim=1)
        return x * scale.view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) * 1e-3
    return unet_call


def _conds(b: int):
    g = torch.Generator().manual_seed(5)
    cond = {"context": torch.randn(b, 77, 16, generator=g), "y": torch.randn(b, 2816, generator=g)}
    uncond = {"context": torch.randn(b, 77, 16, generator=g), "y": torch.randn(b, 2816, generator=g)}
    return cond, uncond


def test_concat_cond_dict():
    cond, uncond = _conds(2)
    both = concat_cond(cond, uncond, 2)
    assert both["context"].shape == (4, 77, 16) and both["y"].shape == (4, 2816)
    assert torch.equal(both["y"][:2], cond["y"]) and torch.equal(both["y"][2:], uncond["y"])
    # a batch-1 negative broadcasts to the latent batch
    one = {k: v[:1] for k, v in uncond.items()}
    assert concat_cond(cond, one, 2)["context"].shape == (4, 77, 16)


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_cfg_formula(scale):
    calls: list = []
    unet = _toy_unet(calls)
    cond, uncond = _conds(2)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([10, 500], dtype=torch.long)
    guided = cfg_denoiser(unet, cond, uncond, scale)(x, t)
    assert calls[0] == (4, 4, {"context": (4, 77, 16), "y": (4, 2816)})
    out_c, out_u = unet(x, t, cond), unet(x, t, uncond)
    if scale == 1.0:
        assert torch.equal(guided, out_c)
    else:
        torch.testing.assert_close(guided, out_u + scale * (out_c - out_u))


def test_cfg_sampler_calls_once_per_step_with_double_batch(sched):
    calls: list = []
    cond, uncond = _conds(2)
    model_fn = cfg_denoiser(_toy_unet(calls), cond, uncond, 5.0)
    for sampler in (ddim_sample, euler_sample):
        calls.clear()
        sampler(model_fn, SHAPE, sched, steps=6, generator=torch.Generator().manual_seed(0))
        assert len(calls) == 6
        assert all(c[0] == 4 and c[1] == 4 for c in calls)
