"""LoRA mode: the denoising loss on a captioned image folder (SPEC §4, §5).

Latents are encoded once before training; captions are encoded once too unless the text
encoder is trained (BASE selected), in which case they go through it every step.
"""
from __future__ import annotations

import torch

from ..data import BucketBatchSampler, DatasetOptions, collate, encode_dataset, load_dataset
from ..data.holdout import plan_holdout, split
from ..diffusion import denoising_loss, make_noise, sample_timesteps
from .common import background_rgb, new_network, training


def dataset_options(s) -> DatasetOptions:
    return DatasetOptions(image_size=tuple(s.image_size), image_buckets_step=s.image_buckets_step,
                          image_min_length=s.image_min_length, image_max_ratio=s.image_max_ratio,
                          image_num_multiply=s.image_num_multiply or 1, sub_image_num=s.sub_image_num,
                          image_mirroring=s.image_mirroring, image_use_filename_as_tag=s.image_use_filename_as_tag,
                          image_disable_upscale=s.image_disable_upscale, lora_trigger_word=s.lora_trigger_word,
                          background=background_rgb(s.image_alpha_background), alpha_mask=s.image_masked_loss)


def prepare(s):
    """Model-free: find and check the images, so a bad folder fails before any model is loaded."""
    dataset = load_dataset(s.lora_data_directory, dataset_options(s))
    dataset.holdout = plan_holdout(dataset, dataset_options(s), s.validation_split, s.validation_directory)
    return dataset


def caption_conditioning(run, captions, size, cache: dict, train_te: bool) -> dict:
    """Per-batch conditioning; cached per caption when the text encoder is frozen (SDXL: size ids per bucket)."""
    bundle = run.bundle
    if train_te:
        return run.encode_prompts(captions, size=size)
    conds = [cache[c] for c in captions]
    out = {"context": torch.cat([c["context"] for c in conds])}
    if "y" in conds[0]:
        pooled = torch.cat([c["y"][:, :-1536] for c in conds])
        out["y"] = torch.cat([pooled, bundle.size_embedding(len(captions), size, (0, 0), size, pooled)], dim=-1)
    return out


def run(run, dataset=None) -> None:
    s, bundle = run.settings, run.bundle
    dataset = dataset or prepare(s)
    for line in dataset.report.lines():
        run.message(line)
    cache_dir = (run.paths.log_dir / "latent_cache") if s.latent_cache_to_disk else None
    holdout = getattr(dataset, "holdout", None) or plan_holdout(dataset, dataset.options, s.validation_split,
                                                                s.validation_directory)
    val_seed = s.validation_seed if s.validation_seed is not None else run.seed
    placements, val_placements = split(dataset, holdout, val_seed)
    if val_placements:
        source = s.validation_directory or f"held out of the training images ({s.validation_split:g})"
        run.message(f"validation: {len(val_placements)} image(s), {source}")
    run.message(f"encoding {len(placements) + len(val_placements)} images")
    samples = encode_dataset(placements, bundle, batch_size=max(1, s.train_batch_size), cache_dir=cache_dir)
    val_samples = encode_dataset(val_placements, bundle, batch_size=max(1, s.train_batch_size),
                                 cache_dir=cache_dir) if val_placements else []
    network = new_network(run, s)
    try:
        train_te = network.te_count() > 0
        text_cache = {}
        if not train_te:
            with torch.no_grad():
                for caption in sorted({x.caption for x in [*samples, *val_samples]}):
                    text_cache[caption] = run.encode_prompts([caption])
        sampler = BucketBatchSampler.from_samples(samples, s.train_batch_size, run.seed)
        gen = run.register_generator("noise", run.generator(1))
        schedule, pred_type = bundle.schedule, bundle.prediction_type

        def loss_fn(step: int) -> torch.Tensor:
            batch = collate(samples, next(sampler), gen)
            x0 = batch["latents"].to(run.device)
            size = (x0.shape[-2] * 8, x0.shape[-1] * 8)
            noise = make_noise(x0, gen, s.noise_offset, s.multires_noise_iterations, s.multires_noise_discount)
            t = sample_timesteps(x0.shape[0], s.train_min_timesteps, s.train_max_timesteps, gen, run.device,
                                 s.train_fixed_timesteps_in_batch)
            cond = caption_conditioning(run, batch["captions"], size, text_cache, train_te)
            pred = bundle.unet_call(schedule.add_noise(x0, noise, t).to(bundle.dtype), t, cond)
            mask = batch["mask"].to(run.device) if (s.image_masked_loss and batch["mask"] is not None) else None
            return denoising_loss(pred, x0, noise, t, schedule, pred_type, s.train_loss_function,
                                  s.train_snr_gamma, mask)

        validate = None
        if val_samples:
            validate = validator(run, s, val_samples, network, text_cache, train_te, val_seed)
        train_images = len({p.record.rel for p in placements})
        run.extra_metadata.update({
            "ss_num_train_images": train_images,
            "ss_tag_frequency": dataset.tag_frequency(),
            "ss_dataset_dirs": {str(s.lora_data_directory): {"n_repeats": 1, "img_count": train_images}},
            "ss_resolution": str(tuple(s.image_size)),
        })
        if validate is not None:   # kohya's keys (train_network.py), ours for the folder
            run.extra_metadata.update({"ss_validation_split": s.validation_split, "ss_validation_seed": val_seed,
                                       "ss_validate_every_n_steps": s.validate_every_n_steps,
                                       "ss_num_validation_images": len(val_samples)})
            if s.validation_directory:
                run.extra_metadata["shinkansen_validation_directory"] = str(s.validation_directory)
        with training(run, s, train_te):
            result = run.train(loss_fn, network, state=sampler, validate=validate)
        run.save(network, steps=result.steps)
    finally:
        network.remove()


def validator(run, s, val_samples, network, text_cache: dict, train_te: bool, seed: int):
    """The validation loss of ``val_samples``: the training objective at fixed timesteps and noise."""
    from ..validation import Validator, fixed_timesteps
    bundle = run.bundle
    schedule, pred_type = bundle.schedule, bundle.prediction_type

    def objective(x0, noise, t, captions, mask):
        size = (x0.shape[-2] * 8, x0.shape[-1] * 8)
        cond = caption_conditioning(run, captions, size, text_cache, train_te)
        pred = bundle.unet_call(schedule.add_noise(x0, noise, t).to(bundle.dtype), t, cond)
        return denoising_loss(pred, x0, noise, t, schedule, pred_type, s.train_loss_function, s.train_snr_gamma,
                              mask if s.image_masked_loss else None)

    return Validator(val_samples, objective, seed=seed, device=run.device,
                     timesteps=fixed_timesteps(s.train_min_timesteps, s.train_max_timesteps),
                     modules=[bundle.unet, *bundle.text_encoders, network])
