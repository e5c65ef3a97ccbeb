"""Difference (copier learning): a slider LoRA from an original and a target image.

Pass 1 trains a *copier* that reproduces the original image (denoising loss on its latent).
Pass 2 freezes the copier, applies it at weight 1, and trains a new LoRA the same way on the
target image, so the new LoRA learns only what differs. Only the pass-2 LoRA is the product
(the copier is saved as ``NAME_copy`` with ``diff_save_1st_pass`` or ``diff_1st_pass_only``;
``diff_load_1st_pass`` loads a copier instead of training one). With ``use_2nd_pass_settings``
the fields SPEC §4 lists take their 2nd-pass values, and the saved metadata describes pass 2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..diffusion import denoising_loss, make_noise, sample_timesteps
from ..loss_terms import loss_options, perturbed_input_noise
from ..errors import UserError
from ..networks import load_lora, network_from_state_dict
from .common import (background_rgb, encode_pixels, load_image_pair, new_network, repeat_cond, training,
                     without_text_encoder)

COPY_SUFFIX = "_copy"


def prepare(s):
    """Model-free: both images readable and of the same size; a copier to load must exist."""
    pair = load_image_pair(s.original_image, s.target_image, background_rgb(s.image_alpha_background))
    copier = None
    if s.diff_load_1st_pass:
        copier = Path(s.diff_load_1st_pass)
        if not copier.is_file():
            raise UserError(f"diff_load_1st_pass: {copier} not found")
    return pair, copier


def _denoise_pass(run, s, network, latent, cond, phase: str, gen_name: str):
    bundle = run.bundle
    b = s.train_batch_size
    x0_one = latent
    cond_b = repeat_cond(cond, b)
    gen = run.register_generator(gen_name, run.generator(11 if phase == "pass 1" else 12))

    def loss_fn(step: int) -> torch.Tensor:
        x0 = x0_one.expand(b, *x0_one.shape[1:])
        noise = make_noise(x0, gen, s.noise_offset, s.multires_noise_iterations, s.multires_noise_discount,
                           offset_random=s.noise_offset_random_strength)
        t = sample_timesteps(b, s.train_min_timesteps, s.train_max_timesteps, gen, run.device,
                             s.train_fixed_timesteps_in_batch)
        noise_in = perturbed_input_noise(noise, s.ip_noise_gamma, s.ip_noise_gamma_random_strength, gen)
        pred = bundle.unet_call(bundle.schedule.add_noise(x0, noise_in, t).to(bundle.dtype), t, cond_b)
        return denoising_loss(pred, x0, noise, t, bundle.schedule, bundle.prediction_type,
                              options=loss_options(s))

    with training(run, s, train_te=False):
        return run.train(loss_fn, network, s, phase=phase)


def run(run, prepared=None) -> None:
    s1 = run.settings
    (orig_px, targ_px), copier_file = prepared or prepare(s1)
    s2 = s1.for_second_pass() if s1.use_2nd_pass_settings else s1
    bundle = run.bundle
    orig, targ = encode_pixels(run, orig_px), encode_pixels(run, targ_px)
    size = (orig.shape[-2] * 8, orig.shape[-1] * 8)
    with torch.no_grad():
        cond = run.encode_prompts([s1.lora_trigger_word], size=size)
    run.extra_metadata.update({"ss_resolution": str(size), "ss_num_train_images": 2})

    s1n = without_text_encoder(run, s1)
    if copier_file is not None:
        tensors, _ = load_lora(copier_file)
        copier = network_from_state_dict(bundle, tensors, source=str(copier_file)).to(run.device).apply_to(bundle)
        run.message(f"copier loaded from {copier_file}")
    else:
        copier = new_network(run, s1n, seed_offset=1, resume=False)
        try:
            result = _denoise_pass(run, s1n, copier, orig, cond, "pass 1", "noise1")
        except BaseException:
            copier.remove()
            raise
        if s1.diff_save_1st_pass or s1.diff_1st_pass_only:
            run.save(copier, s1, steps=result.steps, name=s1.save_lora_name + COPY_SUFFIX,
                     extra={"shinkansen_pass": "1 (copier)"})
        if s1.diff_1st_pass_only:
            copier.remove()
            return
    try:
        copier.freeze()
        copier.multiplier = 1.0
        s2n = without_text_encoder(run, s2)
        network = new_network(run, s2n, seed_offset=2, resume=False)
        try:
            # Both the copier and the new LoRA are on for the trained prediction (hooks add up).
            result = _denoise_pass(run, s2n, network, targ, cond, "pass 2", "noise2")
            run.save(network, s2n, steps=result.steps, extra={"shinkansen_pass": "2"})
        finally:
            network.remove()
    finally:
        copier.remove()
