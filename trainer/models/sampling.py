"""DDIM and Euler samplers for preview images, plus a batched classifier-free-guidance wrapper.

Interface: a *denoiser* ``model_fn(x_t, t) -> out`` takes latents ``[B, C, H, W]`` and int64
timesteps ``[B]`` and returns eps or v (per ``prediction_type``), in the DDPM parameterisation of
:class:`~trainer.models.schedule.NoiseSchedule` (``x_t = sqrt(ab) x0 + sqrt(1-ab) eps``). The
samplers never see conditioning: :func:`cfg_denoiser` closes over it.

Seeds: initial (and DDIM eta) noise is always drawn with ``torch.randn(..., generator=generator)``
on the CPU and then moved, so one seed gives the same image on CPU and GPU (as A1111 does).
``x_T``, when given, is that unit-variance noise (Euler scales it by sigma_max itself), so the
two samplers start from the same draw for the same seed.

``callback``, if given, is called after every step with a dict ``{"i", "t", "x", "denoised"}``
(step index, int timestep, the new latents, the current x0 estimate), like k-diffusion's.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .schedule import NoiseSchedule, _check_prediction_type

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None]


# -- classifier-free guidance ----------------------------------------------------------------------
def _match_batch(value: Tensor, batch: int) -> Tensor:
    """Broadcast a batch-1 tensor (e.g. one shared negative prompt) to ``batch`` rows."""
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"conditioning batch {value.shape[0]} does not match latent batch {batch}")


def concat_cond(a: Any, b: Any, batch: int) -> Any:
    """Concatenate two conditionings along dim 0: tensors, dicts of tensors (recursively), or None."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([_match_batch(a, batch), _match_batch(b, batch)], dim=0)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise ValueError(f"cond and uncond have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: concat_cond(a[k], b[k], batch) for k in a}
    raise TypeError(f"cannot concatenate conditionings of types {type(a).__name__} and {type(b).__name__}")


def cfg_denoiser(unet_call: Callable[[Tensor, Tensor, Any], Tensor], cond: Any, uncond: Any,
                 scale: float) -> ModelFn:
    """Wrap ``unet_call(x, t, cond)`` into a guided denoiser ``model_fn(x, t)``.

    Cond and uncond run in one doubled batch (cond first) so each step costs one UNet call. The
    result is written ``out_c + (scale - 1) * (out_c - out_u)``, algebraically the usual
    ``out_u + scale * (out_c - out_u)`` but exactly ``out_c`` at scale 1.
    """

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        out = unet_call(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond, uncond, b))
        out_c, out_u = out.chunk(2, dim=0)
        return out_c + (scale - 1.0) * (out_c - out_u)

    return model_fn


