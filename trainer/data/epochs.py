"""Epochs: how many optimizer steps an epoch is, and which of train_epochs / train_iterations decides.

An epoch is one pass of the batch sampler over every sample (training and reg samples, each
``repeats`` times): ``batches_per_epoch`` is the sampler's ``len()`` (same-bucket batches, so it
is the sum over buckets of ``ceil(samples / batch_size)``, not ``ceil(total / batch_size)``).
``steps_per_epoch = ceil(batches_per_epoch / gradient_accumulation_steps)`` as in kohya.

Exactly one of the two settings decides the run's length. ``train_epochs`` empty (``None``, the
default, and what every TrainTrain file means since it has no such key) leaves ``train_iterations``
in charge, and the epochs are derived: ``ceil(iterations / steps_per_epoch)`` (kohya's
``num_train_epochs``). ``train_epochs`` set makes ``train_iterations = epochs x steps_per_epoch``
and ``train_iterations`` is ignored (settings' advice says so when it was changed from the default).

The batch stream is continuous across epochs (the sampler is infinite), so with gradient
accumulation that does not divide ``batches_per_epoch`` an epoch's last step takes its remaining
micro-batches from the next epoch's order; epoch ends (saves, samples) fall on step multiples of
``steps_per_epoch``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class EpochPlan:
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    iterations: int
    by_epochs: bool              # True: train_epochs decided, iterations derived

    def epoch_of(self, step: int) -> int:
        """The (1-based) epoch that optimizer step ``step`` (1-based) belongs to, kohya's ``ss_epoch``."""
        return max(1, math.ceil(step / self.steps_per_epoch)) if step > 0 else 0

    def lines(self) -> list[str]:
        head = (f"{self.epochs} epochs x {self.steps_per_epoch} steps = {self.iterations} train_iterations "
                f"(derived from train_epochs)" if self.by_epochs else
                f"{self.iterations} train_iterations = {self.epochs} epochs of {self.steps_per_epoch} steps"
                + (" (the last one partial)" if self.iterations % self.steps_per_epoch else ""))
        return [head, f"{self.batches_per_epoch} batches per epoch"]

    def metadata(self) -> dict[str, Any]:
        return {"ss_num_epochs": self.epochs, "ss_num_batches_per_epoch": self.batches_per_epoch}


def batches_per_epoch(buckets: Sequence, repeats: Sequence[int], batch_size: int) -> int:
    """The batch sampler's ``len()`` for these samples (computed by the sampler itself, so they agree)."""
    from .sampler import BucketBatchSampler
    return len(BucketBatchSampler(buckets, batch_size, seed=0, repeats=repeats))


def plan_epochs(settings: Any, batches: int) -> EpochPlan:
    """The plan for ``settings`` (``train_epochs``, ``train_iterations``, ``gradient_accumulation_steps``)."""
    accum = max(1, int(getattr(settings, "gradient_accumulation_steps", 1) or 1))
    steps = max(1, math.ceil(batches / accum))
    epochs = getattr(settings, "train_epochs", None)
    if epochs:
        return EpochPlan(batches, steps, int(epochs), int(epochs) * steps, True)
    iters = int(settings.train_iterations)
    return EpochPlan(batches, steps, math.ceil(iters / steps), iters, False)
