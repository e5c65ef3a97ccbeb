"""The pieces every denoising objective shares: timesteps, noise, losses, min-SNR weights.

All random draws take an explicit CPU ``torch.Generator`` and are moved to the device
afterwards, so a seed gives the same run on any device and a saved generator state resumes
the exact sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .loss_terms import HUBER_KINDS, LossOptions, extra_weights, huber_threshold, offset_strength, pseudo_huber
from .models.schedule import NoiseSchedule

LOSSES = ("MSE", "L1", "Smooth-L1", *HUBER_KINDS)


def sample_timesteps(batch: int, low: int, high: int, generator: torch.Generator, device,
                     fixed_in_batch: bool = False) -> torch.Tensor:
    """Uniform integers in ``[low, high)``; one shared value for the batch if ``fixed_in_batch``."""
    if fixed_in_batch:
        t = torch.randint(low, high, (1,), generator=generator).expand(batch).clone()
    else:
        t = torch.randint(low, high, (batch,), generator=generator)
    return t.to(device)


def make_noise(like: torch.Tensor, generator: torch.Generator, offset: float = 0.0,
               multires_iterations: int = 0, multires_discount: float = 0.3,
               offset_random: bool = False) -> torch.Tensor:
    """Gaussian noise shaped like ``like``, with optional offset noise (``offset_random``: kohya's
    random strength) and multi-resolution (pyramid) noise."""
    b, c, h, w = like.shape
    noise = torch.randn((b, c, h, w), generator=generator)
    offset = offset_strength(offset, offset_random, generator)
    if offset:
        noise = noise + offset * torch.randn((b, c, 1, 1), generator=generator)
    if multires_iterations > 0:
        for i in range(1, multires_iterations + 1):
            r = float(torch.rand((), generator=generator)) * 2 + 2
            sh, sw = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
            coarse = torch.randn((b, c, sh, sw), generator=generator)
            noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * multires_discount ** i
            if sh == 1 and sw == 1:
                break
        noise = noise / noise.std(dim=(1, 2, 3), keepdim=True)
    return noise.to(device=like.device, dtype=like.dtype)


def loss_per_sample(pred: torch.Tensor, target: torch.Tensor, kind: str = "MSE",
                    mask: Optional[torch.Tensor] = None, huber_c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Element loss averaged over all but the batch dimension (over the mask's area when given).

    ``huber_c``: the per-sample threshold the Huber kinds need (:func:`trainer.loss_terms.huber_threshold`)."""
    pred, target = pred.float(), target.float()
    if kind in HUBER_KINDS:
        if huber_c is None:
            raise ValueError(f"{kind} loss needs huber_c per sample")
        el = pseudo_huber(pred - target, huber_c.to(pred.device), kind)
    elif kind == "MSE":
        el = (pred - target).square()
    elif kind == "L1":
        el = (pred - target).abs()
    elif kind == "Smooth-L1":
        el = F.smooth_l1_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if mask is not None:
        mask = mask.to(el.dtype).expand_as(el)
        return (el * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return el.mean(dim=(1, 2, 3))


def snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR-γ loss weights (ε: min(SNR,γ)/SNR; v: min(SNR,γ)/(SNR+1)); ones when γ ≤ 0."""
    if not gamma or gamma <= 0:
        return torch.ones(t.shape[0], device=t.device)
    return schedule.min_snr_weight(t, gamma, prediction_type).to(t.device).float()


def denoising_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   schedule: NoiseSchedule, prediction_type: str, kind: str = "MSE", snr_gamma: float = 0.0,
                   mask: Optional[torch.Tensor] = None, options: Optional[LossOptions] = None,
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The standard diffusion loss against the ε or v target, min-SNR weighted, batch-averaged.

    ``options`` (from :func:`trainer.loss_terms.loss_options`) replaces ``kind``/``snr_gamma`` and adds
    kohya's extras: the Huber threshold per timestep and the debiased-estimation weight.
    ``weights`` [B] scales each sample's loss before the batch mean (kohya's ``loss_weights``: a reg image's
    ``prior_loss_weight``), so a weight-0 sample contributes nothing and the others keep their scale."""
    target = schedule.target(x0, noise, t, prediction_type)
    return weighted_loss(pred, target, t, schedule, prediction_type,
                         options or LossOptions(kind=kind, snr_gamma=snr_gamma), mask, weights)


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                  prediction_type: str, options: LossOptions, mask: Optional[torch.Tensor] = None,
                  weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample loss (Huber threshold c(t) when the kind needs one), times min-SNR, debiased and per-sample
    weights, batch-averaged: kohya's order (conditional_loss → loss_weights → mean per sample → min-SNR →
    debiased → mean)."""
    c = (huber_threshold(schedule, t, options.huber_c, options.huber_schedule, options.huber_scale)
         if options.kind in HUBER_KINDS else None)
    per = loss_per_sample(pred, target, options.kind, mask, c)
    if weights is not None:
        per = per * weights.to(per.device, per.dtype)
    per = per * snr_weights(schedule, t, options.snr_gamma, prediction_type)
    extra = extra_weights(schedule, t, prediction_type, options)
    return (per if extra is None else per * extra.to(per.device)).mean()
