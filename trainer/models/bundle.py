"""ModelBundle: everything a training run or a sampler needs from one model.

The engine and the samplers talk to a bundle only; where it came from (a checkpoint file,
the WebUI's loaded model, a random init) does not matter to them. Conditioning is built
exactly as inference does it, per family:

- SD1: CLIP-L last layer with final LayerNorm (clip skip n: layer -n, LayerNorm applied);
- SD2: OpenCLIP-H penultimate layer with ``ln_final``;
- SDXL: CLIP-L and OpenCLIP-bigG penultimate layers without final norm, concatenated
  (2048 wide), and the vector ``y`` = pooled bigG projection ‖ size/crop/target embeddings
  (pixels, 256 sinusoidal features each) → 2816 wide.

Prompts longer than 75 tokens are split into 77-token chunks as A1111 does (emphasis
weights, ``BREAK``, comma backtracking) and the chunk outputs concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .configs import ModelConfig
from .schedule import NoiseSchedule
from .text_encoders import TextEncoder
from .tokenizer import ClipTokenizer
from .unet import UNetModel, timestep_embedding
from .vae import AutoencoderKL

Cond = dict  # {"context": [B, 77·k, C], "y": [B, adm] (SDXL only)}


@dataclass
class ModelBundle:
    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizer: ClipTokenizer
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    name: str = ""
    source: Optional[str] = None
    emphasis: bool = True

    # ------------------------------------------------------------------ facts
    @property
    def family(self) -> str:
        return self.config.family

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def native_size(self) -> tuple:
        return tuple(self.config.native_size)

    @property
    def device(self) -> torch.device:
        return self.unet.input_blocks[0][0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.input_blocks[0][0].weight.dtype

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae,
                **{f"text_encoder_{i}": te for i, te in enumerate(self.text_encoders)}}

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "ModelBundle":
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        if device is not None:
            self.schedule = self.schedule.to(device)
        return self

    def requires_grad_(self, flag: bool) -> "ModelBundle":
        for m in self.modules().values():
            m.requires_grad_(flag)
        return self

    def eval(self) -> "ModelBundle":
        for m in self.modules().values():
            m.eval()
        return self

    # ------------------------------------------------------------------ text
    def _encode_role(self, encoder: TextEncoder, prompts: Sequence[str], clip_skip: int):
        """Chunked, emphasis-weighted hidden states (and the first chunk's pooled output) for one encoder."""
        pad = 0 if encoder.role.openclip else self.tokenizer.pad_id   # OpenCLIP pads with 0, CLIP-L with its EOS
        chunked = [self.tokenizer.chunk(p, pad_id=pad, emphasis=self.emphasis) for p in prompts]
        n_chunks = max(len(c) for c in chunked)
        empty = self.tokenizer.chunk("", pad_id=pad, emphasis=False)[0]
        device = encoder.text_model.embeddings.token_embedding.weight.device
        encoder.clip_skip = clip_skip
        hiddens, pooled = [], None
        for i in range(n_chunks):
            chunks = [c[i] if i < len(c) else empty for c in chunked]
            ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
            out = encoder(ids)
            h = out.hidden
            weights = torch.tensor([c.multipliers for c in chunks], dtype=h.dtype, device=h.device)
            if bool((weights != 1).any()):
                # A1111 "Original" emphasis: scale tokens, then restore each prompt's mean.
                before = h.mean(dim=(1, 2), keepdim=True)
                h = h * weights[..., None]
                h = h * (before / h.mean(dim=(1, 2), keepdim=True))
            hiddens.append(h)
            if i == 0:
                pooled = out.pooled
        return torch.cat(hiddens, dim=1), pooled

    def encode_prompts(self, prompts: Sequence[str], size: Optional[tuple] = None, clip_skip: Optional[int] = None,
                       crop: tuple = (0, 0), original_size: Optional[tuple] = None) -> Cond:
        """Conditioning for a batch of prompts; ``size`` (H, W) in pixels feeds SDXL's ``time_ids``."""
        prompts = list(prompts)
        clip_skip = clip_skip or self.config.clip_skip_default
        outs = [self._encode_role(te, prompts, clip_skip) for te in self.text_encoders]
        context = torch.cat([h for h, _ in outs], dim=-1) if len(outs) > 1 else outs[0][0]
        cond: Cond = {"context": context}
        if self.config.unet.adm_in_channels:
            pooled = outs[-1][1]
            h, w = size or self.native_size
            oh, ow = original_size or (h, w)
            cond["y"] = torch.cat([pooled, self.size_embedding(len(prompts), (oh, ow), crop, (h, w), pooled)], dim=-1)
        return cond

    @staticmethod
    def size_embedding(batch: int, original: tuple, crop: tuple, target: tuple, like: torch.Tensor) -> torch.Tensor:
        """SDXL ``time_ids`` (original H, W, crop top, left, target H, W in pixels), 256 features each."""
        ids = torch.tensor([*original, *crop, *target], dtype=torch.float32, device=like.device)
        emb = timestep_embedding(ids, 256).reshape(1, -1).to(like.dtype)
        return emb.expand(batch, -1)

    def match_lengths(self, *conds: Cond) -> tuple[Cond, ...]:
        """Pad shorter contexts with empty-prompt chunks to the longest, so they can share a batch (cond and
        uncond in CFG; iLECO's original, target and preserved prompts)."""
        longest = max(c["context"].shape[1] for c in conds)
        if all(c["context"].shape[1] == longest for c in conds):
            return conds
        empty = self.encode_prompts([""])["context"]
        out = []
        for c in conds:
            missing = (longest - c["context"].shape[1]) // empty.shape[1]
            if missing:
                pad = empty.to(c["context"].dtype).expand(c["context"].shape[0], -1, -1).repeat(1, missing, 1)
                c = dict(c, context=torch.cat([c["context"], pad], dim=1))
            out.append(c)
        return tuple(out)

    # ------------------------------------------------------------------ UNet and VAE
    def unet_call(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.unet(x, t, cond["context"], cond.get("y"))

    def encode_images(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                      sample: bool = True) -> torch.Tensor:
        """[-1, 1] images → scaled latents (a posterior sample, as SD training does, unless ``sample=False``)."""
        vae_dtype = self.vae.encoder.conv_in.weight.dtype
        posterior = self.vae.encode(images.to(self.vae.encoder.conv_in.weight.device, vae_dtype))
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = self.vae.decoder.conv_in.weight.dtype
        return self.vae.decode((latents / self.scale_factor).to(vae_dtype))

    # ------------------------------------------------------------------ saving
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under original single-file checkpoint names (what SD1/2/XL tools load)."""
        from .configs import UNET_PREFIX, VAE_PREFIX
        sd = {UNET_PREFIX + k: v for k, v in self.unet.state_dict().items()}
        sd.update({VAE_PREFIX + k: v for k, v in self.vae.state_dict().items()})
        for te in self.text_encoders:
            sd.update(te.checkpoint_state_dict())
        return sd
