"""The tiny SD1-architecture model: its config, a small CLIP-format tokenizer, and files.

Same block structure as SD1.5 (four levels, two res blocks, attention at three levels,
1x1-conv projections, f=8 VAE, CLIP text encoder) with small widths, so every code path
and every LoRA block name of SD1 applies, while a training step takes milliseconds.

The tokenizer is a genuine CLIP byte-level BPE (vocab.json + merges.txt) whose merges make
each word of a given vocabulary one token; any other text falls back to byte tokens.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from .configs import ModelConfig, TextEncoderSpec, VAEConfig, SD1_TE_PREFIX, clip_l_config
from .unet import UNetConfig

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

TINY_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=64)


def byte_symbols() -> list[str]:
    """CLIP's reversible byte → printable-unicode table, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tokenizer(folder: os.PathLike, words: Iterable[str]) -> dict[str, int]:
    """Write a CLIP-format tokenizer folder in which every word of ``words`` is one token.

    Layout as CLIP's own vocabulary: 256 byte symbols, the same with ``</w>``, then the
    merge results in merge order, then the two special tokens (so BOS/EOS are the last ids).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    enc = dict(zip(range(256), byte_symbols()))
    vocab: list[str] = [enc[b] for b in range(256)] + [enc[b] + "</w>" for b in range(256)]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted(dict.fromkeys(w.lower() for w in words if w)):
        chars = [enc[b] for b in word.encode("utf-8")]
        if len(chars) < 2:
            continue
        symbols = chars[:-1] + [chars[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                vocab.append(merged)
                known.add(merged)
            left = merged
    vocab += [BOS, EOS]
    ids = {tok: i for i, tok in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "errors": "replace",
         "add_prefix_space": False, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS},
        indent=2), encoding="utf-8")
    return ids


def tiny_config(vocab_size: int, bos_id: int, eos_id: int) -> ModelConfig:
    """SD1 structure with model_channels 32 (a multiple of 32: ldm's GroupNorm has 32 groups)."""
    unet = UNetConfig(model_channels=32, num_heads=4, context_dim=TINY_TEXT["hidden_size"],
                      attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4))
    vae = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), resolution=64)
    text = clip_l_config(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                         **TINY_TEXT)
    return ModelConfig("sd1", unet, vae, [TextEncoderSpec("clip_l", SD1_TE_PREFIX, "hf", text, eos_id)])


def ldm_yaml(config: ModelConfig, text_encoder_folder: str, parameterization: str = "eps") -> str:
    """An ldm ``v1-inference``-style YAML for a tiny checkpoint (what the WebUI reads beside it)."""
    u, v = config.unet, config.vae
    te = config.text_encoders[0].config
    return f"""model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {config.scale_factor}
    use_ema: False
    parameterization: "{parameterization}"
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: {u.in_channels}
        out_channels: {u.out_channels}
        model_channels: {u.model_channels}
        attention_resolutions: {list(u.attention_resolutions)}
        num_res_blocks: {u.num_res_blocks}
        channel_mult: {list(u.channel_mult)}
        num_heads: {u.num_heads}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {u.context_dim}
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {v.embed_dim}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {v.z_channels}
          resolution: {v.resolution}
          in_channels: {v.in_channels}
          out_ch: {v.out_ch}
          ch: {v.ch}
          ch_mult: {list(v.ch_mult)}
          num_res_blocks: {v.num_res_blocks}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {text_encoder_folder}
# text encoder: CLIP {te['hidden_size']} wide, {te['num_hidden_layers']} layers, {te['num_attention_heads']} heads
"""
