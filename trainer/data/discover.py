"""Model-free dataset planning: find images, read captions, choose buckets and copies.

Everything here runs before any model is loaded, so a bad folder fails fast (SPEC §5:
"zero usable images is an error before any model work"). It imports PIL and numpy only.

Rules (and why):

* **Files**: recursive, sorted by relative path (deterministic order = reproducible runs);
  extensions compared case-insensitively (TrainTrain skipped ``.PNG``); hidden files and
  folders (``.name``) skipped. Every image is fully decoded once here so corrupt files are
  found now, all listed in one warning, rather than crashing mid-encode.
* **Captions**: ``NAME.txt`` wins over ``NAME.caption``; with ``image_use_filename_as_tag``
  the stem is used only when neither exists (TrainTrain let the stem override caption
  files, which silently discarded the user's captions). The stem is cut at ``_id_`` and
  ``_`` becomes ``, `` as TrainTrain does. Whitespace runs (newlines) become one space.
  The trigger word is prepended as ``"trigger, caption"`` with no stray comma.
* **Repeats**: ``image_num_multiply > 1`` is an explicit user choice and applies to every
  image. Otherwise (unset or 1) the nearest folder below the dataset root named ``N_concept``
  gives ``N`` (kohya); the root's own name is not used.
* **Orientation**: EXIF rotation is applied (what the user sees is what is trained).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from .buckets import Buckets, Size, cover_crop, make_buckets

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp"})
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
_EXIF_TRANSPOSED = {5, 6, 7, 8}   # orientations that swap width and height


@dataclass
class DatasetOptions:
    """The dataset settings (our names = TrainTrain's, ``image_size`` as (height, width))."""
    image_size: tuple[int, int] = (512, 512)
    image_buckets_step: int = 256
    image_min_length: int = 512
    image_max_ratio: float = 2.0
    image_num_multiply: int = 1
    sub_image_num: int = 0
    image_mirroring: bool = False
    image_use_filename_as_tag: bool = False
    image_disable_upscale: bool = False
    lora_trigger_word: str = ""
    background: tuple[int, int, int] = (255, 255, 255)   # alpha is composited on this
    alpha_mask: bool = True                              # keep a loss mask for transparent images

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, str):
            size = [int(v) for v in size.replace("x", ",").split(",") if v.strip()]
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(v) for v in size)
        self.image_size = size * 2 if len(size) == 1 else size  # type: ignore[assignment]

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "DatasetOptions":
        """Pick the dataset fields out of a settings dict (TrainTrain's key names accepted)."""
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in values.items() if k in known}
        if "image_size" not in kw and "image_size(height, width)" in values:
            kw["image_size"] = values["image_size(height, width)"]
        return cls(**kw)  # type: ignore[arg-type]

    def buckets(self) -> Buckets:
        return make_buckets(self.image_size, int(self.image_buckets_step), int(self.image_min_length),
                            float(self.image_max_ratio))


@dataclass
class ImageRecord:
    """One usable source image (sizes after EXIF rotation)."""
    path: Path
    rel: str                 # path relative to the dataset root, '/'-separated
    height: int
    width: int
    has_alpha: bool          # some pixel is not fully opaque
    caption: str
    repeats: int = 1


@dataclass(frozen=True)
class Placement:
    """One training sample before encoding: an image resized and cropped into a bucket."""
    record: ImageRecord
    bucket: Size
    flip: bool = False
    sub: bool = False        # a downscaled copy (``sub_image_num``), not the main placement
    background: tuple[int, int, int] = (255, 255, 255)
    alpha_mask: bool = True

    @property
    def repeats(self) -> int:
        return self.record.repeats


