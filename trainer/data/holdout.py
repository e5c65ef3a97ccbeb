"""Which images are held out for the validation loss (``validation_split`` / ``validation_directory``).

Model-free, so a split that leaves nothing to train on, or an unusable validation folder, fails in
seconds before any model is loaded. The split is a pure function of the images' paths (relative to
the dataset folder, sorted) and the seed: the same folder and seed hold out the same images on every
run and machine, and a held-out image is never trained on (none of its placements -- mirrors and
sub-images included -- reach the training set). Validation scores each held-out image once, at its
main bucket, unmirrored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import UserError
from .discover import Dataset, DatasetOptions, Placement, load_dataset


def holdout_count(n_images: int, fraction: float) -> int:
    """Images held out of ``n_images`` for ``validation_split`` = ``fraction`` (at least one when on)."""
    if fraction <= 0:
        return 0
    return max(1, int(round(n_images * fraction)))


@dataclass
class Holdout:
    """The validation plan of a LoRA run: a fraction of the training folder, or a folder of its own."""
    fraction: float = 0.0
    folder: Optional[Dataset] = None

    @property
    def on(self) -> bool:
        return self.fraction > 0 or self.folder is not None


def plan_holdout(dataset: Dataset, options: DatasetOptions, fraction: float, directory: str) -> Holdout:
    """Check the validation settings against the planned dataset (raises a one-line ``UserError``)."""
    if directory:
        try:
            folder = load_dataset(directory, options)
        except UserError as e:
            raise UserError(f"validation_directory: {e}") from None
        return Holdout(folder=folder)
    if fraction > 0:
        n = len(dataset.records)
        k = holdout_count(n, fraction)
        if k >= n:
            raise UserError(f"validation_split: {fraction:g} of {n} image(s) holds out {k}, leaving none to "
                            f"train on; lower it (e.g. 0.1) or add images")
    return Holdout(fraction=fraction)


def held_out_rels(rels: list[str], fraction: float, seed: int) -> set[str]:
    """The relative paths held out of ``rels`` (order-independent)."""
    keys = sorted(set(rels))
    k = holdout_count(len(keys), fraction)
    order = np.random.default_rng(int(seed) & 0xFFFFFFFF).permutation(len(keys))
    return {keys[i] for i in order[:k]}


def split(dataset: Dataset, holdout: Holdout, seed: int) -> tuple[list[Placement], list[Placement]]:
    """(training placements, validation placements: one main, unmirrored placement per image)."""
    if holdout.folder is not None:
        return list(dataset.placements), _main(holdout.folder.placements)
    if holdout.fraction <= 0:
        return list(dataset.placements), []
    held = held_out_rels([r.rel for r in dataset.records], holdout.fraction, seed)
    train = [p for p in dataset.placements if p.record.rel not in held]
    return train, _main([p for p in dataset.placements if p.record.rel in held])


def _main(placements: list[Placement]) -> list[Placement]:
    return [p for p in placements if not p.flip and not p.sub]
