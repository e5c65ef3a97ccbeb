"""kohya-ss/sd-scripts' command line for a bench case: the same checkpoint, images and settings as ours.

Why each flag: rank/alpha/lr/AdamW/constant schedule/seed as ours; ``--max_grad_norm`` set
explicitly (kohya clips at 1.0 by default, ours is set to the same); ``--cache_latents``,
``--sdpa`` and no gradient checkpointing, as ours trains; ``--mixed_precision no`` when ours
resolves to fp32 (CPU), else the same half dtype; ``--max_data_loader_n_workers 0`` so peak RSS
is one process's. UNet-only runs add ``--network_train_unet_only`` (and on SDXL
``--cache_text_encoder_outputs``, as ours keeps the frozen encoders out of the step).
``--tokenizer_cache_dir`` points at a folder holding our tokenizer under the hub ids kohya
asks for, so nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .case import Case

SCRIPTS = {"sd15": "train_network.py", "sdxl": "sdxl_train_network.py"}
TOKENIZER_IDS = {"sd15": ("openai/clip-vit-large-patch14",),
                 "sdxl": ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")}
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def check(case: Case, sd_scripts: Path) -> Path:
    """The script kohya runs for ``case``; one clear line when the case or the checkout can't be run."""
    if case.name not in SCRIPTS:
        raise UserError(f"--kohya: the {case.name!r} case has no kohya counterpart (use sd15 or sdxl)")
    if case.blocks:
        raise UserError("--kohya: kohya's LoRA trains every UNet block; leave --blocks out for a side-by-side run")
    if case.extra:
        raise UserError("--kohya: --set changes only our run; leave it out for a side-by-side run")
    script = Path(sd_scripts) / SCRIPTS[case.name]
    if not script.is_file():
        raise UserError(f"--kohya: {script} not found: point --kohya at a kohya-ss/sd-scripts checkout")
    return script


def tokenizer_cache(tokenizer: Path, folder: Path, case: Case) -> Path:
    """A ``--tokenizer_cache_dir`` for kohya: our tokenizer files under each hub id it loads."""
    for hub_id in TOKENIZER_IDS[case.name]:
        dest = folder / hub_id.replace("/", "_")
        dest.mkdir(parents=True, exist_ok=True)
        for f in Path(tokenizer).iterdir():
            if f.is_file():
                shutil.copyfile(f, dest / f.name)
    return folder


def command(case: Case, sd_scripts: Path, checkpoint: Path, data_dir: Path, tokenizer_cache_dir: Path,
            output_dir: Path, dtype: str, output_name: str = "kohya-bench") -> list[str]:
    """``[script, args...]`` of kohya's training for ``case``; ``dtype`` is ours resolved (e.g. 'float32')."""
    script = check(case, sd_scripts)
    if dtype not in MIXED_PRECISION:
        raise UserError(f"--kohya: no kohya mixed precision for {dtype}")
    args = [str(script),
            "--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(data_dir),
            "--caption_extension", ".txt", "--resolution", f"{case.resolution},{case.resolution}",
            "--train_batch_size", str(case.batch), "--max_train_steps", str(case.steps),
            "--network_module", "networks.lora", "--network_dim", str(case.rank),
            "--network_alpha", f"{case.alpha:g}", "--optimizer_type", "AdamW",
            "--learning_rate", f"{case.learning_rate:g}", "--lr_scheduler", "constant",
            "--max_grad_norm", f"{case.grad_clip:g}", "--mixed_precision", MIXED_PRECISION[dtype],
            "--save_precision", "fp16", "--sdpa", "--cache_latents", "--max_data_loader_n_workers", "0",
            "--seed", "1", "--save_model_as", "safetensors", "--tokenizer_cache_dir", str(tokenizer_cache_dir),
            "--output_dir", str(output_dir), "--output_name", output_name]
    if not case.train_text_encoder:
        args.append("--network_train_unet_only")
        if case.name == "sdxl":
            args.append("--cache_text_encoder_outputs")
    return args


def environment(pythonpath: Optional[str]) -> dict:
    """The child's environment: kohya's own packages (``--kohya-pythonpath``) first, offline hub."""
    env = dict(os.environ)
    paths = [p for p in (pythonpath or os.environ.get("SHINKANSEN_KOHYA_PYTHONPATH", "")).split(os.pathsep) if p]
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"--kohya-pythonpath: {p} is not a folder")
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env
