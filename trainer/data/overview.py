"""A dataset folder as the user should see it before training: every image with its caption, repeats
per ``N_concept`` folder, the bucket each image lands in and the bucket histogram (SPEC §16).

Why a module of its own: the Dataset panel, the HTTP API (``GET /dataset``) and the tests all read
the same JSON-able :class:`Overview`, and it is computed by training's own planning code
(:func:`.discover.load_dataset` with the run's :class:`DatasetOptions`), so the histogram shown is
the one training logs, line for line (``DatasetReport.lines()``), never a second implementation
that could drift. Model-free: PIL and numpy only.

Scanning decodes every image (that is how training finds corrupt files), which is slow on a large
folder; the plan is cached per (folder, options, image files' size and mtime), so paging and saving a
caption do not scan again. Captions are read fresh for the shown page only (a caption edit does not
change the plan: buckets and repeats come from the images and folder names).
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..atomic import atomic_path
from ..errors import UserError
from .buckets import Size
from .discover import (IMAGE_EXTENSIONS, Dataset, DatasetOptions, DatasetReport, _check_folder, _scan,
                       iter_image_files, join_caption, load_dataset, read_caption)

CAPTION_EXTENSIONS = (".txt", ".caption")      # read_caption's order: .txt wins
PER_PAGE = 48                                  # thumbnails per page: a folder of 10 000 never goes to the browser
_CACHE_SIZE = 4


@dataclass
class ImageRow:
    """One image file as the panel lists it."""
    rel: str                          # path under the dataset folder, '/'-separated
    folder: str                       # its folder under the dataset root ("." for the root itself)
    status: str                       # "ok", "unreadable" or "skipped" (image_disable_upscale)
    reason: str = ""                  # why it is unreadable or skipped
    height: int = 0
    width: int = 0
    repeats: int = 0
    bucket: Optional[str] = None      # "HxW" of its main placement, as training logs buckets
    placements: int = 0               # main + sub-image copies + mirrors
    caption: str = ""                 # the caption file's text as written ("" when there is none)
    caption_file: str = ""            # which file holds it (NAME.txt / NAME.caption), "" when none yet
    trained_caption: str = ""         # what training feeds the text encoder (trigger word, filename rule)


@dataclass
class ConceptRow:
    """Repeats per folder (kohya's ``N_concept``): how much each folder weighs in an epoch."""
    folder: str
    repeats: int
    images: int
    samples_per_epoch: int


@dataclass
class Overview:
    folder: str
    files: list[str]                          # every image file (rel), readable or not, in training's order
    rows: dict[str, ImageRow]                 # rel -> row without captions (filled per page)
    concepts: list[ConceptRow]
    histogram: list[tuple[Size, int]]         # placements per bucket, in the order training logs them
    samples_per_epoch: int
    images: int                               # usable images (what training counts)
    log_lines: list[str]                      # exactly what training prints about this dataset
    error: str = ""                           # training's own refusal when nothing is usable
    samples: list[tuple[Size, int]] = field(default_factory=list)   # (bucket, repeats) per placement: the epochs

    @property
    def pages(self) -> int:
        return max(1, math.ceil(len(self.files) / PER_PAGE))

    def page(self, number: int, per_page: int = PER_PAGE, trigger: str = "", use_filename: bool = False
             ) -> list[ImageRow]:
        """The rows of page ``number`` (0-based, clamped), captions read now from the files."""
        per_page = max(1, int(per_page))
        number = min(max(0, int(number)), max(0, math.ceil(len(self.files) / per_page) - 1))
        out = []
        for rel in self.files[number * per_page:(number + 1) * per_page]:
            row = ImageRow(**asdict(self.rows[rel]))
            path = Path(self.folder) / rel
            row.caption, row.caption_file = caption_text(path)
            if row.status == "ok":
                row.trained_caption = join_caption(trigger, read_caption(path, use_filename))
            out.append(row)
        return out

    def histogram_lines(self) -> list[str]:
        """The histogram in training's wording (``  bucket HxW: n``)."""
        return [f"  bucket {h}x{w}: {n}" for (h, w), n in self.histogram]

    def to_dict(self, page: int = 0, per_page: int = PER_PAGE, options: Optional[DatasetOptions] = None) -> dict:
        """The JSON the API returns: totals for the whole folder, rows for one page."""
        o = options or DatasetOptions()
        per_page = max(1, int(per_page))
        pages = max(1, math.ceil(len(self.files) / per_page))
        page = min(max(0, int(page)), pages - 1)
        return {"folder": self.folder, "files": len(self.files), "images": self.images,
                "samples_per_epoch": self.samples_per_epoch, "error": self.error,
                "histogram": [{"bucket": f"{h}x{w}", "height": h, "width": w, "count": n}
                              for (h, w), n in self.histogram],
                "concepts": [asdict(c) for c in self.concepts], "log": self.log_lines,
                "page": page, "pages": pages, "per_page": per_page,
                "rows": [asdict(r) for r in self.page(page, per_page, o.lora_trigger_word,
                                                       o.image_use_filename_as_tag)]}


def caption_text(image: Path) -> tuple[str, str]:
    """(text, file name) of the caption file training reads for ``image`` (``.txt`` before ``.caption``);
    ("", "") when it has none. The text is as written (stripped), so editing it changes nothing else."""
    for ext in CAPTION_EXTENSIONS:
        side = image.with_suffix(ext)
        if side.is_file():
            return side.read_text(encoding="utf-8", errors="replace").strip(), side.name
    return "", ""


def _folder_of(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else "."


def _signature(root: Path, files: list[Path]) -> tuple:
    """What the plan depends on besides the options: each image's name, size and mtime."""
    sig = []
    for p in files:
        try:
            st = p.stat()
            sig.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((p.relative_to(root).as_posix(), -1, -1))
    return tuple(sig)


def _build(root: Path, files: list[Path], options: DatasetOptions) -> Overview:
    rels = [p.relative_to(root).as_posix() for p in files]
    error = ""
    try:
        dataset: Optional[Dataset] = load_dataset(root, options)       # training's planning, unchanged
        report = dataset.report
    except UserError as e:                                             # nothing usable: show why, and the files
        dataset, error = None, str(e)
        report = DatasetReport(str(root))
        _scan(root, report)
    rows = {rel: ImageRow(rel, _folder_of(rel), "ok") for rel in rels}

    def row_of(rel: str) -> ImageRow:          # a file that appeared between the listing and the scan
        if rel not in rows:
            rels.append(rel)
            rows[rel] = ImageRow(rel, _folder_of(rel), "ok")
        return rows[rel]
    for rel, why in report.unreadable:
        row_of(rel).status, rows[rel].reason = "unreadable", why
    skipped: dict[str, list[Size]] = {}
    for rel, bucket in report.too_small:
        skipped.setdefault(rel, []).append(bucket)
    concepts: dict[str, ConceptRow] = {}
    if dataset is not None:
        for rec in dataset.records:
            row = row_of(rec.rel)
            row.height, row.width, row.repeats = rec.height, rec.width, rec.repeats
        for p in dataset.placements:
            row = rows[p.record.rel]
            row.placements += 1
            if not p.sub and not p.flip:
                row.bucket = f"{p.bucket[0]}x{p.bucket[1]}"
            c = concepts.setdefault(row.folder, ConceptRow(row.folder, p.record.repeats, 0, 0))
            c.samples_per_epoch += p.record.repeats
        for rec in dataset.records:
            concepts[rows[rec.rel].folder].images += 1
    for rel, buckets in skipped.items():
        row = row_of(rel)
        if row.bucket is None:                     # no placement at all: the image is not trained
            row.status = "skipped"
        row.reason = "smaller than bucket " + ", ".join(f"{h}x{w}" for h, w in buckets) + \
            " (image_disable_upscale)"
    lines = report.lines() if dataset is not None else [error]
    return Overview(str(root), rels, rows, sorted(concepts.values(), key=lambda c: c.folder),
                    list(report.bucket_counts.items()), report.samples_per_epoch, report.images, lines, error,
                    [(p.bucket, p.record.repeats) for p in dataset.placements] if dataset is not None else [])


_cache: "OrderedDict[tuple, Overview]" = OrderedDict()
_lock = threading.Lock()


def dataset_overview(folder: os.PathLike | str, options: Optional[DatasetOptions] = None) -> Overview:
    """The folder planned as training plans it (cached while the images are unchanged).

    Raises :class:`UserError` only for a folder that does not exist; a folder with nothing usable
    comes back with ``error`` set (the line training would stop with) and its files listed.
    """
    options = options or DatasetOptions()
    root = _check_folder(str(folder).strip())         # as training names it (its log line quotes this path)
    files = iter_image_files(root)
    key = (str(root.resolve()), str(root), repr(options), _signature(root, files))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    overview = _build(root, files, options)
    with _lock:
        _cache[key] = overview
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return overview


def save_caption(folder: os.PathLike | str, rel: str, text: str) -> Path:
    """Write ``text`` as the caption of image ``rel`` under ``folder``, atomically; returns the file.

    The file written is the one training reads (``NAME.txt``, or ``NAME.caption`` when only that
    exists); an image without a caption gets a new ``NAME.txt``. ``rel`` must name an image file
    inside ``folder`` (no ``..``, no absolute path), so this cannot write anywhere else.
    """
    root = _check_folder(str(folder).strip()).resolve()
    if not rel or not str(rel).strip():
        raise UserError("select an image first")
    image = (root / rel).resolve()
    if root not in image.parents:
        raise UserError(f"{rel}: not inside {root}")
    if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
        raise UserError(f"{rel}: no such image in {root}")
    _, existing = caption_text(image)
    target = image.with_name(existing) if existing else image.with_suffix(".txt")
    with atomic_path(target) as tmp:
        tmp.write_text(str(text).strip(), encoding="utf-8")
    return target
