"""Text encoders of SD1 / SD2 / SDXL on transformers' CLIP classes, with checkpoint names.

One class, :class:`TextEncoder`, serves all four roles; a frozen :class:`Role` says how the role reads
its checkpoint and turns hidden states into conditioning (clip skip 1):

- ``SD1``      ``cond_stage_model.transformer.``, CLIP-L: final_layer_norm(hidden_states[-1])
- ``SD2``      ``cond_stage_model.model.``, OpenCLIP-H: final_layer_norm(hidden_states[-2])
- ``SDXL_TE1`` ``conditioner.embedders.0.transformer.``, CLIP-L: hidden_states[-2], no final LN
- ``SDXL_TE2`` ``conditioner.embedders.1.model.``, OpenCLIP-bigG: hidden_states[-2], no final LN,
  plus pooled = final_layer_norm(last layer)[EOT] @ projection

Clip skip ``n`` moves the chosen layer ``n - 1`` further back and keeps the role's LayerNorm choice
(SD1: A1111/kohya's ``final_layer_norm(hidden_states[-n])``; SD2: kohya's rule on its 23-layer model).

Naming: ``state_dict()`` is the checkpoint's minus the prefix under every transformers version:
``text_model.…`` (+ ``text_projection.weight`` for TE2). ``self.text_model`` is the transformers text
tower taken out of a ``CLIPTextModel`` / ``CLIPTextModelWithProjection``: ``CLIPTextTransformer`` in
4.30.2; in 5.x ``CLIPTextModel`` itself *is* the tower (its own state dict has no ``text_model.`` level),
so holding the tower as ``text_model`` gives the same names in both. Module paths are thereby the ones
kohya builds LoRA names from (``lora_te*_text_model_encoder_layers_0_self_attn_q_proj``).

The one mapping: OpenCLIP checkpoints (SD2, SDXL TE2) are renamed by :func:`openclip_to_hf` /
:func:`hf_to_openclip`: fused ``in_proj`` split into q/k/v row blocks, ``text_projection`` transposed,
``logit_scale`` (and SD2's unused ``text_projection``) held aside untouched so that mapping back
reproduces the file. Mapping only makes views, so tensors from a safetensors mmap are not copied;
:func:`load_text_encoder` builds on ``meta`` and loads with ``assign=True``, so a 700M-parameter bigG
never exists twice in memory.

Token ids come in already made ([B, 77]; SD1 padded with 49407, OpenCLIP with 0); no attention mask is
used (SD passes none). Only transformers APIs present in 4.30.2 and 5.x are used.
"""
from __future__ import annotations

import json
import os
import types
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

__all__ = [
    "PREFIX_SD1", "PREFIX_SD2", "PREFIX_SDXL_TE1", "PREFIX_SDXL_TE2",
    "Role", "SD1", "SD2", "SDXL_TE1", "SDXL_TE2", "ROLES", "OPENCLIP_ASIDE_KEYS", "POSITION_IDS",
    "clip_l_config", "openclip_config", "openclip_h_config", "openclip_bigg_config", "load_text_config",
    "openclip_to_hf", "hf_to_openclip", "encoder_state_dict", "encoder_keys", "checkpoint_state_dict",
    "TextEncoderOutput", "TextEncoder", "build_text_encoder", "load_text_encoder",
]

PREFIX_SD1 = "cond_stage_model.transformer."
PREFIX_SD2 = "cond_stage_model.model."
PREFIX_SDXL_TE1 = "conditioner.embedders.0.transformer."
PREFIX_SDXL_TE2 = "conditioner.embedders.1.model."

BOS, EOT = 49406, 49407

# Position ids are arange by definition. transformers 4.30.2 keeps them as a persistent buffer (in
# state_dict, required by strict loading); >= 4.31 makes the buffer non-persistent (not in state_dict,
# refused by strict loading). The value is never taken from a file: some merged SD1 checkpoints carry it
# as float with drifted values. TextEncoder.load_encoder_state_dict adds/drops the key as the installed
# version wants and rebuilds the buffer as arange.
POSITION_IDS = "text_model.embeddings.position_ids"
# OpenCLIP tensors with no transformers counterpart, held aside as they are. ``text_projection`` joins
# them for roles without a projection (SD2: CLIPTextModel has no slot and SD2 conditioning never uses it).
OPENCLIP_ASIDE_KEYS = ("logit_scale",)


