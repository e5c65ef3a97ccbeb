"""Text-to-image sampling on a ModelBundle: the CLI ``generate`` and the Samples tab share it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path
from .errors import UserError
from .models.bundle import ModelBundle
from .models.sampling import cfg_denoiser, ddim_sample, euler_sample

SAMPLERS = {"ddim": ddim_sample, "euler": euler_sample}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] image batch → PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


LABEL_PAD = 3   # pixels around label text


def grid(images: Sequence[Image.Image], cols: Optional[int] = None,
         row_labels: Sequence[str] = (), col_labels: Sequence[str] = ()) -> Image.Image:
    """Images in rows of ``cols``. ``row_labels`` are drawn in a strip left of the rows and ``col_labels``
    above the columns (black on white), so a saved grid says by itself which row is which prompt or LoRA
    and which column which seed."""
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    if row_labels and len(row_labels) != rows or col_labels and len(col_labels) != cols:
        raise ValueError(f"{len(row_labels)} row / {len(col_labels)} column labels for a {rows}x{cols} grid")
    w, h = images[0].size
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    row_texts = [_wrap(t, draw, font, max(2 * w, 128)) for t in row_labels]
    col_texts = [_wrap(t, draw, font, w - 2 * LABEL_PAD) for t in col_labels]
    left = max((_text_size(t, draw, font)[0] for t in row_texts), default=-2 * LABEL_PAD) + 2 * LABEL_PAD
    top = max((_text_size(t, draw, font)[1] for t in col_texts), default=-2 * LABEL_PAD) + 2 * LABEL_PAD
    out = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, (left + (i % cols) * w, top + (i // cols) * h))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(row_texts):
        y = top + r * h + (h - _text_size(text, draw, font)[1]) // 2
        draw.multiline_text((LABEL_PAD, y), text, fill="black", font=font)
    for c, text in enumerate(col_texts):
        x = left + c * w + (w - _text_size(text, draw, font)[0]) // 2
        draw.multiline_text((x, LABEL_PAD), text, fill="black", font=font, align="center")
    return out


def _text_size(text: str, draw: ImageDraw.ImageDraw, font) -> tuple[int, int]:
    """Width and height the text's ink reaches from its origin."""
    _, _, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right, bottom


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    """Greedy word wrap to ``width`` pixels (a word longer than that keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


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
    from .models.loader import load_model_or_default, resolve_device
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise UserError(f"{output}: the output must be a .png file")
    if not output.parent.exists():
        raise UserError(f"{output.parent}: output folder does not exist")
    if num_images < 1:
        raise UserError("--num-images must be at least 1")
    device = resolve_device(device)
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
    image = imgs[0] if len(imgs) == 1 else grid(imgs, cols=num_images, row_labels=prompts,
                                                 col_labels=[f"seed {s}" for s in seeds])
    with atomic_path(output) as tmp:
        image.save(tmp, format="PNG")
    return output