@dataclass
class DatasetReport:
    """What the scan found, for the log and the UI (nothing here raises)."""
    folder: str
    images: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)     # (rel path, reason)
    too_small: list[tuple[str, Size]] = field(default_factory=list)     # (rel path, bucket) skipped
    unmatched: list[tuple[str, str]] = field(default_factory=list)      # pairs: (rel path, reason)
    bucket_counts: dict[Size, int] = field(default_factory=dict)        # placements per bucket
    samples_per_epoch: int = 0                                          # placements x repeats
    notes: list[str] = field(default_factory=list)                      # other things worth telling

    def lines(self) -> list[str]:
        out = [f"{self.images} images in {self.folder}, {self.samples_per_epoch} samples per epoch"]
        out += [f"  bucket {h}x{w}: {n}" for (h, w), n in self.bucket_counts.items()]
        if self.unreadable:
            out.append(f"skipped {len(self.unreadable)} unreadable file(s): "
                       + "; ".join(f"{p} ({why})" for p, why in self.unreadable))
        if self.too_small:
            out.append(f"image_disable_upscale skipped {len(self.too_small)} placement(s): "
                       + "; ".join(f"{p} < {h}x{w}" for p, (h, w) in self.too_small))
        if self.unmatched:
            out.append(f"{len(self.unmatched)} unpaired file(s): "
                       + "; ".join(f"{p} ({why})" for p, why in self.unmatched))
        return out + self.notes


