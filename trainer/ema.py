"""Exponential moving average of the LoRA weights (``ema_decay``, ``ema_warmup``; SPEC §16).

Why: the last step's weights carry the noise of the last few batches; an average over the recent steps
is smoother and often generalises better, and with EMA on it is *the* product: every saved LoRA (the
final file, every-N-steps saves, Stop & Save, the last good weights after a NaN) and every preview sample
uses it, while training itself continues on the raw weights. The training state holds both, so a resumed
run continues the same average.

The recurrence, after each optimizer step n = 0, 1, 2, … (``shadow`` starts as the weights before step 0):

    d_n = ema_decay                               (ema_warmup off)
    d_n = min(ema_decay, (1 + n) / (10 + n))       (ema_warmup on: the num_updates rule of TensorFlow's
                                                    ExponentialMovingAverage, also diffusers' EMAModel
                                                    without its power warm-up)
    shadow ← d_n · shadow + (1 − d_n) · weights

It averages each trained tensor (a LoRA's down and up factors separately, as OneTrainer and diffusers
average parameters), not the product up·down.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch


class WeightEMA:
    """The average of ``params`` (the optimizer's tensors, in optimizer order)."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float, warmup: bool = False):
        self.params = list(params)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.params]

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """One step of the recurrence (call after each optimizer step)."""
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().to(s.dtype), alpha=1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self) -> None:
        """Make the average the weights (the end of a pass: what the mode saves and a later pass uses)."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the weights inside the block, the raw weights restored after (bit-exact)."""
        raw = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def wrap(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with self.swapped():
                return fn()
        return run

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "shadow": [s.detach().cpu() for s in self.shadow]}

    def load_state_dict(self, data: Optional[dict]) -> None:
        """Restore from a training state; a state without an average (EMA was off) is a KeyError."""
        if not data:
            raise KeyError("the training state has no EMA (it was saved with ema_decay 0)")
        if (float(data["decay"]), bool(data["warmup"])) != (self.decay, self.warmup):
            raise ValueError(f"the training state's EMA has ema_decay {data['decay']:g}, ema_warmup "
                             f"{data['warmup']}")
        shadow = data["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("the training state's EMA has other tensors")
        for s, v in zip(self.shadow, shadow):
            s.copy_(v.to(device=s.device, dtype=s.dtype))
        self.updates = int(data["updates"])


def make_ema(settings, params: Sequence[torch.Tensor]) -> Optional[WeightEMA]:
    """The EMA the settings ask for, or None when ``ema_decay`` is 0."""
    if not settings.ema_decay:
        return None
    return WeightEMA(params, settings.ema_decay, settings.ema_warmup)


def ema_metadata(settings) -> dict:
    """Metadata saying the file is an average (kohya has no key for this; ours are prefixed)."""
    if not settings.ema_decay:
        return {}
    return {"shinkansen_ema_decay": settings.ema_decay, "shinkansen_ema_warmup": bool(settings.ema_warmup)}
