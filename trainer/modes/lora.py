"""LoRA mode: the denoising loss on a captioned image folder (SPEC §4, §5, §16).

Latents are encoded once before training; captions are encoded once too unless the text
encoder is trained (BASE selected) or a caption option changes them every step (shuffle, tag
dropout), in which case they go through it every step. Regularisation images join the same
sample list (loss weighted by ``prior_loss_weight``); the epoch plan decides the step count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..data import BucketBatchSampler, Dataset, DatasetOptions, collate, encode_dataset, load_dataset
from ..data.caption_options import CaptionOptions, describe
from ..data.epochs import EpochPlan, batches_per_epoch, plan_epochs
from ..data.regularisation import RegImages, load_reg_images
from ..errors import UserError
from ..data.holdout import plan_holdout, split
from ..dist import global_batch
from ..diffusion import denoising_loss, make_noise, sample_timesteps
from ..loss_terms import loss_options, perturbed_input_noise
from .common import background_rgb, new_network, training


def dataset_options(s) -> DatasetOptions:
    return DatasetOptions(image_size=tuple(s.image_size), image_buckets_step=s.image_buckets_step,
                          image_min_length=s.image_min_length, image_max_ratio=s.image_max_ratio,
                          image_num_multiply=s.image_num_multiply or 1, sub_image_num=s.sub_image_num,
                          image_mirroring=s.image_mirroring, image_use_filename_as_tag=s.image_use_filename_as_tag,
                          image_disable_upscale=s.image_disable_upscale, lora_trigger_word=s.lora_trigger_word,
                          background=background_rgb(s.image_alpha_background), alpha_mask=s.image_masked_loss)


@dataclass
class LoraInputs:
    """What :func:`prepare` plans before any model work: the images, the reg images, the epoch plan."""
    dataset: Dataset
    reg: Optional[RegImages]
    plan: EpochPlan

    def __getattr__(self, name: str) -> Any:     # reads like the Dataset it wraps (report, records, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def lines(self) -> list[str]:
        return (self.dataset.report.lines() + (self.reg.lines() if self.reg else []) + self.plan.lines())


def prepare(s) -> LoraInputs:
    """Model-free: find and check the images (and reg images), plan the epochs, so a bad folder or an
    impossible length fails before any model is loaded; the plan is logged here, before the run."""
    import logging
    dataset = load_dataset(s.lora_data_directory, dataset_options(s))
    reg = None
    if s.lora_reg_directory:
        reg = load_reg_images(s.lora_reg_directory, dataset.options, dataset.buckets,
                              sum(r.repeats for r in dataset.records))
    placements = dataset.placements + (reg.placements if reg else [])
    plan = plan_epochs(s, batches_per_epoch([p.bucket for p in placements], [p.repeats for p in placements],
                                            global_batch(s.train_batch_size)))
    if plan.by_epochs and s.train_lr_warmup_steps >= plan.iterations:
        raise UserError(f"train_lr_warmup_steps: {s.train_lr_warmup_steps} must be below the "
                        f"{plan.iterations} steps that train_epochs={plan.epochs} gives")
    for line in (reg.lines() if reg else []) + plan.lines():
        logging.getLogger(__name__).info(line)
    dataset.holdout = plan_holdout(dataset, dataset.options, s.validation_split, s.validation_directory)
    return LoraInputs(dataset, reg, plan)


def caption_conditioning(run, captions, size, cache: Optional[dict], train_te: bool) -> dict:
    """Per-batch conditioning; cached per caption when the text encoder is frozen (SDXL: size ids per bucket).
    ``cache`` None: encode every step without gradients (captions that change per step)."""
    bundle = run.bundle
    if train_te:
        return run.encode_prompts(captions, size=size)
    if cache is None:
        with torch.no_grad():
            return run.encode_prompts(captions, size=size)
    conds = [cache[c] for c in captions]
    out = {"context": torch.cat([c["context"] for c in conds])}
    if "y" in conds[0]:
        pooled = torch.cat([c["y"][:, :-1536] for c in conds])
        out["y"] = torch.cat([pooled, bundle.size_embedding(len(captions), size, (0, 0), size, pooled)], dim=-1)
    return out


def _dataset_dirs(dataset: Dataset) -> dict:
    """kohya's ``ss_dataset_dirs``: per top folder (``10_cat``) its repeats and image count."""
    out: dict[str, dict[str, int]] = {}
    for r in dataset.records:
        top = r.rel.split("/")[0] if "/" in r.rel else Path(dataset.report.folder).name
        d = out.setdefault(top, {"n_repeats": r.repeats, "img_count": 0})
        d["img_count"] += 1
    return out


