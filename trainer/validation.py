"""Validation loss on held-out images: the same objective, with everything random fixed once.

Why fixed: a training loss wanders with the random timestep and noise of each step, so it says
little about how the LoRA is doing. Following kohya's sd-scripts (``--validation_split``,
``--validation_seed``; its ``docs/validation.md``), each validation image is scored at a fixed set
of timesteps spread over the trained range, each with its own noise tensor drawn once from the
validation seed. The same images, timesteps and noise at every evaluation make the curve comparable
across steps, and across runs with the same validation seed.

Evaluation runs under ``torch.no_grad()`` with the UNet, text encoders and network in eval mode, and
draws nothing from any random stream (the noise is drawn up front from a generator of its own): a
run with validation trains bit-identically to one without, and resumes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import UserError

#: kohya's validation timesteps (train_network.py), kept inside the trained range.
KOHYA_TIMESTEPS = (10, 350, 500, 650, 990)


def fixed_timesteps(low: int, high: int) -> list[int]:
    """kohya's timesteps clipped to the trained range ``[low, high)``, duplicates dropped."""
    out = []
    for t in KOHYA_TIMESTEPS:
        t = min(max(t, low), high - 1)
        if t not in out:
            out.append(t)
    return out


@dataclass
class _Item:
    x0: torch.Tensor            # [1, C, h, w] latent (posterior mean: deterministic)
    caption: str
    mask: Optional[torch.Tensor]
    noise: torch.Tensor         # [T, C, h, w], one fixed noise per timestep


class Validator:
    """Scores the held-out samples; ``objective(x0, noise, t, captions, mask) -> scalar loss``.

    ``samples`` are encoded latents (``LatentSample``: ``mean``, ``caption``, ``mask``); ``modules`` are
    put in eval mode while scoring and restored after.
    """

    def __init__(self, samples: Sequence, objective: Callable[..., torch.Tensor], *, seed: int,
                 timesteps: Sequence[int], device, modules: Sequence[torch.nn.Module] = ()):
        if not samples:
            raise UserError("validation: no validation images")
        self.objective, self.device, self.modules, self.seed = objective, device, list(modules), int(seed)
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed)
        self.items = []
        for s in samples:
            x0 = s.mean[None].float()
            noise = torch.randn((len(self.timesteps), *x0.shape[1:]), generator=gen)
            mask = s.mask[None] if getattr(s, "mask", None) is not None else None
            self.items.append(_Item(x0, s.caption, mask, noise))

    def __len__(self) -> int:
        return len(self.items)

    @torch.no_grad()
    def __call__(self) -> float:
        """The mean loss over every (image, timestep) pair."""
        before = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        try:
            total, n = 0.0, 0
            t = self.timesteps.to(self.device)
            for item in self.items:
                batch = len(self.timesteps)
                x0 = item.x0.to(self.device).expand(batch, *item.x0.shape[1:])
                mask = item.mask.to(self.device).expand(batch, *item.mask.shape[1:]) if item.mask is not None else None
                loss = self.objective(x0, item.noise.to(self.device), t, [item.caption] * batch, mask)
                total += float(loss) * batch
                n += batch
        finally:
            for m, was in zip(self.modules, before):
                m.train(was)
        return total / max(1, n)
