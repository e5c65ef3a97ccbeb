"""kohya's loss and noise extras: (scheduled) pseudo-Huber losses, debiased estimation, input-perturbation
noise and random-strength noise offset (SPEC §16).

Why a module of its own: each term is a formula users compare with kohya-ss/sd-scripts, so each is one
small function with the definition restated beside it (followed: sd-scripts at commit 48d368f, 2026-02,
which has ``--huber_scale``). The modes only call :func:`loss_options`, :func:`perturbed_input_noise` and
:func:`offset_strength`; :func:`trainer.diffusion.denoising_loss` applies the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .models.schedule import NoiseSchedule

HUBER_SCHEDULES = ("snr", "exponential", "constant")
#: Loss kinds that need a threshold c per sample (kohya's ``huber`` and ``smooth_l1``).
HUBER_KINDS = ("Huber", "Smooth-L1-kohya")
#: kohya's ``ss_loss_type`` for each of our ``train_loss_function`` values. "Smooth-L1" is TrainTrain's
#: (torch's ``smooth_l1_loss``, beta 1), which kohya has no name for.
KOHYA_LOSS_TYPE = {"MSE": "l2", "L1": "l1", "Huber": "huber", "Smooth-L1-kohya": "smooth_l1",
                   "Smooth-L1": "smooth_l1_torch"}
#: kohya clamps the SNR at 1000 in the debiased weight (at t = 0 the SNR is huge and 1/sqrt(SNR) ~ 0).
DEBIASED_SNR_MAX = 1000.0


@dataclass(frozen=True)
class LossOptions:
    """How a mode's per-sample loss is formed and weighted (one place, read from settings)."""
    kind: str = "MSE"
    snr_gamma: float = 0.0
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased: bool = False


def loss_options(s) -> LossOptions:
    return LossOptions(kind=s.train_loss_function, snr_gamma=s.train_snr_gamma, huber_schedule=s.huber_schedule,
                       huber_c=s.huber_c, huber_scale=s.huber_scale, debiased=s.debiased_estimation)


# ----------------------------------------------------------------------------------------- Huber
def huber_threshold(schedule: NoiseSchedule, t: torch.Tensor, c: float, how: str = "snr",
                    scale: float = 1.0) -> torch.Tensor:
    """The pseudo-Huber threshold c(t) per sample, as kohya's ``get_huber_threshold_if_needed``.

    Source: Khrapov et al., "Improving Diffusion Models's Data-Corruption Resistance using Scheduled
    Pseudo-Huber Loss" (arXiv 2403.16728); kohya-ss/sd-scripts ``library/train_util.py``. In words:

    - constant: the same c for every timestep, times ``scale``.
    - exponential: c(t) falls from ``scale`` at t = 0 to ``c·scale`` at t = T (T = 1000 training steps),
      exponentially: ``scale · exp(-a·t)`` with ``a = -ln(c) / T``.
    - snr: ``(1 - c) / (1 + σ_t)² + c`` with ``σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)``: about 1 (nearly L2) where the
      image is barely noised, falling to c (nearly L1, robust to outliers) where noise dominates. kohya
      applies no ``scale`` here, and neither do we.
    """
    t = torch.as_tensor(t, dtype=torch.long)
    if how == "constant":
        return torch.full(t.shape, c * scale, dtype=torch.float32, device=t.device)
    if how == "exponential":
        a = -math.log(c) / schedule.num_train_timesteps
        return torch.exp(-a * t.float()) * scale
    if how == "snr":
        sigma = schedule._at(schedule.sigmas, t).to(t.device).float()
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    raise ValueError(f"unknown huber_schedule {how!r}; choose one of {', '.join(HUBER_SCHEDULES)}")


