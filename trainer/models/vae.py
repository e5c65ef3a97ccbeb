"""AutoencoderKL (the SD1 / SD2 / SDXL VAE) with ldm's exact state-dict names.

The module tree mirrors ``ldm.models.autoencoder.AutoencoderKL`` attribute for attribute, so a
checkpoint's ``first_stage_model.*`` tensors load with ``strict=True`` after stripping the prefix,
and nothing needs a key-conversion table. SDXL's VAE has the same layout (sgm reuses the classes).

The latent scale factor is deliberately *not* part of the module: checkpoints do not store it and
the caller multiplies latents by :data:`SCALE_FACTORS` after :meth:`AutoencoderKL.encode` (and
divides before :meth:`AutoencoderKL.decode`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

SCALE_FACTORS: dict[str, float] = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def _norm(channels: int) -> nn.GroupNorm:
    # ldm's Normalize: 32 groups, eps 1e-6 (not PyTorch's default 1e-5 -- it matters at fp32 1e-4).
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-norm residual block without time embedding (the VAE has none)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            # ldm names the 1x1 channel-matching shortcut "nin_shortcut".
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q/k/v/proj_out are 1x1 convs as in the checkpoints."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head of width C, so SDPA's 1/sqrt(C) scale is ldm's.
        q, k, v = (p(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (right/bottom) zero pad, exactly as ldm pads."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` / ``attn`` lists plus an optional resampler.

    Only the resampler attribute that exists is registered (``downsample`` in the encoder,
    ``upsample`` in the decoder), which keeps the state-dict names identical to ldm's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)


class _Checkpointed(nn.Module):
    """Shared helper: run a submodule with activation checkpointing when asked and training."""

    gradient_checkpointing: bool = False

    def _run(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def _mid(self, mid: _Mid, h: Tensor) -> Tensor:
        h = self._run(mid.block_1, h)
        h = self._run(mid.attn_1, h)
        return self._run(mid.block_2, h)


class Encoder(_Checkpointed):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 dropout: float = 0.0, **_: object) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            lvl = _Level()
            block_in, block_out = ch * in_mult[level], ch * ch_mult[level]
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    lvl.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                lvl.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(lvl)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, lvl in enumerate(self.down):
            for i, block in enumerate(lvl.block):
                h = self._run(block, h)
                if len(lvl.attn) > 0:
                    h = self._run(lvl.attn[i], h)
            if level != self.num_resolutions - 1:
                h = lvl.downsample(h)
        h = self._mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_Checkpointed):
    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                 dropout: float = 0.0, **_: object) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout)
        # Built deepest-first (the order data flows) but stored as up[level], like ldm, so that
        # "decoder.up.3" is the lowest-resolution level in every checkpoint.
        levels: list[_Level] = []
        for level in reversed(range(self.num_resolutions)):
            lvl = _Level()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                lvl.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    lvl.attn.append(AttnBlock(block_in))
            if level != 0:
                lvl.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, lvl)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self._mid(self.mid, h)
        for level in reversed(range(self.num_resolutions)):
            lvl = self.up[level]
            for i, block in enumerate(lvl.block):
                h = self._run(block, h)
                if len(lvl.attn) > 0:
                    h = self._run(lvl.attn[i], h)
            if level != 0:
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); logvar clamped to [-30, 20] as ldm does."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        # Draw on the generator's device (CPU by default) so a seed means the same latent anywhere.
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder; constructor mirrors ldm (``ddconfig`` + ``embed_dim``).

    Keyword ddconfig entries may be given either as a ``ddconfig`` dict (as in the yaml files and
    ``vae.json``) or directly as keyword arguments.
    """

    def __init__(self, ddconfig: dict | None = None, embed_dim: int = 4, *,
                 gradient_checkpointing: bool = False, **kwargs: object) -> None:
        super().__init__()
        cfg = dict(ddconfig or {})
        cfg.update({k: v for k, v in kwargs.items() if k not in ("lossconfig", "ckpt_path", "ignore_keys",
                                                                  "image_key", "colorize_nlabels", "monitor")})
        if not cfg.get("double_z", True):
            raise ValueError("AutoencoderKL needs double_z=True (mean and logvar moments)")
        self.encoder = Encoder(**cfg)
        self.decoder = Decoder(**cfg)
        z = int(cfg["z_channels"])
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.embed_dim = embed_dim
        self.set_gradient_checkpointing(gradient_checkpointing)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory in res/attn blocks; only active in train mode with grad on."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image in [-1, 1], [B, 3, H, W] -> posterior over *unscaled* latents [B, embed_dim, H/8, W/8]."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)