@dataclass
class Dataset:
    """The planned dataset: buckets, source images and every placement to encode."""
    options: DatasetOptions
    buckets: Buckets
    records: list[ImageRecord]
    placements: list[Placement]
    report: DatasetReport

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Caption tags counted per top folder (kohya's ``ss_tag_frequency`` shape)."""
        freq: dict[str, dict[str, int]] = {}
        for r in self.records:
            top = r.rel.split("/")[0] if "/" in r.rel else Path(self.report.folder).name
            counts = freq.setdefault(top, {})
            for tag in (t.strip() for t in r.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return freq


# ---------------------------------------------------------------------- files and captions
def iter_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, hidden entries skipped, sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _check_folder(folder: os.PathLike | str) -> Path:
    path = Path(folder).expanduser()
    if not str(folder).strip():
        raise UserError("lora_data_directory is empty: choose the folder that holds your training images")
    if not path.is_dir():
        raise UserError(f"image folder not found: {path} (lora_data_directory)")
    return path


def clean_text(text: str) -> str:
    """Strip and collapse whitespace (newlines in caption files become spaces)."""
    return " ".join(text.split())


def join_caption(trigger: str, caption: str) -> str:
    """``"trigger, caption"`` without a stray comma when either part is empty."""
    return ", ".join(p for p in (clean_text(trigger), clean_text(caption)) if p)


def filename_tag(path: Path) -> str:
    """TrainTrain's filename tag: the stem up to ``_id_``, underscores as tag separators."""
    stem = path.stem.split("_id_")[0]
    return ", ".join(t for t in (s.strip() for s in stem.split("_")) if t)


def read_caption(image: Path, use_filename: bool = False) -> str:
    """The caption for ``image``: ``.txt``, else ``.caption``, else (optionally) the file name."""
    for ext in (".txt", ".caption"):
        side = image.with_suffix(ext)
        if side.is_file():
            return clean_text(side.read_text(encoding="utf-8", errors="replace"))
    return filename_tag(image) if use_filename else ""


def folder_repeats(rel: str) -> int:
    """``N`` from the nearest ``N_concept`` folder in a relative path (kohya), else 1."""
    for part in reversed(rel.split("/")[:-1]):
        m = _REPEAT_DIR.match(part)
        if m and int(m.group(1)) >= 1:
            return int(m.group(1))
    return 1


# ---------------------------------------------------------------------- image decoding
class UnreadableImage(UserError):
    """An image file that cannot be decoded: one line naming the file; ``reason`` says why without it."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: not a readable image ({reason})")
        self.reason = reason


def _decode_problem(e: Exception) -> str:
    """The decoder's complaint as one short line. PIL's "cannot identify image file" quotes the file
    object it was given, here an in-memory buffer (``<_io.BytesIO object at 0x…>``) that names nothing
    the user knows, so that one is replaced; the caller names the path."""
    if isinstance(e, UnidentifiedImageError):
        return "unknown format or corrupt file"
    if isinstance(e, OSError) and e.strerror:            # file-system errors: the reason, not the path again
        return e.strerror
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:160]


def open_image(path: Path) -> Image.Image:
    """Decode fully (so truncated files fail here) and apply EXIF orientation; any failure is an
    :class:`UnreadableImage` naming ``path``. Read into memory first so no file handle outlives the call."""
    try:
        with Image.open(io.BytesIO(Path(path).read_bytes())) as im:
            im.load()
            out = ImageOps.exif_transpose(im)
            return out if out is not im else im.copy()
    except Exception as e:  # PIL's format plugins raise many types for bad data; all mean "unreadable"
        raise UnreadableImage(path, _decode_problem(e)) from None


def _has_alpha(im: Image.Image) -> bool:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return False
    return im.getchannel("A").getextrema()[0] < 255


def probe_image(path: Path) -> tuple[int, int, bool]:
    """(height, width, has_alpha) of a readable image; raises on anything unreadable."""
    im = open_image(path)
    if im.width < 1 or im.height < 1:
        raise UnreadableImage(path, "empty image")
    return im.height, im.width, _has_alpha(im)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pixels(p: Placement) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The placement's pixels as float32 ``[3, H, W]`` in [-1, 1] and its latent-size mask.

    Alpha is composited on ``p.background`` *before* resizing (so edges blend with the
    background, not with black); the mask is ``alpha > 0.5`` at pixel size, then
    area-averaged over each 8x8 block, giving a soft weight in [0, 1] per latent pixel.
    """
    im = open_image(p.record.path)
    alpha = None
    if im.mode in ("LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        alpha = im.getchannel("A")
        base = Image.new("RGB", im.size, tuple(p.background))
        base.paste(im.convert("RGB"), mask=alpha)
        im = base
    elif im.mode != "RGB":
        im = im.convert("RGB")
    (rh, rw), box, _ = cover_crop(im.height, im.width, p.bucket)
    im = im.resize((rw, rh), Image.LANCZOS).crop(box)
    if p.flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    mask = None
    if alpha is not None and p.alpha_mask and p.record.has_alpha:
        a = alpha.resize((rw, rh), Image.BILINEAR).crop(box)
        if p.flip:
            a = a.transpose(Image.FLIP_LEFT_RIGHT)
        binary = (np.asarray(a, dtype=np.float32) > 127.5).astype(np.float32)
        h, w = binary.shape
        mask = binary.reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3))[None]
    return np.ascontiguousarray(pixels), mask


# ---------------------------------------------------------------------- planning
def _scan(folder: Path, report: DatasetReport) -> list[ImageRecord]:
    """Every decodable image under ``folder``; the rest go to one warning and the report."""
    records = []
    for path in iter_image_files(folder):
        rel = path.relative_to(folder).as_posix()
        try:
            h, w, alpha = probe_image(path)
        except UnreadableImage as e:   # reported, never a crash
            report.unreadable.append((rel, e.reason))
            continue
        records.append(ImageRecord(path, rel, h, w, alpha, "", 1))
    if report.unreadable:
        log.warning("skipped %d unreadable image file(s) in %s: %s", len(report.unreadable), folder,
                    "; ".join(f"{p} ({why})" for p, why in report.unreadable))
    return records


def _repeats(rel: str, options: DatasetOptions) -> int:
    n = int(options.image_num_multiply or 1)
    return n if n > 1 else folder_repeats(rel)


def place(record: ImageRecord, buckets: Buckets, options: DatasetOptions, report: DatasetReport,
          bucket: Optional[Size] = None) -> list[Placement]:
    """The main placement, ``sub_image_num`` downscaled copies, and their mirrors."""
    main = bucket or buckets.closest(record.height, record.width)
    targets = [(main, False)] + [(b, True) for b in
                                 buckets.sub_for(record.height, record.width, main, int(options.sub_image_num))]
    out = []
    for b, is_sub in targets:
        if options.image_disable_upscale and cover_crop(record.height, record.width, b)[2] > 1.0 + 1e-9:
            report.too_small.append((record.rel, b))
            continue
        for flip in ((False, True) if options.image_mirroring else (False,)):
            out.append(Placement(record, b, flip, is_sub, tuple(options.background), options.alpha_mask))
    return out


def _finish(report: DatasetReport, placements: Sequence[Placement], repeats: Iterable[int],
            options: DatasetOptions, buckets: Buckets) -> None:
    if int(options.sub_image_num) > 0 and not buckets.sub:
        report.notes.append(f"sub_image_num={options.sub_image_num} has no effect: these settings make no "
                            "smaller buckets (lower image_min_length or image_buckets_step)")
        log.warning(report.notes[-1])
    counts: dict[Size, int] = {}
    for p in placements:
        counts[p.bucket] = counts.get(p.bucket, 0) + 1
    report.bucket_counts = dict(sorted(counts.items(), key=lambda kv: (kv[0][1] / kv[0][0], kv[0])))
    report.samples_per_epoch = sum(repeats)
    if report.too_small:
        log.warning("image_disable_upscale: skipped %d placement(s) smaller than their bucket: %s",
                    len(report.too_small), "; ".join(f"{p} < {h}x{w}" for p, (h, w) in report.too_small))
    for line in report.lines()[:1 + len(report.bucket_counts)]:
        log.info(line)


def load_dataset(folder: os.PathLike | str, options: Optional[DatasetOptions] = None) -> Dataset:
    """Scan ``folder`` and plan every placement; raises :class:`UserError` if nothing is usable."""
    options = options or DatasetOptions()
    root = _check_folder(folder)
    buckets = options.buckets()
    report = DatasetReport(str(root))
    records = _scan(root, report)
    placements: list[Placement] = []
    usable = []
    for r in records:
        r.caption = join_caption(options.lora_trigger_word,
                                 read_caption(r.path, options.image_use_filename_as_tag))
        r.repeats = _repeats(r.rel, options)
        ps = place(r, buckets, options, report)
        if ps:
            usable.append(r)
            placements += ps
    report.images = len(usable)
    _finish(report, placements, (p.record.repeats for p in placements), options, buckets)
    if not placements:
        raise UserError(_nothing_usable(root, report))
    return Dataset(options, buckets, usable, placements, report)


def _nothing_usable(root: Path, report: DatasetReport) -> str:
    why = []
    if report.unreadable:
        named = "; ".join(f"{p} ({reason})" for p, reason in report.unreadable[:3])
        why.append(f"{len(report.unreadable)} unreadable: {named}{'; …' if len(report.unreadable) > 3 else ''}")
    if report.too_small:
        why.append(f"{len({p for p, _ in report.too_small})} smaller than their bucket with image_disable_upscale on")
    if report.unmatched:
        why.append(f"{len(report.unmatched)} without a partner")
    exts = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    return (f"no usable training images in {root}" + (f" ({', '.join(why)})" if why else "")
            + f"; expected {exts} files (subfolders included)")


# ---------------------------------------------------------------------- Multi-ADDifT pairs
@dataclass
class Pair:
    """An (original, target) image pair with its caption; both use the original's bucket."""
    original: ImageRecord
    target: ImageRecord
    caption: str
    repeats: int = 1


@dataclass
class PairDataset:
    options: DatasetOptions
    buckets: Buckets
    pairs: list[Pair]
    placements: list[tuple[Placement, Placement]]      # (original, target), same bucket and flip
    report: DatasetReport


def discover_pairs(folder: os.PathLike | str, diff_target_name: str,
                   options: Optional[DatasetOptions] = None) -> PairDataset:
    """Pairs ``name.ext`` + ``name{diff_target_name}.ext`` (any image extension) per folder.

    Captions: the original's caption file, else the target's, else the filename rule, with
    the trigger word. Both images must share the aspect ratio (within 1%) because ADDifT
    compares them pixel for pixel; sizes may differ (each is resized into the same bucket).
    Unpaired or mismatched files are reported and skipped.
    """
    options = options or DatasetOptions()
    suffix = diff_target_name or ""
    if not suffix.strip():
        raise UserError("diff_target_name is empty: set the suffix that marks target images (e.g. _after)")
    root = _check_folder(folder)
    buckets = options.buckets()
    report = DatasetReport(str(root))
    records = {r.rel: r for r in _scan(root, report)}
    by_stem: dict[str, list[str]] = {}
    for rel in records:
        by_stem.setdefault(rel.rsplit(".", 1)[0], []).append(rel)
    unreadable_stems = {u.rsplit(".", 1)[0] for u, _ in report.unreadable}
    pairs, placements, used = [], [], set()
    for rel, orig in records.items():
        stem = rel.rsplit(".", 1)[0]
        partners = by_stem.get(stem + suffix, [])
        if not partners:
            if stem.endswith(suffix):
                if stem[:-len(suffix)] not in by_stem:
                    report.unmatched.append((rel, "original unreadable" if stem[:-len(suffix)] in unreadable_stems
                                             else "target without an original"))
                continue                      # a target: handled with its original
            why = ("target unreadable" if stem + suffix in unreadable_stems
                   else f"no {Path(stem).name}{suffix}.* target")
            report.unmatched.append((rel, why))
            continue
        same_ext = [p for p in partners if p.rsplit(".", 1)[1] == rel.rsplit(".", 1)[1]]
        target = records[(same_ext or partners)[0]]
        used.update({rel, target.rel})
        if abs(math.log((orig.width / orig.height) / (target.width / target.height))) > 0.01:
            report.unmatched.append((rel, f"size {orig.width}x{orig.height} does not match "
                                          f"{target.rel} {target.width}x{target.height} (aspect ratio)"))
            continue
        cap = read_caption(orig.path) or read_caption(target.path)
        if not cap and options.image_use_filename_as_tag:
            cap = filename_tag(orig.path)
        pair = Pair(orig, target, join_caption(options.lora_trigger_word, cap), _repeats(rel, options))
        orig.caption = target.caption = pair.caption
        orig.repeats = target.repeats = pair.repeats
        matched = []
        for po in place(orig, buckets, options, report):
            if options.image_disable_upscale and cover_crop(target.height, target.width, po.bucket)[2] > 1 + 1e-9:
                report.too_small.append((target.rel, po.bucket))
                continue
            matched.append((po, replace(po, record=target)))
        if matched:
            pairs.append(pair)
            placements += matched
    reported = {u for u, _ in report.unmatched}
    for rel in records:                      # e.g. NAME_after.png and NAME_after.jpg
        stem = rel.rsplit(".", 1)[0]
        if rel not in used and rel not in reported and stem.endswith(suffix) \
                and not any(o in reported for o in by_stem.get(stem[:-len(suffix)], [])):
            report.unmatched.append((rel, "another target of the same original was used"))
    report.images = len(pairs)
    if report.unmatched:
        log.warning("%d unpaired image file(s) in %s skipped: %s", len(report.unmatched), root,
                    "; ".join(f"{p} ({why})" for p, why in report.unmatched))
    _finish(report, [o for o, _ in placements], (o.record.repeats for o, _ in placements), options, buckets)
    if not placements:
        raise UserError(_nothing_usable(root, report).replace("training images", f"image pairs (NAME + NAME{suffix})"))
    return PairDataset(options, buckets, pairs, placements, report)
