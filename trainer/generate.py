"""Text-to-image sampling on a ModelBundle: the CLI ``generate`` and the Samples tab share it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path
from .errors import UserError
from .models.bundle import ModelBundle
from .models.sampling import cfg_denoiser, ddim_sample, euler_sample

SAMPLERS = {"ddim": ddim_sample, "euler": euler_sample}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] image batch → PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def grid(images: Sequence[Image.Image], cols: Optional[int] = None) -> Image.Image:
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


@torch.no_grad()
def generate(bundle: ModelBundle, prompts: Sequence[str], seeds: Sequence[int], negative: str = "",
             steps: int = 20, cfg: float = 5.0, size: Optional[tuple[int, int]] = None,
             sampler: str = "ddim", clip_skip: Optional[int] = None, batch_size: int = 8) -> list[Image.Image]:
    """One image per (prompt, seed) pair; each seed's noise is drawn alone, so a batch never changes an image."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must pair up")
    if sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps < 1 or steps > 1000:
        raise UserError(f"steps must be between 1 and 1000, got {steps}")
    h, w = size or bundle.native_size
    if h % 8 or w % 8:
        raise UserError(f"size {h},{w}: height and width must be multiples of 8")
    latent_shape = (bundle.config.unet.in_channels, h // 8, w // 8)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[start:start + batch_size]), list(seeds[start:start + batch_size])
        cond = bundle.encode_prompts(ps, size=(h, w), clip_skip=clip_skip)
        uncond = bundle.encode_prompts([negative] * len(ps), size=(h, w), clip_skip=clip_skip)
        cond, uncond = bundle.match_lengths(cond, uncond)
        noise = torch.cat([torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(int(s)))
                           for s in ss]).to(bundle.device)
        model_fn = cfg_denoiser(bundle.unet_call, cond, uncond, cfg)
        latents = SAMPLERS[sampler](model_fn, noise.shape, bundle.schedule, steps=steps,
                                    prediction_type=bundle.prediction_type, x_T=noise, device=bundle.device)
        images += to_pil(bundle.decode_latents(latents))
    return images


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """``PATH[:WEIGHT]`` (a Windows drive letter is not mistaken for a weight)."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            path, weight = head, float(tail)
        except ValueError:
            path = text
    return Path(path), weight


def apply_loras(bundle: ModelBundle, loras: Sequence[tuple]) -> list:
    """Load LoRA files onto the bundle at their weights; returns the networks (call ``.remove()`` to undo)."""
    from .networks import load_lora, network_from_state_dict
    nets = []
    for path, weight in loras:
        if not Path(path).is_file():
            raise UserError(f"--lora: {path} not found")
        tensors, _ = load_lora(path)
        net = network_from_state_dict(bundle, tensors, source=str(path)).to(bundle.device)
        net.requires_grad_(False)
        net.multiplier = float(weight)
        net.apply_to(bundle)
        nets.append(net)
    return nets


def generate_to_file(*, prompts: Sequence[str], output: Path, loras: Sequence[str] = (), negative: str = "", seed: int = 0, steps: int = 20,
                     cfg: float = 5.0, size=None, sampler: str = "ddim", clip_skip=None, num_images: int = 1,
                     model=None, vae=None, prediction=None, tokenizer=None, device=None,
                     log: Callable[[str], None] = print) -> Path:
    from .models.loader import load_model_or_default
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise UserError(f"{output}: the output must be a .png file")
    if not output.parent.exists():
        raise UserError(f"{output.parent}: output folder does not exist")
    if num_images < 1:
        raise UserError("--num-images must be at least 1")
    parsed = [parse_lora_arg(x) for x in loras]
    for path, _ in parsed:
        if not path.is_file():
            raise UserError(f"--lora: {path} not found")
    bundle = load_model_or_default(model, vae=vae, prediction_type=prediction, tokenizer=tokenizer,
                                   device=device, log=log)
    apply_loras(bundle, parsed)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seed + i for i in range(num_images)]
    imgs = generate(bundle, [p for p in prompts for _ in seeds], seeds * len(prompts), negative=negative,
                    steps=steps, cfg=cfg, size=size, sampler=sampler, clip_skip=clip_skip)
    image = imgs[0] if len(imgs) == 1 else grid(imgs, cols=num_images if len(prompts) > 1 else None)
    with atomic_path(output) as tmp:
        image.save(tmp, format="PNG")
    return output
