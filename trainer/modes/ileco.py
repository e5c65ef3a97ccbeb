"""iLECO: make the prompt ``original_prompt`` behave like ``target_prompt`` (empty target = erase).

    L = w(t) · ‖ ε_{θ+Δ}(z, t, c_orig) − sg[ε_θ(z, t, c_targ)] ‖²

The target is computed without gradient and with *every* network off (multiplier 0), so a
resumed LoRA can never leak into it. Unlike TrainTrain, whose noise ``z`` is drawn once for
the whole run, ``z`` is fresh each step (a LoRA fitted to one fixed noise generalises worse).

A LoRA fitted to one prompt also moves prompts whose embeddings resemble it ("orange" when
"red" goes to "blue"). ``preserve_prompts`` (like ai-toolkit's slider anchors) adds, each step,
one of them cycled in turn: ‖ ε_{θ+Δ}(z, t, c_p) − sg[ε_θ(z, t, c_p)] ‖², batched with the main
term so it costs one larger forward rather than a second one.
"""
from __future__ import annotations

import torch

from ..diffusion import loss_per_sample, sample_timesteps, snr_weights
from ..models.sampling import concat_cond
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
        with torch.no_grad():
            keep = [run.encode_prompts([p], size=(h, w)) for p in s.preserve_prompts]

        def loss_fn(step: int) -> torch.Tensor:
            z = torch.randn(shape, generator=gen).to(run.device, bundle.dtype)
            t = sample_timesteps(b, s.train_min_timesteps, s.train_max_timesteps, gen, run.device,
                                 s.train_fixed_timesteps_in_batch)
            c_in, c_out = co, ct
            if keep:   # the preserved prompt is its own target: same input in both halves of the batch
                cp = keep[step % len(keep)]
                c_in, c_out = concat_cond(co, cp, b), concat_cond(ct, cp, b)
                z, t = torch.cat([z, z]), torch.cat([t, t])
            with torch.no_grad(), networks_off():
                target = bundle.unet_call(z, t, c_out)
            pred = bundle.unet_call(z, t, c_in)
            per = loss_per_sample(pred, target, s.train_loss_function)
            return (per * snr_weights(bundle.schedule, t, s.train_snr_gamma, bundle.prediction_type)).mean()

        run.extra_metadata.update({"ss_resolution": str((h, w)), "shinkansen_original_prompt": s.original_prompt,
                                   "shinkansen_target_prompt": s.target_prompt})
        if keep:
            run.extra_metadata["shinkansen_preserve_prompts"] = "\n".join(s.preserve_prompts)
        with training(run, s, train_te=False):
            result = run.train(loss_fn, network)
        run.save(network, steps=result.steps)
    finally:
        network.remove()
