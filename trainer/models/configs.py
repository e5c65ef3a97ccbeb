"""Model families, built-in configs, and working out a checkpoint's config from its shapes.

A checkpoint says what it is through its keys and shapes; we never need a hub config.
Widths, depths and level structure are read from tensor shapes; the one thing shapes
cannot tell (attention head split, and whether SD2 predicts ε or v) comes from the
family's convention, a ``NAME.yaml`` beside the checkpoint, or the caller.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from .checkpoint_io import CheckpointError
from .text_encoders import (ROLES, clip_l_config, load_text_config, openclip_bigg_config, openclip_config,
                            openclip_h_config)
from .unet import UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."

SCALE_FACTORS = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
FAMILY_TITLES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    attn_resolutions: tuple = ()
    double_z: bool = True
    dropout: float = 0.0

    def kwargs(self) -> dict:
        return {"ch": self.ch, "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
                "z_channels": self.z_channels, "embed_dim": self.embed_dim, "in_channels": self.in_channels,
                "out_ch": self.out_ch, "resolution": self.resolution,
                "attn_resolutions": list(self.attn_resolutions), "double_z": self.double_z, "dropout": self.dropout}


@dataclass
class TextEncoderSpec:
    """One text encoder: its role (prefix, key layout and conditioning rule) and transformers config."""
    role: str                 # a key of text_encoders.ROLES: "sd1", "sd2", "sdxl_te1", "sdxl_te2"
    config: Any               # transformers CLIPTextConfig

    @property
    def prefix(self) -> str:
        return ROLES[self.role].prefix


@dataclass
class ModelConfig:
    family: str                                   # "sd1" | "sd2" | "sdxl"
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: list
    prediction_type: str = "epsilon"
    scale_factor: float = 0.18215
    clip_skip_default: int = 1
    tokenizer: Optional[str] = None               # folder or hub id; None = family default
    native_size: tuple = (512, 512)               # (height, width) in pixels the model was trained at

    @property
    def title(self) -> str:
        return FAMILY_TITLES[self.family] + (" v-prediction" if self.prediction_type == "v_prediction" else "")


def builtin_config(name: str) -> ModelConfig:
    """Configs of the released base models, so no hub access is ever needed."""
    if name in ("sd15", "sd1"):
        return ModelConfig("sd1", UNetConfig(), VAEConfig(),
                           [TextEncoderSpec("sd1", clip_l_config())])
    if name in ("sd21", "sd2", "sd21v", "sd2v"):
        return ModelConfig("sd2", UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
                           VAEConfig(),
                           [TextEncoderSpec("sd2", openclip_h_config())],
                           prediction_type="v_prediction" if name.endswith("v") else "epsilon",
                           native_size=(768, 768) if name.endswith("v") else (512, 512))
    if name in ("sdxl", "sdxl_base"):
        return ModelConfig("sdxl", UNetConfig(attention_resolutions=(4, 2), channel_mult=(1, 2, 4), num_head_channels=64,
                                              transformer_depth=(1, 2, 10), context_dim=2048,
                                              use_linear_in_transformer=True, adm_in_channels=2816),
                           VAEConfig(),
                           [TextEncoderSpec("sdxl_te1", clip_l_config()),
                            TextEncoderSpec("sdxl_te2", openclip_bigg_config())],
                           scale_factor=SCALE_FACTORS["sdxl"], native_size=(1024, 1024))
    raise KeyError(f"unknown built-in config {name!r} (sd15, sd21, sd21v, sdxl)")


# ---------------------------------------------------------------- detection from keys/shapes

def detect_family(shapes: Mapping[str, Any], source: str = "checkpoint") -> str:
    """``sd1``/``sd2``/``sdxl`` from key names and shapes; unsupported models get a clear error."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("model.diffusion_model.joint_blocks") or has("joint_blocks."):
        raise CheckpointError(f"{source}: SD3 checkpoints are not supported (yet)")
    if has("model.diffusion_model.double_blocks") or has("double_blocks.") or has("double_stream"):
        raise CheckpointError(f"{source}: Flux checkpoints are not supported (yet)")
    if not has(UNET_PREFIX):
        if has("down_blocks.") or has("unet.down_blocks."):
            raise CheckpointError(f"{source}: diffusers-format weights; use a single-file .safetensors checkpoint")
        if has("lora_unet_") or has("lora_te"):
            raise CheckpointError(f"{source}: this is a LoRA, not a model checkpoint")
        raise CheckpointError(f"{source}: not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None:
        in_ch = _shape(conv_in)[1]
        if in_ch == 9:
            raise CheckpointError(f"{source}: inpainting models are not supported for training")
        if in_ch != 4:
            raise CheckpointError(f"{source}: UNet takes {in_ch} input channels (e.g. instruct-pix2pix); "
                                  "only 4-channel text-to-image models are supported")
    if has(SDXL_TE2_PREFIX) and has(SDXL_TE1_PREFIX):
        return "sdxl"
    if has(SDXL_TE2_PREFIX):
        raise CheckpointError(f"{source}: SDXL refiner checkpoints are not supported")
    if has(SD2_TE_PREFIX):
        return "sd2"
    if has(SD1_TE_PREFIX):
        return "sd1"
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        return "sdxl"
    ctx = _context_dim(shapes)
    if ctx == 1024:
        return "sd2"
    if ctx == 2048:
        return "sdxl"
    return "sd1"


def _shape(info: Any) -> tuple:
    if hasattr(info, "shape"):
        return tuple(info.shape)
    return tuple(info)


def _context_dim(shapes: Mapping[str, Any]) -> Optional[int]:
    for k, v in shapes.items():
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            return _shape(v)[1]
    return None


def unet_config_from_shapes(shapes: Mapping[str, Any], family: str, prefix: str = UNET_PREFIX) -> UNetConfig:
    """Every UNet width and depth from tensor shapes; head split from the family's convention."""
    s = {k[len(prefix):]: _shape(v) for k, v in shapes.items() if k.startswith(prefix)}
    mc, in_ch = s["input_blocks.0.0.weight"][:2]
    out_ch = s["out.2.weight"][0]
    n_in = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    downs = sorted({int(m.group(1)) for k in s if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k))})
    levels = len(downs) + 1
    nrb = (n_in - 1 - len(downs)) // levels
    mult, attn, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        mult.append(s[f"input_blocks.{first}.0.out_layers.3.weight"][0] // mc)
        blocks = {int(m.group(1)) for k in s if (m := re.match(rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.", k))}
        if blocks:
            attn.append(2 ** level)
        depth.append(len(blocks) if blocks else 1)
    # Levels without attention keep a placeholder depth of 1, as sgm configs do.
    mid = 1 + max((int(m.group(1)) for k in s if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k))),
                  default=0)
    proj_in = next((v for k, v in s.items() if k.endswith(".proj_in.weight")), None)
    use_linear = proj_in is not None and len(proj_in) == 2
    ctx = _context_dim({prefix + k: v for k, v in s.items()}) or 768
    adm = s["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in s else None
    heads = dict(num_heads=8, num_head_channels=-1) if family == "sd1" else dict(num_heads=-1, num_head_channels=64)
    return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc, attention_resolutions=tuple(attn),
                      num_res_blocks=nrb, channel_mult=tuple(mult), transformer_depth=tuple(depth),
                      transformer_depth_middle=mid, context_dim=ctx, use_linear_in_transformer=use_linear,
                      adm_in_channels=adm, **heads)


def vae_config_from_shapes(shapes: Mapping[str, Any], prefix: str = VAE_PREFIX) -> VAEConfig:
    s = {k[len(prefix):]: _shape(v) for k, v in shapes.items() if k.startswith(prefix)}
    ch = s["encoder.conv_in.weight"][0]
    levels = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    nrb = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    mult = tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=nrb, z_channels=s["decoder.conv_in.weight"][1],
                     embed_dim=s["quant_conv.weight"][0] // 2, in_channels=s["encoder.conv_in.weight"][1],
                     out_ch=s["decoder.conv_out.weight"][0])


def _te_layers(s: Mapping[str, tuple], pattern: str) -> int:
    return 1 + max(int(m.group(1)) for k in s if (m := re.match(pattern, k)))


def text_encoder_config_from_shapes(shapes: Mapping[str, Any], role: str):
    """A transformers config from an encoder's tensor shapes (heads: CLIP's 64-wide convention)."""
    prefix = ROLES[role].prefix
    s = {k[len(prefix):]: _shape(v) for k, v in shapes.items() if k.startswith(prefix)}
    if not ROLES[role].openclip:
        root = "text_model." if any(k.startswith("text_model.") for k in s) else ""
        vocab, width = s[root + "embeddings.token_embedding.weight"]
        cfg = clip_l_config()
        cfg.vocab_size, cfg.hidden_size, cfg.projection_dim = vocab, width, width
        cfg.num_hidden_layers = _te_layers(s, rf"{re.escape(root)}encoder\.layers\.(\d+)\.")
        cfg.num_attention_heads = max(1, width // 64)
        cfg.intermediate_size = s[root + "encoder.layers.0.mlp.fc1.weight"][0]
        cfg.max_position_embeddings = s[root + "embeddings.position_embedding.weight"][0]
        return cfg
    vocab, width = s["token_embedding.weight"]
    proj = s["text_projection"][1] if "text_projection" in s else width
    cfg = openclip_config(width, _te_layers(s, r"transformer\.resblocks\.(\d+)\."), max(1, width // 64),
                          s["transformer.resblocks.0.mlp.c_fc.weight"][0], proj)
    cfg.vocab_size = vocab
    cfg.max_position_embeddings = s["positional_embedding"][0]
    return cfg


def config_from_shapes(shapes: Mapping[str, Any], source: str = "checkpoint") -> ModelConfig:
    family = detect_family(shapes, source)
    try:
        unet = unet_config_from_shapes(shapes, family)
        vae = (vae_config_from_shapes(shapes) if any(k.startswith(VAE_PREFIX) for k in shapes) else VAEConfig())
        roles = {"sd1": ["sd1"], "sd2": ["sd2"], "sdxl": ["sdxl_te1", "sdxl_te2"]}[family]
        tes = [TextEncoderSpec(r, text_encoder_config_from_shapes(shapes, r)) for r in roles]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: incomplete {FAMILY_TITLES[family]} checkpoint (missing {e})") from None
    native = {"sd1": (512, 512), "sd2": (768, 768), "sdxl": (1024, 1024)}[family]
    return ModelConfig(family, unet, vae, tes, scale_factor=SCALE_FACTORS[family], native_size=native)


# ---------------------------------------------------------------- NAME.yaml beside a checkpoint

def apply_yaml(config: ModelConfig, yaml_path: Path) -> ModelConfig:
    """Take what shapes cannot tell from an ldm-style YAML: head split, v-prediction, text-encoder folder."""
    import yaml
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        params = data["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise CheckpointError(f"{yaml_path}: unreadable model config ({type(e).__name__})") from None
    unet = config.unet
    up = (params.get("unet_config") or {}).get("params") or {}
    if "num_heads" in up or "num_head_channels" in up:
        unet = replace(unet, num_heads=int(up.get("num_heads", -1)), num_head_channels=int(up.get("num_head_channels", -1)))
    pred = config.prediction_type
    if params.get("parameterization") == "v":
        pred = "v_prediction"
    elif params.get("parameterization") == "eps":
        pred = "epsilon"
    scale = float(params.get("scale_factor", config.scale_factor))
    native = config.native_size
    if isinstance(params.get("image_size"), int):   # ldm's image_size is the latent size
        native = (params["image_size"] * 8, params["image_size"] * 8)
    tokenizer = config.tokenizer
    tes = list(config.text_encoders)
    cond = (params.get("cond_stage_config") or {}).get("params") or {}
    version = cond.get("version")
    if isinstance(version, str):
        folder = Path(version) if Path(version).is_absolute() else yaml_path.parent / version
        tokenizer = str(folder) if folder.is_dir() else version   # a folder, else a hub id
        if (folder / "config.json").is_file() and tes and not ROLES[tes[0].role].openclip:
            tes[0] = replace(tes[0], config=load_text_config(folder))  # what shapes cannot tell (heads, act)
    return replace(config, unet=unet, prediction_type=pred, scale_factor=scale, text_encoders=tes, tokenizer=tokenizer,
                   native_size=native)
