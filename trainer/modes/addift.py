"""ADDifT and Multi-ADDifT: a symmetric slider trained directly on the difference of image pairs.

Step n shares one noise ε and one timestep t between the pair (A = original, B = target):

    even n:  L = w(t)‖ ε_{θ+sΔ}(q(B,ε,t), t, c) − sg[ε_θ(q(A,ε,t), t, c)] ‖²
    odd n:   L = w(t)‖ ε_{θ−s·rΔ}(q(A,ε,t), t, c) − sg[ε_θ(q(B,ε,t), t, c)] ‖²

(s = ``diff_multiplier``, r = ``diff_alt_ratio``; r < 0 regularises odd steps on pure noise).
Targets: no gradient, every network off. Timesteps are drawn uniformly from the configured
range each step (TrainTrain's typo made them a fixed 5-value cycle). Multi-ADDifT takes pairs
``name.ext`` + ``name{diff_target_name}.ext`` from a folder, bucketed like LoRA images, each
pair with its own caption (TrainTrain read a misspelt key and never used them).
"""
from __future__ import annotations

import torch

from ..data import BucketBatchSampler, discover_pairs, encode_dataset
from ..diffusion import make_noise, sample_timesteps, weighted_loss
from ..loss_terms import loss_options
from ..networks import networks_off
from .common import (background_rgb, encode_pixels, load_image_pair, new_network, repeat_cond, training,
                     without_text_encoder)
from .lora import caption_conditioning, dataset_options


def prepare(s):
    if s.mode == "Multi-ADDifT":
        return discover_pairs(s.lora_data_directory, s.diff_target_name, dataset_options(s))
    return load_image_pair(s.original_image, s.target_image, background_rgb(s.image_alpha_background))


def _step_loss(run, s, network, a, b, cond, t, noise, step, mask=None) -> torch.Tensor:
    bundle = run.bundle
    m = s.diff_multiplier
    even = step % 2 == 0
    src, dst = (a, b) if even else (b, a)
    if not even and s.diff_alt_ratio < 0:
        src = dst = torch.zeros_like(a)     # pure noise on both: "do nothing on random inputs"
    x_src = bundle.schedule.add_noise(src, noise, t).to(bundle.dtype)
    x_dst = bundle.schedule.add_noise(dst, noise, t).to(bundle.dtype)
    with torch.no_grad(), networks_off():
        target = bundle.unet_call(x_src, t, cond)
    # Set, not scoped: a checkpointed backward recomputes the forward and must see the same multiplier.
    network.multiplier = m if even else -m * abs(s.diff_alt_ratio)
    pred = bundle.unet_call(x_dst, t, cond)
    return weighted_loss(pred, target, t, bundle.schedule, bundle.prediction_type, loss_options(s), mask)


def run(run, prepared=None) -> None:
    s, bundle = run.settings, run.bundle
    prepared = prepared if prepared is not None else prepare(s)
    gen = run.register_generator("noise", run.generator(1))
    if s.mode == "Multi-ADDifT":
        return _run_multi(run, s, prepared, gen)
    orig_px, targ_px = prepared
    a, b = encode_pixels(run, orig_px), encode_pixels(run, targ_px)
    if s.diff_revert_original_target:
        a, b = b, a
    size = (a.shape[-2] * 8, a.shape[-1] * 8)
    with torch.no_grad():
        cond = repeat_cond(run.encode_prompts([s.lora_trigger_word], size=size), s.train_batch_size)
    s = without_text_encoder(run, s)
    network = new_network(run, s)
    network.multiplier = 0.0
    try:
        bs = s.train_batch_size
        A, B = a.expand(bs, *a.shape[1:]), b.expand(bs, *b.shape[1:])

        def loss_fn(step: int) -> torch.Tensor:
            noise = make_noise(A, gen, s.noise_offset, s.multires_noise_iterations, s.multires_noise_discount,
                               offset_random=s.noise_offset_random_strength)
            t = sample_timesteps(bs, s.train_min_timesteps, s.train_max_timesteps, gen, run.device,
                                 s.train_fixed_timesteps_in_batch)
            return _step_loss(run, s, network, A, B, cond, t, noise, step)

        run.extra_metadata.update({"ss_resolution": str(size), "ss_num_train_images": 2,
                                   "shinkansen_diff_multiplier": s.diff_multiplier})
        with training(run, s, train_te=False):
            result = run.train(loss_fn, network)
        run.save(network, steps=result.steps)
    finally:
        network.remove()


def _run_multi(run, s, pairs, gen) -> None:
    bundle = run.bundle
    for line in pairs.report.lines():
        run.message(line)
    origs = encode_dataset([p for p, _ in pairs.placements], bundle, batch_size=max(1, s.train_batch_size))
    targs = encode_dataset([q for _, q in pairs.placements], bundle, batch_size=max(1, s.train_batch_size))
    if s.diff_revert_original_target:
        origs, targs = targs, origs
    with torch.no_grad():
        text = {c: run.encode_prompts([c]) for c in sorted({x.caption for x in origs})}
    s = without_text_encoder(run, s)
    network = new_network(run, s)
    network.multiplier = 0.0
    sampler = BucketBatchSampler.from_samples(origs, s.train_batch_size, run.seed)
    try:
        def loss_fn(step: int) -> torch.Tensor:
            idx = next(sampler)
            a = torch.stack([origs[i].mean for i in idx]).to(run.device)
            b = torch.stack([targs[i].mean for i in idx]).to(run.device)
            size = (a.shape[-2] * 8, a.shape[-1] * 8)
            cond = caption_conditioning(run, [origs[i].caption for i in idx], size, text, train_te=False)
            noise = make_noise(a, gen, s.noise_offset, s.multires_noise_iterations, s.multires_noise_discount,
                               offset_random=s.noise_offset_random_strength)
            t = sample_timesteps(a.shape[0], s.train_min_timesteps, s.train_max_timesteps, gen, run.device,
                                 s.train_fixed_timesteps_in_batch)
            mask = None
            if s.diff_use_diff_mask:   # where the pair differs (latent-space, dilated by the blur of pooling)
                diff = (a - b).abs().amax(dim=1, keepdim=True)
                mask = (torch.nn.functional.max_pool2d(diff, 3, 1, 1) > 0.05 * diff.amax()).float()
            return _step_loss(run, s, network, a, b, cond, t, noise, step, mask)

        run.extra_metadata.update({"ss_num_train_images": len(pairs.pairs) * 2,
                                   "shinkansen_diff_multiplier": s.diff_multiplier})
        with training(run, s, train_te=False):
            result = run.train(loss_fn, network, state=sampler)
        run.save(network, steps=result.steps)
    finally:
        network.remove()
