"""One caption run over a folder: options checked first, then image by image, as a stream of progress.

Why a generator: the CLI draws its progress bar from it and the Caption panel turns each step into a
live gradio update, so both show the same run the same way. Everything the user can get wrong (the
folder, numbers, both ``overwrite`` and ``append``, the model's files) is checked before the model
loads; an image that does not decode is reported and skipped; an existing caption is never touched
unless asked; every caption is written atomically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from ..atomic import atomic_path
from ..errors import UserError
from .images import caption_extension, caption_path, find_images, load_rgb
from .tags import compose, parse_tag_list

BUILTIN_KINDS = ("wd14", "blip", "florence2")
DEFAULT_MAX_LENGTH = {"blip": 75, "florence2": 256}


@dataclass
class CaptionOptions:
    """What a caption run does; the CLI flags and the panel's widgets map onto these one to one."""
    kind: str = "wd14"
    model: str = ""                        # folder, .onnx file or Hugging Face repo id ("" = the kind's default)
    trigger: str = ""
    threshold: float = 0.35                # WD14 general tags (kohya's --thresh / --general_threshold)
    character_threshold: Optional[float] = None   # WD14 character tags; None = threshold
    exclude: list = field(default_factory=list)
    mode: str = "keep"                     # keep | overwrite | append
    extension: str = ".txt"
    recursive: bool = False
    batch_size: int = 1
    rating: str = "none"                   # WD14 rating tag: none | first | last
    character_first: bool = False
    underscores_to_spaces: bool = True
    device: Optional[str] = None
    num_beams: int = 3                     # BLIP / Florence-2
    max_length: int = 0                    # 0 = the kind's default
    min_length: int = 5
    task: str = "more_detailed"            # Florence-2
    prompt: str = ""                       # BLIP conditional captioning prefix

    def check(self, kinds: tuple = BUILTIN_KINDS) -> "CaptionOptions":
        """Raise a one-line :class:`UserError` for any bad value; returns itself, normalised."""
        if self.kind not in kinds:
            raise UserError(f"kind: unknown captioner {self.kind!r}; choose one of {', '.join(kinds)}")
        for name in ("threshold", "character_threshold"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) \
                    or not 0.0 <= value <= 1.0:
                raise UserError(f"{name.replace('_', '-')}: {value!r} is not a probability between 0 and 1")
        if self.mode not in ("keep", "overwrite", "append"):
            raise UserError(f"mode {self.mode!r}: choose keep, overwrite or append")
        for name in ("batch_size", "num_beams"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name.replace('_', '-')}: must be 1 or more")
        if int(self.max_length) < 0 or int(self.min_length) < 0:
            raise UserError("max-length and min-length cannot be negative")
        self.extension = caption_extension(self.extension)
        self.exclude = parse_tag_list(self.exclude)
        self.trigger = (self.trigger or "").strip()
        if "," in self.trigger:
            raise UserError(f"trigger {self.trigger!r}: one tag, without commas")
        return self


@dataclass
class Item:
    image: Path
    status: str                 # written | kept | failed
    caption: str = ""
    reason: str = ""


@dataclass
class Progress:
    done: int
    total: int
    item: Optional[Item] = None
    message: str = ""


@dataclass
class Summary:
    items: list = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for i in self.items if i.status == status)

    def line(self) -> str:
        return f"written {self.count('written')}, kept {self.count('kept')}, failed {self.count('failed')}"


# A factory checks what it needs from the options (files, packages) and returns the loader of the model:
# the checks run before any progress is shown, the loading after. The WebUI host adds its own kinds.
Factory = Callable[[CaptionOptions, Callable[[str], None]], Callable[[], object]]