# -- helpers -----------------------------------------------------------------------------------------
def initial_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit normal noise drawn on the CPU (device-independent for a seed), then moved."""
    return torch.randn(shape, generator=generator, device="cpu", dtype=dtype).to(device or "cpu")


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending "leading" timesteps with offset 1: ``arange(steps) * (T // steps) + 1``.

    This is ldm's ``make_ddim_timesteps(..., "uniform")`` and diffusers' DDIMScheduler with SD's
    config (``timestep_spacing="leading"``, ``steps_offset=1``): for 20 steps 951, 901, ..., 1.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    stride = num_train_timesteps // steps
    return [i * stride + 1 for i in reversed(range(steps))]


def euler_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending discrete timesteps ``round(linspace(T-1, 0, steps))`` (k-diffusion's spacing, snapped)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ts = torch.linspace(num_train_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return ts.tolist()


def _timestep_batch(t: int, batch: int, device: torch.device) -> Tensor:
    return torch.full((batch,), t, dtype=torch.long, device=device)


def _resolve_start(shape: tuple[int, ...], generator: torch.Generator | None, x_T: Tensor | None,
                   device: torch.device | str | None) -> Tensor:
    if x_T is not None:
        return x_T.to(device) if device is not None else x_T
    return initial_noise(tuple(shape), generator, device)


# -- samplers -------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_sample(model_fn: ModelFn, shape: tuple[int, ...], schedule: NoiseSchedule, steps: int = 20,
                eta: float = 0.0, generator: torch.Generator | None = None, prediction_type: str = "epsilon",
                x_T: Tensor | None = None, device: torch.device | str | None = None,
                callback: Callback | None = None, denoise_last: bool = True) -> Tensor:
    """DDIM (Song et al.) on :func:`ddim_timesteps`; returns x0 in the UNet's latent space
    (still multiplied by the VAE scale factor: divide before ``AutoencoderKL.decode``).

    Final step: SD's DDIM config has ``set_alpha_to_one=False``, i.e. the step after t=1 goes to
    alpha_prev = alphas_cumprod[0] (sigma ~ 0.029), not to a clean sample; ldm and diffusers return
    that slightly noisy x. With ``denoise_last=True`` (default) we instead return the last step's x0
    prediction -- the visible difference is nil for real models, and it makes the sampler exact for an
    exact model. ``denoise_last=False`` reproduces the ldm/diffusers output.
    """
    _check_prediction_type(prediction_type)
    x = _resolve_start(shape, generator, x_T, device)
    dev = x.device
    ab = schedule.alphas_cumprod.detach().to("cpu", torch.float64)
    ts = ddim_timesteps(steps, schedule.num_train_timesteps)
    for i, t in enumerate(ts):
        t_prev = t - schedule.num_train_timesteps // steps
        a_t = float(ab[t])
        a_prev = float(ab[t_prev]) if t_prev >= 0 else float(ab[0])
        tt = _timestep_batch(t, x.shape[0], dev)
        out = model_fn(x, tt).to(x.dtype)
        denoised = schedule.pred_x0(x, out, tt, prediction_type)
        eps = schedule.pred_eps(x, out, tt, prediction_type)
        last = i == len(ts) - 1
        if last and denoise_last:
            x = denoised
        else:
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            x = a_prev ** 0.5 * denoised + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * initial_noise(tuple(x.shape), generator, dev, x.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def euler_sample(model_fn: ModelFn, shape: tuple[int, ...], schedule: NoiseSchedule, steps: int = 20,
                 generator: torch.Generator | None = None, prediction_type: str = "epsilon",
                 x_T: Tensor | None = None, device: torch.device | str | None = None,
                 callback: Callback | None = None) -> Tensor:
    """k-diffusion-style Euler in sigma space (x = x0 + sigma * eps), ending at sigma 0.

    The sigmas are taken *at* the discrete timesteps of :func:`euler_timesteps` (k-diffusion
    interpolates log-sigma at fractional t and feeds the UNet a float t); snapping keeps the model's
    int64 timestep and its input noise level exactly consistent. The model sees
    ``x / sqrt(sigma^2 + 1)``, which is the DDPM ``x_t`` for that t.
    """
    _check_prediction_type(prediction_type)
    x_unit = _resolve_start(shape, generator, x_T, device)
    dev = x_unit.device
    sig_table = schedule.sigmas.detach().to("cpu", torch.float64)
    ts = euler_timesteps(steps, schedule.num_train_timesteps)
    sigmas = [float(sig_table[t]) for t in ts] + [0.0]
    x = x_unit * sigmas[0]
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        c_in = (sigma ** 2 + 1.0) ** -0.5
        tt = _timestep_batch(t, x.shape[0], dev)
        out = model_fn(x * c_in, tt).to(x.dtype)
        if prediction_type == "epsilon":
            denoised = x - sigma * out
        else:  # v: x0 = a * x_t - s * v with a = c_in, s = sigma * c_in, x_t = c_in * x
            denoised = c_in ** 2 * x - sigma * c_in * out
        if sigma_next == 0.0:
            x = denoised  # the Euler step to sigma 0 is exactly the x0 estimate; skip the rounding
        else:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return x