@dataclass(frozen=True)
class Role:
    """How one SD text encoder is stored and used.

    ``layer``: which hidden state feeds the UNet at clip skip 1, counted from the end (1 = last layer);
    ``final_ln``: whether the final LayerNorm is applied to it; ``projection``: a pooled, projected
    output exists (SDXL TE2); ``openclip``: the checkpoint uses open_clip names.
    """
    name: str
    prefix: str
    openclip: bool
    projection: bool
    layer: int
    final_ln: bool


SD1 = Role("sd1", PREFIX_SD1, openclip=False, projection=False, layer=1, final_ln=True)
SD2 = Role("sd2", PREFIX_SD2, openclip=True, projection=False, layer=2, final_ln=True)
SDXL_TE1 = Role("sdxl_te1", PREFIX_SDXL_TE1, openclip=False, projection=False, layer=2, final_ln=False)
SDXL_TE2 = Role("sdxl_te2", PREFIX_SDXL_TE2, openclip=True, projection=True, layer=2, final_ln=False)
ROLES: dict[str, Role] = {r.name: r for r in (SD1, SD2, SDXL_TE1, SDXL_TE2)}


def _role(role: Role | str) -> Role:
    return role if isinstance(role, Role) else ROLES[role]


# ---------------------------------------------------------------------------------------------- configs

def _config(**kw) -> CLIPTextConfig:
    # eos_token_id = 49407 (not the legacy 2 of OpenAI's hub config): transformers >= 4.31 then pools at
    # the *first* 49407, which is the EOT for SD1 padding (49407…) and OpenCLIP padding (0…) alike, and
    # stays right if ids above 49407 are ever added. 4.30.2 ignores eos_token_id and pools at
    # argmax(input_ids), which is the same first 49407 because EOT is the largest stock id (torch.argmax
    # returns the first maximum). A config with eos_token_id 2 makes >= 4.31 use argmax as well.
    base = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, attention_dropout=0.0,
                initializer_factor=1.0, bos_token_id=BOS, eos_token_id=EOT)
    base.update(kw)
    return CLIPTextConfig.from_dict(base)


