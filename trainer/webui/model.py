"""A ModelBundle over the WebUI's loaded model: our modules, the WebUI's tensors.

Why not train on the WebUI's own modules: they carry hijacks (attention replacements,
lowvram hooks, the built-in Lora's class-level forward patches). Why not reload the file:
it costs a second copy and a disk read. So our UNet / VAE / text encoders are built on
the ``meta`` device and take over *detached views* of the WebUI's tensors with
``load_state_dict(assign=True)``: same storage, but our own ``Parameter`` objects, so
``requires_grad``, ``train()``/``eval()``, hooks and ``.to()`` on the bundle never reach
the WebUI's modules. Only a dtype or device change copies (tensor by tensor).

This module reads plain attributes of the A1111 1.10 model object (``model.diffusion_model``,
``first_stage_model``, ``cond_stage_model`` / ``conditioner``) and imports nothing from the
WebUI; ``trainer/webui/adapter.py`` hands the object in.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..errors import UserError
from ..models.bundle import ModelBundle
from ..models.checkpoint_io import CheckpointError
from ..models.configs import (UNET_PREFIX, VAE_PREFIX, ModelConfig, TextEncoderSpec, apply_yaml,
                             config_from_shapes)
from ..models.schedule import NoiseSchedule
from ..models.text_encoders import load_text_encoder
from ..models.tokenizer import ClipTokenizer
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL

FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _unwrapped(key: str) -> str:
    """``wrapped.transformer...token_embedding.wrapped.weight`` → checkpoint name (A1111's hijack wrappers)."""
    return ".".join(part for part in key.split(".") if part != "wrapped")


def _state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    # state_dict() detaches: the views share storage, never the WebUI's Parameter objects.
    return {prefix + _unwrapped(k): v for k, v in module.state_dict().items()}


def text_encoder_root(sd_model):
    """The module holding the text encoders as the checkpoint names them (SDXL: the conditioner)."""
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:
        return conditioner, "conditioner."
    return sd_model.cond_stage_model, "cond_stage_model."


def checkpoint_state(sd_model) -> dict[str, torch.Tensor]:
    """The loaded model's tensors under single-file checkpoint names (views, no copy)."""
    state = _state(sd_model.model.diffusion_model, UNET_PREFIX)
    state.update({k: v for k, v in _state(sd_model.first_stage_model, VAE_PREFIX).items()
                  if not k.startswith(VAE_PREFIX + "loss.")})
    root, prefix = text_encoder_root(sd_model)
    state.update(_state(root, prefix))
    return state


def refuse_unshareable(sd_model, state: Mapping[str, torch.Tensor]) -> None:
    """What we cannot train on, said in WebUI terms (before any module is built)."""
    if any(v.dtype in FP8 for v in state.values()):
        raise UserError("the WebUI keeps this model's weights in fp8 (Settings → Optimizations → FP8 weight); "
                        "turn it off and reload the model to train on it")
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    key = getattr(getattr(sd_model, "model", None), "conditioning_key", None)
    if (conv_in is not None and conv_in.shape[1] != 4) or key in ("hybrid", "concat") \
            or getattr(sd_model, "is_sdxl_inpaint", False):
        raise UserError("the loaded model is an inpainting (or other non text-to-image) model; load a normal "
                        "checkpoint in the WebUI or pick one in the Model dropdown")
    if getattr(sd_model, "is_sd3", False):
        raise UserError("SD3 models are not supported; load an SD1, SD2 or SDXL checkpoint")


# ------------------------------------------------------------------ what shapes cannot tell

def _heads(sd_model, config: ModelConfig) -> ModelConfig:
    """Head split from the WebUI's UNet (ldm keeps ``num_heads``/``num_head_channels``), else a .yaml."""
    unet = sd_model.model.diffusion_model
    heads, width = getattr(unet, "num_heads", None), getattr(unet, "num_head_channels", None)
    if isinstance(heads, int) and isinstance(width, int):
        config.unet.num_heads, config.unet.num_head_channels = heads, width
        return config
    info = getattr(sd_model, "sd_checkpoint_info", None)
    yaml_path = Path(getattr(info, "filename", "") or "nothing").with_suffix(".yaml")
    return apply_yaml(config, yaml_path) if yaml_path.is_file() else config


def _text_configs(sd_model, config: ModelConfig) -> ModelConfig:
    """SD1 / SDXL CLIP-L: the WebUI's own transformers config (heads, activation); OpenCLIP: its heads."""
    root, _ = text_encoder_root(sd_model)
    embedders = list(getattr(root, "embedders", [])) or [root]
    specs = []
    for spec, embedder in zip(config.text_encoders, embedders):
        inner = getattr(embedder, "wrapped", embedder)
        hf_config = getattr(getattr(inner, "transformer", None), "config", None)
        if hf_config is not None and hasattr(hf_config, "hidden_size"):
            spec = TextEncoderSpec(spec.role, copy.deepcopy(getattr(hf_config, "text_config", hf_config)))
        else:
            blocks = getattr(getattr(getattr(inner, "model", None), "transformer", None), "resblocks", None)
            attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
            if isinstance(getattr(attn, "num_heads", None), int):
                spec.config.num_attention_heads = attn.num_heads
        specs.append(spec)
    config.text_encoders = specs + config.text_encoders[len(specs):]
    return config


def webui_tokenizer(sd_model) -> Optional[ClipTokenizer]:
    """Our tokenizer from the vocabulary the WebUI already loaded (HF CLIPTokenizer or open_clip's)."""
    root, _ = text_encoder_root(sd_model)
    embedders = list(getattr(root, "embedders", [])) or [root]
    for embedder in embedders:
        inner = getattr(embedder, "wrapped", embedder)
        tok = getattr(inner, "tokenizer", None) or getattr(embedder, "tokenizer", None)
        vocab, ranks = getattr(tok, "encoder", None), getattr(tok, "bpe_ranks", None)
        if isinstance(vocab, Mapping) and isinstance(ranks, Mapping) and vocab:
            merges = sorted(ranks, key=ranks.__getitem__)
            return ClipTokenizer(dict(vocab), [tuple(m) for m in merges])
        folder = getattr(tok, "name_or_path", None)
        if folder and Path(folder).is_dir():
            return ClipTokenizer.from_folder(folder)
    return None


def webui_config(sd_model, state: Mapping[str, torch.Tensor], source: str) -> ModelConfig:
    """Family and widths from the tensors; prediction type, scale and sizes from the model object."""
    try:
        config = config_from_shapes(state, source)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    config = _text_configs(sd_model, _heads(sd_model, config))
    if getattr(sd_model, "parameterization", "eps") == "v":
        config.prediction_type = "v_prediction"
        if config.family == "sd2":
            config.native_size = (768, 768)
    scale = getattr(sd_model, "scale_factor", None)
    if scale is not None:
        config.scale_factor = float(scale)
    latent = getattr(sd_model, "image_size", None)   # ldm: the latent size of the yaml
    if isinstance(latent, int) and latent > 0:
        config.native_size = (latent * 8, latent * 8)
    return config


# ------------------------------------------------------------------ the bundle

def _take(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str = "the WebUI's") -> None:
    try:
        module.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{source} {what} does not fit ({str(e).strip().splitlines()[-1].strip()[:160]})") from None


def _sub(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def bundle_from_webui(sd_model, *, tokenizer: Optional[ClipTokenizer] = None, dtype: Optional[torch.dtype] = None,
                      vae_dtype: Optional[torch.dtype] = None, device=None) -> ModelBundle:
    """ModelBundle sharing the loaded model's tensors (copies only where dtype/device differ)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    source = getattr(info, "filename", None) or "the WebUI model"
    state = checkpoint_state(sd_model)
    refuse_unshareable(sd_model, state)
    config = webui_config(sd_model, state, source)
    tokenizer = tokenizer or webui_tokenizer(sd_model)
    if tokenizer is None:
        from ..models.loader import load_tokenizer
        tokenizer = load_tokenizer(config)
    with torch.device("meta"):
        unet = UNetModel(config.unet)
        vae = AutoencoderKL(**config.vae.kwargs())
    _take(unet, _sub(state, UNET_PREFIX), "UNet")
    _take(vae, _sub(state, VAE_PREFIX), "VAE")
    encoders = [load_text_encoder(state, spec.role, spec.config, clip_skip=config.clip_skip_default)
                for spec in config.text_encoders]
    name = getattr(info, "model_name", None) or Path(source).stem
    bundle = ModelBundle(config, unet, vae, encoders, tokenizer, NoiseSchedule(), name=name, source=str(source))
    bundle.to(device=torch.device(device) if device is not None else bundle.device, dtype=dtype)  # no copy if same
    if vae_dtype is not None:
        bundle.vae.to(dtype=vae_dtype)
    return bundle.requires_grad_(False).eval()


def shares_storage(bundle: ModelBundle, sd_model) -> bool:
    """True when every UNet tensor of the bundle is the WebUI's memory (what "no second copy" means)."""
    ours = {k: v for k, v in bundle.unet.state_dict().items()}
    theirs = {_unwrapped(k): v for k, v in sd_model.model.diffusion_model.state_dict().items()}
    return all(theirs[k].untyped_storage().data_ptr() == v.untyped_storage().data_ptr() for k, v in ours.items())


def replace_vae(bundle: ModelBundle, path: Path, dtype: Optional[torch.dtype] = None) -> None:
    """A VAE file picked in the tab instead of the WebUI's (only the VAE is read from disk)."""
    from ..models.loader import _vae_state
    with torch.device("meta"):
        vae = AutoencoderKL(**bundle.config.vae.kwargs())
    try:
        state = _vae_state(Path(path))
    except CheckpointError as e:
        raise UserError(f"model_vae: {e}") from None
    _take(vae, state, "VAE", f"model_vae: {Path(path).name}:")
    bundle.vae = vae.to(device=bundle.device, dtype=dtype).requires_grad_(False).eval()
