"""Training data for LoRA and Multi-ADDifT (SPEC §5).

Two stages, so a bad folder fails before any model is loaded:

1. **Planning** (:mod:`.discover`, :mod:`.buckets`; PIL + numpy only): find images, read
   captions and repeats, build buckets, choose each image's placements (main bucket,
   sub-image copies, mirrors). ``load_dataset`` / ``discover_pairs`` raise ``UserError``
   when nothing is usable and return a report for the log and the UI.
2. **Encoding** (:mod:`.latents`, :mod:`.sampler`; torch): ``encode_dataset`` turns
   placements into cached latents; ``BucketBatchSampler`` + ``collate`` serve batches.

The torch-side names are imported lazily, so ``import trainer.data`` stays light.
"""
from __future__ import annotations

from .buckets import Buckets, Size, cover_crop, make_buckets
from .discover import (IMAGE_EXTENSIONS, Dataset, DatasetOptions, DatasetReport, ImageRecord, Pair,
                       PairDataset, Placement, discover_pairs, folder_repeats, iter_image_files,
                       join_caption, load_dataset, load_pixels, read_caption)

_LAZY = {"LatentSample": "latents", "encode_dataset": "latents", "vae_identity": "latents",
         "BucketBatchSampler": "sampler", "collate": "sampler"}

__all__ = ["Buckets", "Size", "cover_crop", "make_buckets", "IMAGE_EXTENSIONS", "Dataset",
           "DatasetOptions", "DatasetReport", "ImageRecord", "Pair", "PairDataset", "Placement",
           "discover_pairs", "folder_repeats", "iter_image_files", "join_caption", "load_dataset",
           "load_pixels", "read_caption", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
