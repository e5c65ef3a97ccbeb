"""Regularisation ("class") images with kohya's semantics: folders, balance, captions.

``lora_reg_directory`` holds ``N_class`` folders like the training folder (``1_circle``: repeats 1,
class ``circle``). Reg images are planned with the very bucket and placement code of the training
images, so they are encoded, cached and batched the same way; their loss is weighted by
``prior_loss_weight`` per sample.

**Balance** (kohya sd-scripts, ``DreamBoothDataset.__init__``): let ``T`` be the training samples
per epoch (images x repeats). Reg images are taken in file order; a first pass registers each one
with its folder's repeats until ``T`` is reached (so the last one may overshoot by up to its
repeats - 1); while the count is still below ``T``, further passes add one repeat to each image in
order. Reg images beyond that point are not used at all (kohya warns; so does this module). So
each epoch holds about as many reg samples as training samples: 10 training images x 2 repeats
with 50 reg images uses the first 20 reg images once each; with 10 reg images each appears twice.
kohya's ``num_reg_images`` (metadata ``ss_num_reg_images``) is counted *before* balancing: reg
images x their folder repeats.

**Captions**: the image's ``.txt``/``.caption`` file, else the class from its ``N_class`` folder
(kohya's ``class_tokens``). The trigger word is never added: reg images show the class *without*
the concept, which is their whole point. Images outside an ``N_class`` folder are skipped with a
warning, as kohya does.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from .buckets import Buckets
from .discover import DatasetOptions, DatasetReport, Placement, _scan, clean_text, place, read_caption

log = logging.getLogger(__name__)

_CLASS_DIR = re.compile(r"^(\d+)_(.+)$")
FIELD = "lora_reg_directory"


def balance(repeats: Sequence[int], train_samples: int) -> list[int]:
    """kohya's balance: new repeats per reg image (0 = unused) for ``train_samples`` training samples."""
    out = [0] * len(repeats)
    if not repeats or train_samples <= 0:
        return out
    n, first = 0, True
    while n < train_samples:
        for i, r in enumerate(repeats):
            if first:
                out[i] = r
                n += r
            else:
                out[i] += 1
                n += 1
            if n >= train_samples:
                break
        first = False
    return out


@dataclass
class RegImages:
    """The planned reg placements (repeats already balanced) and what kohya's metadata says of them."""
    placements: list[Placement]
    num_reg_images: int                                   # images x folder repeats, before balancing
    dirs: dict[str, dict[str, int]] = field(default_factory=dict)   # ss_reg_dataset_dirs
    samples_per_epoch: int = 0
    unused: int = 0                                       # reg images the balance leaves out
    report: Optional[DatasetReport] = None

    def lines(self) -> list[str]:
        out = [f"{len({p.record.rel for p in self.placements})} regularisation images in "
               f"{self.report.folder if self.report else '?'} ({self.num_reg_images} with repeats), "
               f"{self.samples_per_epoch} reg samples per epoch"]
        if self.unused:
            out.append(f"{self.unused} regularisation image(s) left unused: there are more than training "
                       "samples per epoch (kohya's balance)")
        return out


def _class_dir(rel: str) -> Optional[re.Match]:
    for part in reversed(rel.split("/")[:-1]):
        m = _CLASS_DIR.match(part)
        if m and int(m.group(1)) >= 1:
            return m
    return None


def load_reg_images(folder: os.PathLike | str, options: DatasetOptions, buckets: Buckets,
                    train_samples: int) -> RegImages:
    """Scan ``folder`` (``N_class`` sub-folders), balance against ``train_samples``; one-line errors."""
    raw = str(folder).strip()
    path = Path(raw)
    if not path.is_dir():
        raise UserError(f"{FIELD}: folder not found: {path}")
    report = DatasetReport(str(path))
    records = _scan(path, report)
    usable, outside = [], []
    for r in records:
        m = _class_dir(r.rel)
        if m is None:
            outside.append(r.rel)
            continue
        r.repeats = int(m.group(1))
        r.caption = read_caption(r.path, options.image_use_filename_as_tag) or clean_text(m.group(2))
        usable.append(r)
    if outside:
        log.warning("%s: %d image(s) outside an N_class folder skipped (e.g. %s)", FIELD, len(outside), outside[0])
    if not usable:
        found = f"{len(records)} image(s), none inside" if records else "no readable image in"
        raise UserError(f"{FIELD}: {found} an N_class folder under {path}; put the class images in a folder "
                        f"named like 1_circle (repeats_class)")
    dirs: dict[str, dict[str, int]] = {}
    for r in usable:
        name = r.rel.split("/")[0]
        d = dirs.setdefault(name, {"n_repeats": r.repeats, "img_count": 0})
        d["img_count"] += 1
    num_reg = sum(r.repeats for r in usable)
    per_image: list[list[Placement]] = [place(r, buckets, options, report) for r in usable]   # no trigger word
    new = balance([r.repeats for r in usable], train_samples)
    placements: list[Placement] = []
    for r, ps, k in zip(usable, per_image, new):
        if k <= 0 or not ps:
            continue
        rec = replace(r, repeats=k)
        placements += [replace(p, record=rec) for p in ps]
    if not placements:
        raise UserError(f"{FIELD}: no usable regularisation image in {path} (all smaller than their bucket "
                        "with image_disable_upscale on)")
    unused = sum(1 for k in new if k <= 0)
    if unused:
        log.warning("%s: %d of %d regularisation images unused (more than the %d training samples per epoch)",
                    FIELD, unused, len(usable), train_samples)
    return RegImages(placements, num_reg, dirs, sum(p.record.repeats for p in placements), unused, report)
