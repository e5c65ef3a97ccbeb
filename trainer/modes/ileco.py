"""iLECO: make the prompt ``original_prompt`` behave like ``target_prompt`` (empty target = erase).

    L = w(t) · ‖ ε_{θ+Δ}(z, t, c_orig) − sg[ε_θ(z, t, c_targ)] ‖²

The target is computed without gradient and with *every* network off (multiplier 0), so a
resumed LoRA can never leak into it. Unlike TrainTrain, whose noise ``z`` is drawn once for
the whole run, ``z`` is fresh each step (a LoRA fitted to one fixed noise generalises worse).
"""
from __future__ import annotations

import torch

from ..diffusion import loss_per_sample, sample_timesteps, snr_weights
from ..networks import networks_off
from .common import new_network, repeat_cond, training, without_text_encoder


def prepare(s):
    return None   # prompts only: validated by the settings schema


def run(run, prepared=None) -> None:
    s, bundle = run.settings, run.bundle
    h, w = s.image_size
    with torch.no_grad():
        c_orig = run.encode_prompts([s.original_prompt], size=(h, w))
        c_targ = run.encode_prompts([s.target_prompt], size=(h, w))
    s = without_text_encoder(run, s)
    network = new_network(run, s)
    try:
        gen = run.register_generator("noise", run.generator(1))
        b = s.train_batch_size
        shape = (b, bundle.config.unet.in_channels, h // 8, w // 8)
        co, ct = repeat_cond(c_orig, b), repeat_cond(c_targ, b)

        def loss_fn(step: int) -> torch.Tensor:
            z = torch.randn(shape, generator=gen).to(run.device, bundle.dtype)
            t = sample_timesteps(b, s.train_min_timesteps, s.train_max_timesteps, gen, run.device,
                                 s.train_fixed_timesteps_in_batch)
            with torch.no_grad(), networks_off():
                target = bundle.unet_call(z, t, ct)
            pred = bundle.unet_call(z, t, co)
            per = loss_per_sample(pred, target, s.train_loss_function)
            return (per * snr_weights(bundle.schedule, t, s.train_snr_gamma, bundle.prediction_type)).mean()

        run.extra_metadata.update({"ss_resolution": str((h, w)), "shinkansen_original_prompt": s.original_prompt,
                                   "shinkansen_target_prompt": s.target_prompt})
        with training(run, s, train_te=False):
            result = run.train(loss_fn, network)
        run.save(network, steps=result.steps)
    finally:
        network.remove()