def pseudo_huber(diff: torch.Tensor, c: torch.Tensor, kind: str) -> torch.Tensor:
    """Element loss of kohya's ``conditional_loss`` for ``huber`` and ``smooth_l1`` (``c`` per sample).

    Huber: ``2c·(sqrt(d² + c²) - c)``: ≈ d² for |d| << c (L2), ≈ 2c·|d| beyond (L1), smooth in between.
    Smooth-L1-kohya: the same without the leading c, ``2·(sqrt(d² + c²) - c)``: ≈ d²/c near 0, ≈ 2|d| beyond.
    """
    c = c.to(diff.dtype).reshape(-1, *([1] * (diff.ndim - 1)))
    core = 2.0 * (torch.sqrt(diff * diff + c * c) - c)
    return c * core if kind == "Huber" else core


# ----------------------------------------------------------------------------------------- debiased
def debiased_weights(schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased-estimation loss weight per sample, as kohya's ``apply_debiased_estimation``.

    Source: Yu et al., "Debias the Training of Diffusion Models" (arXiv 2310.08442); kohya-ss/sd-scripts
    ``library/custom_train_functions.py``. In words: with the SNR clamped at 1000, an ε loss is weighted
    by ``1/sqrt(SNR)`` and a v loss by ``1/(SNR + 1)``, so the nearly clean timesteps (large SNR), which
    the plain loss over-weights, count less. kohya multiplies it after the min-SNR weight; so do we.
    """
    snr = schedule.snr(t).to(t.device).float().clamp(max=DEBIASED_SNR_MAX)
    return 1.0 / (snr + 1.0) if prediction_type == "v_prediction" else 1.0 / snr.sqrt()


# ----------------------------------------------------------------------------------------- noise
def offset_strength(offset: float, random_strength: bool, generator: torch.Generator) -> float:
    """kohya's ``noise_offset_random_strength``: the offset scaled by one U(0, 1) draw per batch."""
    if not offset or not random_strength:
        return offset
    return float(torch.rand((1,), generator=generator)) * offset


def perturbed_input_noise(noise: torch.Tensor, gamma: float, random_strength: bool,
                          generator: torch.Generator) -> torch.Tensor:
    """The noise that goes into the noised *input* under input perturbation; the target keeps ``noise``.

    Source: Ning et al., "Input Perturbation Reduces Exposure Bias in Diffusion Models" (arXiv 2301.11706);
    kohya-ss/sd-scripts ``get_noise_noisy_latents_and_timesteps``. In words: ``x_t`` is made from
    ``noise + γ·ξ`` (ξ fresh standard normal noise) while the loss still asks for ``noise`` (or the v built
    from it), so the model learns to undo a slightly wrong ``x_t`` as it meets at sampling time.
    ``random_strength``: γ scaled by one U(0, 1) draw per batch. γ = 0 draws nothing (runs unchanged).
    """
    if not gamma:
        return noise
    strength = float(torch.rand((1,), generator=generator)) * gamma if random_strength else gamma
    xi = torch.randn(noise.shape, generator=generator).to(device=noise.device, dtype=noise.dtype)
    return noise + strength * xi


def loss_metadata(s) -> dict:
    """The kohya metadata keys of these options (``ss_loss_type`` …), as kohya's train_network writes them."""
    return {
        "ss_loss_type": KOHYA_LOSS_TYPE.get(s.train_loss_function, s.train_loss_function),
        "ss_huber_schedule": s.huber_schedule,
        "ss_huber_c": s.huber_c,
        "ss_huber_scale": s.huber_scale,
        "ss_debiased_estimation": bool(s.debiased_estimation),
        "ss_ip_noise_gamma": s.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": bool(s.ip_noise_gamma_random_strength),
        "ss_noise_offset_random_strength": bool(s.noise_offset_random_strength),
    }


def extra_weights(schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str,
                  options: Optional[LossOptions]) -> Optional[torch.Tensor]:
    """Per-sample weights beyond min-SNR (debiased estimation), or None."""
    if options is None or not options.debiased:
        return None
    return debiased_weights(schedule, t, prediction_type)
