"""iLECO: make the prompt ``original_prompt`` behave like ``target_prompt`` (empty target = erase).

    L = w(t) · ‖ ε_{θ+Δ}(z, t, c_orig) − sg[ ε_θ(z, t, c_targ) + g·(ε_θ(z, t, c_targ) − ε_θ(z, t, c_orig)) ] ‖²

The target is computed without gradient and with *every* network off (multiplier 0), so a
resumed LoRA can never leak into it. Unlike TrainTrain, whose noise ``z`` is drawn once for
the whole run, ``z`` is fresh each step (a LoRA fitted to one fixed noise generalises worse).

``target_guidance`` g = 0 is TrainTrain's objective. It makes the conditional prediction equal
the target's, but generation uses CFG, uncond + s·(cond − uncond), which multiplies whatever gap
is left by s: an erase that works at CFG 1 still draws the concept at CFG 5. g > 0 aims past the
target (with an empty target and g = 1 this is ESD's erase objective, negative guidance 1), so
the guided output moves away from the concept instead of stopping just short of it.

A LoRA fitted to one prompt also moves prompts whose embeddings resemble it ("orange" when
"red" goes to "blue"). ``preserve_prompts`` (like ai-toolkit's slider anchors) adds, each step,
one of them cycled in turn: ‖ ε_{θ+Δ}(z, t, c_p) − sg[ε_θ(z, t, c_p)] ‖², batched with the main
term so it costs one larger forward rather than a second one. ``preserve_unconditional`` puts
the empty prompt first in that cycle: it is the other half of CFG, and measured on the tiny
model, pinning it makes an erase far more reliable across seeds.

``z`` is pure noise, which the UNet sees only at high noise levels; the iLECO_Erase preset
therefore trains timesteps 500–999, where colour and layout are decided.
"""
from __future__ import annotations

import torch

from ..diffusion import sample_timesteps, weighted_loss
from ..loss_terms import loss_options
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
        # every rank draws the global batch (batch × processes) and trains its slice (trainer/dist.py)
        shape = (b * run.dist.world_size, bundle.config.unet.in_channels, h // 8, w // 8)
        with torch.no_grad():
            kept = ([""] if s.preserve_unconditional else []) + list(s.preserve_prompts)
            keep = [run.encode_prompts([p], size=(h, w)) for p in kept]
        c_orig, c_targ, *keep = bundle.match_lengths(c_orig, c_targ, *keep)   # long prompts share a batch
        co, ct = repeat_cond(c_orig, b), repeat_cond(c_targ, b)
        g = s.target_guidance

        def loss_fn(step: int) -> torch.Tensor:
            z = torch.randn(shape, generator=gen).to(run.device, bundle.dtype)
            t = sample_timesteps(shape[0], s.train_min_timesteps, s.train_max_timesteps, gen, run.device,
                                 s.train_fixed_timesteps_in_batch)
            part = run.dist.shard(shape[0])
            z, t = z[part], t[part]
            c_in, c_out = co, ct
            if keep:   # the preserved prompt is its own target: same input in both halves of the batch
                cp = keep[step % len(keep)]
                c_in, c_out = concat_cond(co, cp, b), concat_cond(ct, cp, b)
                z, t = torch.cat([z, z]), torch.cat([t, t])
            with torch.no_grad(), networks_off():
                if g:   # one frozen call for target and original: ε(t) + g·(ε(t) − ε(o))
                    e_t, e_o = bundle.unet_call(torch.cat([z, z]), torch.cat([t, t]),
                                                concat_cond(c_out, c_in, z.shape[0])).chunk(2)
                    target = e_t + g * (e_t - e_o)
                else:
                    target = bundle.unet_call(z, t, c_out)
            pred = bundle.unet_call(z, t, c_in)
            return weighted_loss(pred, target, t, bundle.schedule, bundle.prediction_type, loss_options(s))

        run.extra_metadata.update({"ss_resolution": str((h, w)), "shinkansen_original_prompt": s.original_prompt,
                                   "shinkansen_target_prompt": s.target_prompt})
        if g:
            run.extra_metadata["shinkansen_target_guidance"] = str(g)
        if s.preserve_prompts:
            run.extra_metadata["shinkansen_preserve_prompts"] = "\n".join(s.preserve_prompts)
        if s.preserve_unconditional:
            run.extra_metadata["shinkansen_preserve_unconditional"] = "true"
        with training(run, s, train_te=False):
            result = run.train(loss_fn, network)
        run.save(network, steps=result.steps)
    finally:
        network.remove()