def run(run, dataset=None) -> None:
    s, bundle = run.settings, run.bundle
    inputs = dataset if isinstance(dataset, LoraInputs) else prepare(s)
    dataset, reg, plan = inputs.dataset, inputs.reg, inputs.plan
    if plan.iterations != s.train_iterations:   # train_epochs decided: every later use sees the derived count
        s = run.settings = s.with_overrides(train_iterations=plan.iterations)
    for line in inputs.lines():
        run.message(line)
    run.epoch_steps = plan.steps_per_epoch
    cache_dir = (run.paths.log_dir / "latent_cache") if s.latent_cache_to_disk else None
    holdout = getattr(dataset, "holdout", None) or plan_holdout(dataset, dataset.options, s.validation_split,
                                                                s.validation_directory)
    val_seed = s.validation_seed if s.validation_seed is not None else run.seed
    train_placements, val_placements = split(dataset, holdout, val_seed)
    if len(train_placements) != len(dataset.placements):   # held-out images: the epochs count what is trained
        plan = plan_epochs(s, batches_per_epoch(
            [p.bucket for p in train_placements + (reg.placements if reg else [])],
            [p.repeats for p in train_placements + (reg.placements if reg else [])],
            global_batch(s.train_batch_size)))
        if plan.iterations != s.train_iterations:
            s = run.settings = s.with_overrides(train_iterations=plan.iterations)
        run.epoch_steps = plan.steps_per_epoch
        for line in plan.lines():
            run.message(f"{line} (without the held-out images)")
    if val_placements:
        source = s.validation_directory or f"held out of the training images ({s.validation_split:g})"
        run.message(f"validation: {len(val_placements)} image(s), {source}")
    placements = train_placements + (reg.placements if reg else [])
    run.message(f"encoding {len(placements) + len(val_placements)} images")
    samples = encode_dataset(placements, bundle, batch_size=max(1, s.train_batch_size), cache_dir=cache_dir)
    val_samples = encode_dataset(val_placements, bundle, batch_size=max(1, s.train_batch_size),
                                 cache_dir=cache_dir) if val_placements else []
    weights = [1.0] * len(train_placements) + [float(s.prior_loss_weight)] * (len(placements) - len(train_placements))
    captions = CaptionOptions.from_settings(s)
    network = new_network(run, s)
    try:
        train_te = network.te_count() > 0
        text_cache: Optional[dict] = {}
        note = describe(captions, train_te)
        if note:
            run.message(note)
            text_cache = None
        elif not train_te:
            with torch.no_grad():
                texts = {t for x in samples for t in captions.cacheable_texts(x.caption)}
                for text in sorted(texts | {x.caption for x in val_samples}):
                    text_cache[text] = run.encode_prompts([text])
        # every rank draws the global batch (batch × processes) and trains its slice (trainer/dist.py)
        sampler = BucketBatchSampler.from_samples(samples, s.train_batch_size * run.dist.world_size, run.seed)
        gen = run.register_generator("noise", run.generator(1))
        caption_gen = run.register_generator("captions", run.generator(2))
        schedule, pred_type = bundle.schedule, bundle.prediction_type
        options = loss_options(s)

        def loss_fn(step: int) -> torch.Tensor:
            indices = next(sampler)
            batch = collate(samples, indices, gen)
            texts = batch["captions"]
            if captions.active:
                texts = [captions.process(c, caption_gen, sampler.epoch + 1) for c in texts]
            x0 = batch["latents"].to(run.device)
            size = (x0.shape[-2] * 8, x0.shape[-1] * 8)
            noise = make_noise(x0, gen, s.noise_offset, s.multires_noise_iterations, s.multires_noise_discount,
                               offset_random=s.noise_offset_random_strength)
            t = sample_timesteps(x0.shape[0], s.train_min_timesteps, s.train_max_timesteps, gen, run.device,
                                 s.train_fixed_timesteps_in_batch)
            noise_in = perturbed_input_noise(noise, s.ip_noise_gamma, s.ip_noise_gamma_random_strength, gen)
            mask = batch["mask"].to(run.device) if (s.image_masked_loss and batch["mask"] is not None) else None
            part = run.dist.shard(len(indices))   # this rank's slice (the whole batch in one process)
            if run.dist.active:
                x0, noise, noise_in, t, texts, indices = x0[part], noise[part], noise_in[part], t[part], \
                    texts[part], indices[part]
                mask = mask[part] if mask is not None else None
            cond = caption_conditioning(run, texts, size, text_cache, train_te)
            pred = bundle.unet_call(schedule.add_noise(x0, noise_in, t).to(bundle.dtype), t, cond)
            w = torch.tensor([weights[i] for i in indices]) if reg is not None else None
            return denoising_loss(pred, x0, noise, t, schedule, pred_type, mask=mask, options=options, weights=w)

        validate = None
        if val_samples:
            validate = validator(run, s, val_samples, network, text_cache, train_te, val_seed)
        train_records = list({id(p.record): p.record for p in train_placements}.values())
        run.extra_metadata.update({
            "ss_num_train_images": sum(r.repeats for r in train_records),   # kohya: with repeats
            "ss_tag_frequency": dataset.tag_frequency(),
            "ss_dataset_dirs": _dataset_dirs(dataset),
            "ss_resolution": str(tuple(s.image_size)),
            "ss_num_reg_images": reg.num_reg_images if reg else 0,
            "ss_reg_dataset_dirs": reg.dirs if reg else {},
            "ss_prior_loss_weight": float(s.prior_loss_weight),
            **captions.metadata(), **plan.metadata(),
        })
        if validate is not None:   # kohya's keys (train_network.py), ours for the folder
            run.extra_metadata.update({"ss_validation_split": s.validation_split, "ss_validation_seed": val_seed,
                                       "ss_validate_every_n_steps": s.validate_every_n_steps,
                                       "ss_num_validation_images": len(val_samples)})
            if s.validation_directory:
                run.extra_metadata["shinkansen_validation_directory"] = str(s.validation_directory)
        with training(run, s, train_te):
            result = run.train(loss_fn, network, s, state=sampler, validate=validate)
        run.save(network, s, steps=result.steps)
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
        return denoising_loss(pred, x0, noise, t, schedule, pred_type, mask=mask if s.image_masked_loss else None,
                              options=loss_options(s))

    return Validator(val_samples, objective, seed=seed, device=run.device,
                     timesteps=fixed_timesteps(s.train_min_timesteps, s.train_max_timesteps),
                     modules=[bundle.unet, *bundle.text_encoders, network])