def clip_l_config() -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14 text tower (SD1, SDXL TE1), written out so nothing is fetched."""
    return _config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu", pad_token_id=EOT)


def openclip_config(width: int, layers: int, heads: int, mlp_width: int, embed_dim: int) -> CLIPTextConfig:
    """An open_clip text tower as a transformers config: exact GELU, eps 1e-5, pad id 0."""
    return _config(hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=layers,
                   num_attention_heads=heads, projection_dim=embed_dim, hidden_act="gelu", pad_token_id=0)


def openclip_h_config() -> CLIPTextConfig:
    """OpenCLIP ViT-H-14 text tower (SD2)."""
    return openclip_config(width=1024, layers=24, heads=16, mlp_width=4096, embed_dim=1024)


def openclip_bigg_config() -> CLIPTextConfig:
    """OpenCLIP ViT-bigG-14 text tower (SDXL TE2)."""
    return openclip_config(width=1280, layers=32, heads=20, mlp_width=5120, embed_dim=1280)


_ROLE_CONFIGS = {"sd1": clip_l_config, "sd2": openclip_h_config,
                 "sdxl_te1": clip_l_config, "sdxl_te2": openclip_bigg_config}


def load_text_config(src: CLIPTextConfig | Mapping | str | os.PathLike) -> CLIPTextConfig:
    """A config from an object, a dict, a ``config.json`` file or a folder holding one (never the hub).

    A full CLIP config (with ``text_config``) is reduced to its text part.
    """
    if isinstance(src, CLIPTextConfig):
        return src
    if not isinstance(src, Mapping):
        path = Path(src)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as f:
            src = json.load(f)
    data = dict(src.get("text_config") or src)
    return CLIPTextConfig.from_dict(data)


# ---------------------------------------------------------------------------------- OpenCLIP mapping

_BLOCK = "transformer.resblocks."
_LAYER = "text_model.encoder.layers."
_TOP = {  # open_clip key (relative to the embedder's model) -> transformers key
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed: open_clip computes x @ P, Linear x @ W.T
}
_IN_BLOCK = {  # inside resblock N / encoder layer N, on the module path
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")  # row order of open_clip's fused in_proj (nn.MultiheadAttention)
_TOP_BACK = {v: k for k, v in _TOP.items()}
_IN_BLOCK_BACK = {v: k for k, v in _IN_BLOCK.items()}


def _openclip_key_to_hf(key: str, projection: bool = True) -> list[str]:
    """transformers names for one open_clip key: one name, three for a fused in_proj, none if held aside."""
    if key in OPENCLIP_ASIDE_KEYS or (key == "text_projection" and not projection):
        return []
    if key in _TOP:
        return [_TOP[key]]
    if key.startswith(_BLOCK):
        n, rest = key[len(_BLOCK):].split(".", 1)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            return [f"{_LAYER}{n}.self_attn.{p}.{kind}" for p in _QKV]
        module, param = rest.rsplit(".", 1)
        if module in _IN_BLOCK:
            return [f"{_LAYER}{n}.{_IN_BLOCK[module]}.{param}"]
    raise KeyError(f"unknown OpenCLIP text-encoder key: {key!r}")


def _hf_key_to_openclip(key: str) -> tuple[str, int | None] | None:
    """(open_clip key, row block of a fused in_proj or None) for one transformers key; None: no counterpart."""
    if key == POSITION_IDS:
        return None  # open_clip has no position ids (4.30.2 keeps them in state_dict)
    if key in _TOP_BACK:
        return _TOP_BACK[key], None
    if key.startswith(_LAYER):
        n, rest = key[len(_LAYER):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module.startswith("self_attn.") and module[len("self_attn."):] in _QKV:
            return f"{_BLOCK}{n}.attn.in_proj_{param}", _QKV.index(module[len("self_attn."):])
        if module in _IN_BLOCK_BACK:
            return f"{_BLOCK}{n}.{_IN_BLOCK_BACK[module]}.{param}", None
    raise KeyError(f"no OpenCLIP name for transformers key: {key!r}")


def openclip_to_hf(state: Mapping[str, torch.Tensor],
                   projection: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """open_clip text state dict (keys after the ``…model.`` prefix) -> (transformers dict, held aside).

    ``projection=False`` (SD2) holds ``text_projection`` aside instead of mapping it. Every output tensor
    is a view of an input tensor (``chunk`` for q/k/v, ``.t()`` for the projection): nothing is copied,
    and mmap-backed tensors stay on disk until used.
    """
    out: dict[str, torch.Tensor] = {}
    aside: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        names = _openclip_key_to_hf(key, projection)
        if not names:
            aside[key] = value
        elif len(names) == 3:
            if value.shape[0] % 3:
                raise ValueError(f"{key}: {tuple(value.shape)} does not split into q/k/v")
            out.update(zip(names, value.chunk(3, dim=0)))
        elif key == "text_projection":
            out[names[0]] = value.t()
        else:
            out[names[0]] = value
    return out, aside


def hf_to_openclip(state: Mapping[str, torch.Tensor],
                   aside: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`openclip_to_hf`: q/k/v are concatenated again (the only copy), the projection
    transposed back, ``aside`` put back, ``position_ids`` dropped (open_clip has none)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state.items():
        target = _hf_key_to_openclip(key)
        if target is None:
            continue
        name, part = target
        if part is None:
            out[name] = value.t() if name == "text_projection" else value
        else:
            if name not in fused:
                fused[name] = [None, None, None]
                out[name] = value  # placeholder keeps the key order
            fused[name][part] = value
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise KeyError(f"{name}: q/k/v incomplete")
        out[name] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    out.update(aside or {})
    return out


# ---------------------------------------------------------------------------------- checkpoint keys

def _clip_l_key(key: str) -> str:
    # Some old SD1 files store the CLIPTextModel without its ``text_model.`` level.
    return key if key.startswith("text_model.") else "text_model." + key


def encoder_state_dict(checkpoint: Mapping[str, torch.Tensor],
                       role: Role | str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The role's own state dict out of a full checkpoint: (TextEncoder names -> tensors, held aside).

    Only views are made. ``position_ids`` is passed through if present; loading normalises it.
    """
    role = _role(role)
    n = len(role.prefix)
    own = {k[n:]: v for k, v in checkpoint.items() if k.startswith(role.prefix)}
    if not own:
        raise KeyError(f"no keys under {role.prefix!r} in the checkpoint")
    if role.openclip:
        return openclip_to_hf(own, role.projection)
    return {_clip_l_key(k): v for k, v in own.items()}, {}


