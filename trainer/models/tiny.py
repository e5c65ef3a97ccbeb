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

from .configs import ModelConfig, TextEncoderSpec, VAEConfig
from .text_encoders import clip_l_config
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


def tokenizer_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP byte-level BPE vocabulary and merge list in which every word of ``words`` is one token.

    Layout as CLIP's own: 256 byte symbols, the same with ``</w>``, then the merge results in
    merge order, then the two special tokens (so BOS/EOS are the last two ids).
    """
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
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer(folder: os.PathLike, words: Iterable[str]) -> dict[str, int]:
    """Write a Hugging Face ``CLIPTokenizer`` folder for :func:`tokenizer_vocab`; returns the vocab."""
    from .tokenizer import ClipTokenizer
    vocab, merges = tokenizer_vocab(words)
    ClipTokenizer(vocab, merges).save(folder)
    return vocab


def tiny_config(vocab_size: int, bos_id: int, eos_id: int) -> ModelConfig:
    """SD1 structure with model_channels 32 (a multiple of 32: ldm's GroupNorm has 32 groups)."""
    unet = UNetConfig(model_channels=32, num_heads=4, context_dim=TINY_TEXT["hidden_size"],
                      attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4))
    # f=8 like SD (four levels), narrow: flat-coloured shapes need little capacity; keeps the file < 25 MB.
    vae = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), resolution=64)
    text = clip_l_config()
    for key, value in dict(TINY_TEXT, vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id,
                           pad_token_id=eos_id).items():
        setattr(text, key, value)
    return ModelConfig("sd1", unet, vae, [TextEncoderSpec("sd1", text)], native_size=(64, 64))


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
# text encoder: CLIP {te.hidden_size} wide, {te.num_hidden_layers} layers, {te.num_attention_heads} heads
"""


# Words the random-init tiny model's tokenizer knows before the toy world defines its own vocabulary.
TINY_WORDS = ("a", "an", "on", "the", "of", "background", "small", "large", "red", "green", "blue", "yellow",
              "purple", "orange", "white", "black", "gray", "circle", "square", "triangle", "zq", "zkx")


TEXT_MODEL_PREFIX = "cond_stage_model.transformer."   # SD1 checkpoint prefix of transformers' CLIPTextModel


def write_text_encoder_weights(checkpoint_state: dict, te_dir: os.PathLike) -> Path:
    """``text_encoder/model.safetensors``: the checkpoint's own text model under transformers' names.

    ldm's FrozenCLIPEmbedder (what the WebUI builds from the YAML) calls
    ``CLIPTextModel.from_pretrained(version)``, which needs weights in that folder whenever the
    WebUI does not skip it (its slow path); it then loads the checkpoint's, the same tensors.
    """
    from .checkpoint_io import save_safetensors_atomic
    path = Path(te_dir) / "model.safetensors"
    text_model = {k[len(TEXT_MODEL_PREFIX):]: v for k, v in checkpoint_state.items()
                  if k.startswith(TEXT_MODEL_PREFIX)}
    save_safetensors_atomic(text_model, path, metadata={"format": "pt"})
    return path


def write_model_files(bundle, folder: os.PathLike, name: str = "tiny-sd", dtype: torch.dtype = torch.float16) -> Path:
    """Write ``NAME.safetensors`` (SD1 single-file layout), ``NAME.yaml`` and ``text_encoder/``.

    The folder layout is the one SPEC §12 fixes for the embedded model, so any SD1 tool (and
    our own loader) reads it: the YAML's text-encoder ``version`` names the folder beside it,
    which transformers can load on its own (config, tokenizer and weights).
    """
    from .checkpoint_io import save_safetensors_atomic
    folder = Path(folder)
    te_dir = folder / "text_encoder"
    te_dir.mkdir(parents=True, exist_ok=True)
    bundle.tokenizer.save(te_dir)
    te_cfg = bundle.text_encoders[0].config.to_dict()
    te_cfg["architectures"] = ["CLIPTextModel"]
    (te_dir / "config.json").write_text(json.dumps(te_cfg, indent=2, default=str), encoding="utf-8")
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu()
             for k, v in bundle.checkpoint_state_dict().items()}
    path = folder / f"{name}.safetensors"
    save_safetensors_atomic(state, path, metadata={"format": "pt"})
    write_text_encoder_weights(state, te_dir)
    (folder / f"{name}.yaml").write_text(ldm_yaml(bundle.config, "text_encoder",
                                                   "v" if bundle.prediction_type == "v_prediction" else "eps"),
                                         encoding="utf-8")
    return path
