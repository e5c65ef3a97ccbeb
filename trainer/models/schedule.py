"""The SD discrete noise schedule and the quantities training and sampling derive from it.

SD1, SD2 and SDXL all use the "scaled linear" schedule of ldm (``linear_start`` 0.00085,
``linear_end`` 0.012, 1000 steps): betas are linear in sqrt-space, then squared. Everything is
computed in float64 (as ldm's ``register_schedule`` does) and stored as float32, so the stored
tables agree with the checkpoint buffers to float32 rounding, independent of the device.

Convention: ``x_t = sqrt(ab_t) * x0 + sqrt(1 - ab_t) * eps`` with ``ab = alphas_cumprod``;
``v = sqrt(ab_t) * eps - sqrt(1 - ab_t) * x0``; Euler/k-diffusion ``sigma_t = sqrt((1 - ab_t) / ab_t)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


class NoiseSchedule:
    """Scaled-linear DDPM schedule with per-timestep lookups for batched ``t``.

    Lookups accept int64 timesteps of shape ``[B]`` on any device; the gathered coefficients are
    moved to the device of the tensor they multiply and reshaped to broadcast over ``[B, ...]``.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 device: torch.device | str | None = None) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        ab = torch.cumprod(1.0 - betas, dim=0)
        self._tables64 = {
            "betas": betas,
            "alphas_cumprod": ab,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
            "snr_table": ab / (1.0 - ab),
            "sigmas": ((1.0 - ab) / ab).sqrt(),
        }
        self.device = torch.device("cpu")
        self.to(device or "cpu")

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """Move the float32 tables (recast from the float64 originals) to ``device``; returns self."""
        self.device = torch.device(device)
        for name, table in self._tables64.items():
            setattr(self, name, table.to(torch.float32).to(self.device))
        return self

    # -- lookups -----------------------------------------------------------------------------------
    def _at(self, table: Tensor, t: Tensor, like: Tensor | None = None) -> Tensor:
        """``table[t]`` as ``[B, 1, ..., 1]`` matching ``like``'s rank, device and dtype."""
        t = torch.as_tensor(t, dtype=torch.long)
        vals = table[t.to(table.device)]
        if like is None:
            return vals
        vals = vals.to(device=like.device, dtype=like.dtype if like.is_floating_point() else vals.dtype)
        return vals.reshape(vals.shape + (1,) * (like.ndim - vals.ndim))

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ab / (1 - ab), shape of ``t``."""
        return self._at(self.snr_table, t)

    # -- forward process and targets ----------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def eps_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x0) * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The regression target for ``prediction_type`` (what the UNet is trained to output)."""
        _check_prediction_type(prediction_type)
        return self.eps_target(x0, noise, t) if prediction_type == "epsilon" else self.v_target(x0, noise, t)

    # -- inversions ------------------------------------------------------------------------------------
    def pred_x0(self, x_t: Tensor, model_out: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """Recover the x0 estimate from a model output (eps: (x_t - s*eps)/a; v: a*x_t - s*v)."""
        _check_prediction_type(prediction_type)
        a = self._at(self.sqrt_alphas_cumprod, t, x_t)
        s = self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if prediction_type == "epsilon":
            return (x_t - s * model_out) / a
        return a * x_t - s * model_out

    def pred_eps(self, x_t: Tensor, model_out: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """Recover the noise estimate from a model output (v: a*v + s*x_t)."""
        _check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return model_out
        a = self._at(self.sqrt_alphas_cumprod, t, x_t)
        s = self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return a * model_out + s * x_t

    # -- loss weighting -----------------------------------------------------------------------------
    def min_snr_weight(self, t: Tensor, gamma: float, prediction_type: str) -> Tensor:
        """Min-SNR-gamma loss weight per sample (Hang et al. 2023), shape of ``t``.

        For eps the MSE is rescaled to an x0 loss clipped at gamma: min(SNR, g) / SNR. A v loss
        already carries a factor (SNR + 1) relative to x0, hence min(SNR, g) / (SNR + 1).
        """
        _check_prediction_type(prediction_type)
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)
