"""Which images a caption run sees, where each one's caption lives, and how it is read for a model.

The image list follows the trainer's own discovery rules (same extensions, hidden files skipped,
sorted), so every image the training would use can be captioned and no other file is touched.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from ..data.discover import IMAGE_EXTENSIONS
from ..errors import UserError


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and its subfolders with ``recursive``), sorted; hidden ones skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    found = [p for p in pattern if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def caption_extension(ext: str) -> str:
    """``txt`` or ``.txt`` → ``.txt``; refuses what would overwrite an image or escape the folder."""
    ext = (ext or ".txt").strip()
    ext = ext if ext.startswith(".") else "." + ext
    if len(ext) < 2 or "/" in ext or "\\" in ext or ext.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"--caption-extension {ext!r}: give a file extension such as .txt or .caption")
    return ext


def caption_path(image: Path, extension: str = ".txt") -> Path:
    return image.with_suffix(extension)


def load_rgb(path: Path) -> Image.Image:
    """The image as the user sees it (EXIF rotation applied), transparency flattened onto white as the
    WD14 taggers' own preprocessing does. Raises for a file that does not decode."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return im.convert("RGB")
