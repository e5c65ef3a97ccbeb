"""What both tools train on: a random-weight checkpoint, a tokenizer folder and a captioned image folder.

Random weights cost no download and time the same as real ones (the speed of a step does not
depend on the values). They are built from our own model classes, written once as an fp16
single-file checkpoint in the original SD key layout (the layout kohya's loaders read too) and
cached. The images sit in ``1_bench/`` so kohya's ``N_name`` folder rule reads one repeat, as ours does.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("SHINKANSEN_CACHE", Path.home() / ".cache" / "shinkansen")) / "bench"
FAMILIES = {"sd15": "sd15", "sdxl": "sdxl"}


def tokenizer_folder() -> Path:
    """A small CLIP BPE tokenizer (Hugging Face layout) that covers the toy captions."""
    from ..models.tiny import TINY_WORDS, write_tokenizer
    tok = CACHE / "tokenizer"
    if not (tok / "vocab.json").is_file():
        write_tokenizer(tok, TINY_WORDS)
    return tok


def random_state(case: str, device) -> dict:
    """The full checkpoint state (original SD key names, fp16) of ``case`` with our classes' random init.
    On the ``meta`` device it costs nothing: the key set can be checked against a real model's."""
    import torch
    from ..models.configs import builtin_config
    from ..models.text_encoders import build_text_encoder
    from ..models.unet import UNetModel
    from ..models.vae import AutoencoderKL
    cfg = builtin_config(FAMILIES[case])
    device = torch.device(device)
    out = (lambda v: v) if device.type == "meta" else (lambda v: v.cpu())
    torch.manual_seed(0)
    state = {}
    with device:        # SDXL's 2.6 G UNet parameters initialise in seconds on a GPU
        for prefix, build in (("model.diffusion_model.", lambda: UNetModel(cfg.unet)),
                              ("first_stage_model.", lambda: AutoencoderKL(**cfg.vae.kwargs()))):
            module = build()
            state.update({prefix + k: out(v.to(torch.float16)) for k, v in module.state_dict().items()})
            del module
        for spec in cfg.text_encoders:
            te = build_text_encoder(spec.role, spec.config)
            state.update({k: out(v.to(torch.float16) if v.is_floating_point() else v)
                          for k, v in te.checkpoint_state_dict().items()})
            del te
        if cfg.family == "sdxl":    # OpenCLIP's logit_scale: real SDXL files carry it (kohya keeps it for saving)
            state["conditioner.embedders.1.model.logit_scale"] = out(torch.tensor(4.6052, dtype=torch.float16))
    return state


def random_checkpoint(case: str) -> Path:
    """The cached random-weight checkpoint of ``case`` (sd15 or sdxl); built on the GPU when there is one."""
    import torch
    from ..models.checkpoint_io import save_safetensors_atomic
    path = CACHE / f"{case}-random.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(random_state(case, "cuda" if torch.cuda.is_available() else "cpu"), path)
    return path


def image_folder(resolution: int, n: int = 8) -> Path:
    """``n`` captioned toy images at ``resolution``², in ``data-RES/1_bench`` (kohya: 1 repeat)."""
    from ..world import toy
    root = CACHE / f"data-{resolution}"
    sub = root / "1_bench"
    if len(list(sub.glob("*.png"))) != n:
        toy.make_dataset(sub, n, seed=1, image_size=resolution)
    return root