def open_builtin(options: CaptionOptions, log: Callable[[str], None]) -> Callable[[], object]:
    """The WD14 tagger, BLIP or Florence-2, with weights from ``options.model`` or the HF cache."""
    from .weights import resolve
    folder = resolve(options.kind, options.model, log)
    if options.kind == "wd14":
        from .wd14 import WD14Tagger, import_onnxruntime
        import_onnxruntime()
        return lambda: WD14Tagger(folder, options.threshold, options.character_threshold, options.rating,
                                  options.character_first, options.underscores_to_spaces, options.device)
    max_length = options.max_length or DEFAULT_MAX_LENGTH[options.kind]
    from .hf import BlipCaptioner, FlorenceCaptioner, check_florence2, pick_device
    pick_device(options.device)          # a device this machine lacks: refused before any progress
    if options.kind == "florence2":
        check_florence2()
    if options.kind == "blip":
        return lambda: BlipCaptioner(folder, options.device, options.num_beams, max_length, options.min_length,
                                     options.prompt)
    return lambda: FlorenceCaptioner(folder, options.device, options.num_beams, max_length, 0, options.task)


def _read_existing(path: Path) -> Optional[str]:
    if not path.exists():
        return None
    return path.read_text(encoding="utf-8")


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def caption_folder(folder: Path, options: CaptionOptions, extra: Optional[Mapping[str, Factory]] = None,
                   log: Callable[[str], None] = lambda m: None) -> Iterator[Progress]:
    """Caption every image of ``folder``; yields a :class:`Progress` per image (and one before the model
    loads). ``extra``: more kinds by name (the WebUI's interrogators)."""
    extra = dict(extra or {})
    options.check(BUILTIN_KINDS + tuple(extra))
    images = find_images(Path(folder), options.recursive)
    if not images:
        raise UserError(f"{folder}: no images ({', '.join(sorted(_exts()))})"
                        + ("" if options.recursive else "; use --recursive for subfolders"))
    targets = [(image, caption_path(image, options.extension)) for image in images]
    todo = [image for image, target in targets if not (options.mode == "keep" and target.exists())]
    load = (extra.get(options.kind) or open_builtin)(options, log) if todo else None
    total, done, pending = len(images), 0, set(todo)
    for image, target in targets:
        if image not in pending:
            done += 1
            yield Progress(done, total, Item(image, "kept", reason=f"{target.name} exists"))
    if not todo:
        return
    yield Progress(done, total, message=f"loading {options.kind}")
    captioner = load()
    try:
        for start in range(0, len(todo), options.batch_size):
            batch, loaded = todo[start:start + options.batch_size], []
            for image in batch:
                try:
                    loaded.append((image, load_rgb(image)))
                except Exception as e:   # noqa: BLE001 - any decoder error means "skip this file"
                    done += 1
                    reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                    yield Progress(done, total, Item(image, "failed", reason=f"not a readable image ({reason})"))
            if not loaded:
                continue
            results = captioner.caption([im for _, im in loaded])
            for (image, _), pieces in zip(loaded, results):
                done += 1
                yield Progress(done, total, _finish(image, pieces, options))
    finally:
        captioner.close()


def _finish(image: Path, pieces, options: CaptionOptions) -> Item:
    """Write one image's caption (or say why not)."""
    if pieces is None:
        return Item(image, "failed", reason="the captioner failed on this image")
    target = caption_path(image, options.extension)
    try:
        existing = _read_existing(target)
    except (OSError, UnicodeDecodeError) as e:
        return Item(image, "failed", reason=f"{target.name}: existing caption unreadable ({e})")
    text = compose(pieces, existing, options.mode, options.trigger, options.exclude)
    if text is None:
        return Item(image, "kept", existing or "", f"{target.name} exists")
    try:
        _write(target, text)
    except OSError as e:
        return Item(image, "failed", reason=f"{target}: cannot write ({e.strerror or e})")
    return Item(image, "written", text)


def _exts() -> set:
    from ..data.discover import IMAGE_EXTENSIONS
    return set(IMAGE_EXTENSIONS)


def run_all(folder: Path, options: CaptionOptions, extra: Optional[Mapping[str, Factory]] = None,
            log: Callable[[str], None] = lambda m: None,
            on_progress: Callable[[Progress], None] = lambda p: None) -> Summary:
    """The whole run, collected (for callers that do not stream)."""
    summary = Summary()
    for progress in caption_folder(folder, options, extra, log):
        on_progress(progress)
        if progress.item is not None:
            summary.items.append(progress.item)
    return summary
