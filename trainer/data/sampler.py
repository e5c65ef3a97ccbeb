"""Same-bucket batches in a seeded, resumable order.

Every batch holds samples of one bucket (one tensor shape). The order of epoch ``e`` is a
**pure function of (seed, e)**: a ``torch.Generator`` seeded from both shuffles each
bucket's samples, cuts them into batches, then shuffles the batches across buckets. The
sampler's whole state is therefore ``(epoch, index)`` -- :meth:`state_dict` stores it and a
restored sampler continues with the very batch the interrupted run would have drawn.

``drop_last=False`` (the default): each bucket's last batch may be smaller than
``batch_size``, so every sample appears exactly ``repeats`` times per epoch; a smaller
batch only gives its samples more weight in that one step (the loss is a batch mean).
``drop_last=True`` drops those partial batches instead (some samples skip an epoch).

Data-parallel runs use this sampler unchanged: every rank draws the global batch (the
per-rank batch × the world size) and trains its slice of it (``trainer.dist.Dist.shard``), so
W ranks × batch b see the batches one process with batch W·b sees, each sample once per epoch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .buckets import Size

_GOLDEN = 0x9E3779B97F4A7C15


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + (int(epoch) + 1) * _GOLDEN) % (1 << 63)


class BucketBatchSampler:
    """Infinite iterator of index batches; ``len()`` is the number of batches per epoch."""

    def __init__(self, buckets: Sequence[Size], batch_size: int, seed: int,
                 repeats: Optional[Sequence[int]] = None, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.buckets = [tuple(b) for b in buckets]
        self.repeats = [max(1, int(r)) for r in repeats] if repeats is not None else [1] * len(self.buckets)
        if len(self.repeats) != len(self.buckets):
            raise ValueError("repeats and buckets differ in length")
        self.batch_size, self.seed, self.drop_last = int(batch_size), int(seed), bool(drop_last)
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None
        if not self.epoch_batches(0):
            raise ValueError("no batches: every bucket is smaller than batch_size and drop_last is on")

    @classmethod
    def from_samples(cls, samples: Sequence, batch_size: int, seed: int, **kw) -> "BucketBatchSampler":
        """From anything with ``.bucket`` and ``.repeats`` (LatentSample, Placement)."""
        return cls([s.bucket for s in samples], batch_size, seed, [s.repeats for s in samples], **kw)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (indices into the sample list)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        groups: dict[Size, list[int]] = {}
        for i, (b, r) in enumerate(zip(self.buckets, self.repeats)):
            groups.setdefault(b, []).extend([i] * r)
        batches: list[list[int]] = []
        for b in sorted(groups):
            idx = groups[b]
            order = torch.randperm(len(idx), generator=g).tolist()
            for s in range(0, len(idx), self.batch_size):
                batch = [idx[j] for j in order[s:s + self.batch_size]]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        self._cached = (epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.epoch_batches(0))

    def __iter__(self) -> "BucketBatchSampler":
        return self

    def __next__(self) -> list[int]:
        batches = self.epoch_batches(self.epoch)
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self.epoch_batches(self.epoch)
        self.index += 1
        return batches[self.index - 1]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index,
                "samples": len(self.buckets), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuses a state from a different dataset or batch size."""
        mine = self.state_dict()
        for k in ("seed", "samples", "batch_size"):
            if int(state[k]) != mine[k]:
                raise ValueError(f"sampler state is for {k}={state[k]}, this run has {mine[k]}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def collate(samples: Sequence, indices: Sequence[int], generator: Optional[torch.Generator] = None,
            sample: bool = True) -> dict:
    """Stack one batch: ``latents`` [B,C,h,w], ``captions``, ``mask`` [B,1,h,w] or None, ``paths``.

    Latents are posterior draws from ``generator`` (pass ``sample=False`` for means, e.g. to
    give ADDifT's original and target identical treatment). Samples without a mask get
    ones when another sample in the batch has one.
    """
    items = [samples[i] for i in indices]
    buckets = {s.bucket for s in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch must share one bucket, got {sorted(buckets)}")
    latents = torch.stack([s.latent(generator, sample) for s in items])
    masks = None
    if any(s.mask is not None for s in items):
        ones = torch.ones((1, *latents.shape[-2:]))
        masks = torch.stack([s.mask if s.mask is not None else ones for s in items])
    return {"latents": latents, "captions": [s.caption for s in items], "mask": masks,
            "bucket": items[0].bucket, "paths": [s.path for s in items]}