def encoder_keys(keys: Iterable[str], role: Role | str) -> list[str]:
    """The TextEncoder names that checkpoint ``keys`` map to (keys outside the role's prefix are ignored;
    held-aside keys give none). For inspecting a file's header without loading tensors."""
    role = _role(role)
    n = len(role.prefix)
    out: list[str] = []
    for key in keys:
        if key.startswith(role.prefix):
            out += _openclip_key_to_hf(key[n:], role.projection) if role.openclip else [_clip_l_key(key[n:])]
    return out


def checkpoint_state_dict(state: Mapping[str, torch.Tensor], role: Role | str,
                          aside: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """TextEncoder-named tensors back to full checkpoint names (prefix, OpenCLIP mapping, ``aside``)."""
    role = _role(role)
    if role.openclip:
        state = hf_to_openclip(state, aside)
    return {role.prefix + k: v for k, v in state.items()}


# ---------------------------------------------------------------------------------------- the module

class TextEncoderOutput(NamedTuple):
    hidden: torch.Tensor                 # [B, 77, width]: cross-attention context
    pooled: torch.Tensor | None = None   # [B, proj]: SDXL TE2 only


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Bound per layer instance (types.MethodType, so deepcopy rebinds it to the copy). Non-reentrant
    # checkpointing gives LoRA weights inside the layer their gradients even when the embeddings are
    # frozen; 4.30.2's built-in switch is reentrant (no gradients then) and 5.x renamed its switch.
    forward = type(self).forward.__get__(self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


class TextEncoder(nn.Module):
    """One SD text encoder: ``text_model`` (+ ``text_projection`` for SDXL TE2) and its conditioning rule.

    Parameters are ordinary transformers modules, so ``requires_grad_`` / LoRA injection work on them
    directly; the forward never disables autograd. ``aside`` holds the held-aside OpenCLIP tensors as
    plain tensors: not parameters (``requires_grad_``/``.to()`` leave them alone), not in
    ``state_dict()``, only kept so :meth:`checkpoint_state_dict` reproduces the file.
    """

    def __init__(self, config: CLIPTextConfig, role: Role | str, clip_skip: int = 1) -> None:
        super().__init__()
        self.role = _role(role)
        self.config = config
        self.clip_skip = clip_skip
        self.aside: dict[str, torch.Tensor] = {}
        if self.role.projection:
            hf = CLIPTextModelWithProjection(config)
            self.text_model = hf.text_model
            self.text_projection: nn.Linear | None = hf.text_projection
        else:
            hf = CLIPTextModel(config)
            self.text_model = getattr(hf, "text_model", hf)  # 4.30.2: inner tower; 5.x: the model itself
            self.text_projection = None

    # -- conditioning
    def hidden_index(self) -> int:
        """Index into ``hidden_states`` used for conditioning (negative, from the end)."""
        back = self.role.layer + self.clip_skip - 1
        if self.clip_skip < 1 or back > self.config.num_hidden_layers:
            raise ValueError(f"clip_skip {self.clip_skip} out of range for {self.config.num_hidden_layers} "
                             f"layers in role {self.role.name}")
        return -back

    def forward(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        """Conditioning for token ids [B, 77] exactly as the role's inference code computes it."""
        index = self.hidden_index()
        out = self.text_model(input_ids=input_ids, output_hidden_states=True)
        hidden = out.hidden_states[index]
        if self.role.final_ln:
            # final LN of the last layer is already last_hidden_state; reuse it for clip skip 1 in SD1
            hidden = out.last_hidden_state if index == -1 else self.text_model.final_layer_norm(hidden)
        pooled = None
        if self.text_projection is not None:
            # pooler_output = final_layer_norm(last layer) at the EOT position (see _config)
            pooled = self.text_projection(out.pooler_output)
        return TextEncoderOutput(hidden, pooled)

    # -- training switches
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each encoder layer in backward (only while training with autograd on)."""
        for layer in self.text_model.encoder.layers:
            if enabled:
                layer.forward = types.MethodType(_checkpointed_forward, layer)
            else:
                layer.__dict__.pop("forward", None)

    @property
    def gradient_checkpointing(self) -> bool:
        return any("forward" in layer.__dict__ for layer in self.text_model.encoder.layers)

    # -- state
    def load_encoder_state_dict(self, state: Mapping[str, torch.Tensor], assign: bool = True) -> None:
        """Strict load of TextEncoder-named tensors (``assign=True``: take them over, no copy).

        ``position_ids`` may be present or not in ``state``, under either transformers version; the
        buffer is rebuilt as arange afterwards, as is any buffer still on ``meta``.
        """
        state = {k: v for k, v in state.items() if k != POSITION_IDS}
        token_embedding = state.get("text_model.embeddings.token_embedding.weight")
        device = token_embedding.device if token_embedding is not None else torch.device("cpu")
        if POSITION_IDS in self.state_dict(keep_vars=True):  # 4.30.2: persistent buffer, strict needs it
            state[POSITION_IDS] = self._position_ids(device)
        self.load_state_dict(state, strict=True, assign=assign)
        weight = self.text_model.embeddings.token_embedding.weight
        self.text_model.embeddings.position_ids = self._position_ids(weight.device)
        left = [n for n, b in self.named_buffers() if b.is_meta]
        if left and not weight.is_meta:
            raise RuntimeError(f"buffers left on meta after loading: {left}")

    def _position_ids(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.config.max_position_embeddings, device=device).expand(1, -1)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """This encoder's tensors under full checkpoint names (prefix + OpenCLIP mapping + ``aside``)."""
        return checkpoint_state_dict(self.state_dict(), self.role, self.aside)


def build_text_encoder(role: Role | str, config: CLIPTextConfig | Mapping | str | os.PathLike | None = None,
                       *, device: torch.device | str | None = None, clip_skip: int = 1) -> TextEncoder:
    """A TextEncoder with fresh weights; ``config`` defaults to the role's full-size built-in one.

    ``device="meta"`` allocates nothing (for loading with ``assign=True`` or inspecting layouts).
    """
    role = _role(role)
    config = _ROLE_CONFIGS[role.name]() if config is None else load_text_config(config)
    with torch.device(device) if device is not None else nullcontext():
        return TextEncoder(config, role, clip_skip=clip_skip)


def load_text_encoder(checkpoint: Mapping[str, torch.Tensor], role: Role | str,
                      config: CLIPTextConfig | Mapping | str | os.PathLike | None = None,
                      *, clip_skip: int = 1) -> TextEncoder:
    """Build on ``meta`` and take over the role's tensors from a full checkpoint (e.g. a safetensors
    mmap): parameters end up as (views of) the checkpoint tensors, in their dtype and device."""
    role = _role(role)
    state, aside = encoder_state_dict(checkpoint, role)
    encoder = build_text_encoder(role, config, device="meta", clip_skip=clip_skip)
    encoder.load_encoder_state_dict(state, assign=True)
    encoder.aside = dict(aside)
    return encoder
