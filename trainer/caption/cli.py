"""``python -m trainer caption DIR``: caption a folder of images with a progress bar and a summary.

kohya's spellings of the shared flags are accepted too (``--caption_extension``, ``--batch_size``,
``--thresh``, ``--general_threshold``, ``--undesired_tags``, ``--append_tags`` ...), so a kohya user's
command line needs only the script name changed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from .run import BUILTIN_KINDS, CaptionOptions, Progress, Summary, caption_folder
from .weights import KINDS
from .wd14 import RATING_PLACES
from .hf import FLORENCE_TASKS


def _flag(parser, name: str, *aliases: str, **kw):
    """``--batch-size`` also as ``--batch_size`` (kohya's spelling)."""
    names = [name, *aliases]
    names += [n.replace("-", "_").replace("__", "--", 1) for n in names if "-" in n[2:]]
    return parser.add_argument(*dict.fromkeys(names), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer caption",
                                description="Write a caption file beside every image of a folder (WD14 tags, "
                                            "BLIP or Florence-2 sentences). Existing captions are kept unless "
                                            "--overwrite or --append.")
    p.add_argument("folder", help="folder of images")
    p.add_argument("--kind", choices=BUILTIN_KINDS, default="wd14",
                   help="wd14 (ONNX tagger, onnxruntime), blip or florence2 (transformers); default wd14")
    p.add_argument("--model", default="",
                   help="model folder (WD14: the .onnx and selected_tags.csv), or a Hugging Face repo id; default: "
                        + ", ".join(f"{k} {v.repo}" for k, v in KINDS.items()) + " from the Hugging Face cache")
    p.add_argument("--trigger", default="", help="trigger word, written as the first tag of every caption")
    _flag(p, "--threshold", "--thresh", "--general-threshold", type=float, default=0.35,
          help="WD14: keep general tags with probability >= this (default 0.35)")
    _flag(p, "--character-threshold", type=float, default=None,
          help="WD14: keep character tags with probability >= this (default: --threshold)")
    _flag(p, "--exclude", "--undesired-tags", default="", help="comma-separated tags never written")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace existing captions")
    _flag(mode, "--append", "--append-tags", action="store_true",
          help="add new tags/text after existing captions (no duplicate tags)")
    _flag(p, "--caption-extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    _flag(p, "--batch-size", type=int, default=1, help="images per model call (default 1)")
    p.add_argument("--rating", choices=RATING_PLACES, default="none",
                   help="WD14: add the most likely rating tag first or last (default none)")
    _flag(p, "--character-tags-first", action="store_true", help="WD14: character tags before general tags")
    _flag(p, "--keep-underscores", action="store_true",
          help="WD14: keep underscores in tags (default: long_hair -> long hair; kaomoji like ^_^ stay)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _flag(p, "--num-beams", type=int, default=3, help="BLIP/Florence-2: beam search width (default 3)")
    _flag(p, "--max-length", type=int, default=0, help="BLIP/Florence-2: longest caption in tokens "
                                                       "(default 75 for BLIP, 256 for Florence-2)")
    _flag(p, "--min-length", type=int, default=5, help="BLIP: shortest caption in tokens (default 5)")
    p.add_argument("--task", choices=list(FLORENCE_TASKS), default="more_detailed",
                   help="Florence-2: caption, detailed or more_detailed (default, as kohya)")
    p.add_argument("--prompt", default="", help="BLIP: text the caption continues (e.g. 'a photo of')")
    return p


def options_from_args(args: argparse.Namespace) -> CaptionOptions:
    return CaptionOptions(
        kind=args.kind, model=args.model, trigger=args.trigger, threshold=args.threshold,
        character_threshold=args.character_threshold, exclude=args.exclude,
        mode="overwrite" if args.overwrite else "append" if args.append else "keep",
        extension=args.caption_extension, recursive=args.recursive, batch_size=args.batch_size,
        rating=args.rating, character_first=args.character_tags_first,
        underscores_to_spaces=not args.keep_underscores, device=args.device, num_beams=args.num_beams,
        max_length=args.max_length, min_length=args.min_length, task=args.task, prompt=args.prompt)


class ProgressBar:
    """A one-line bar redrawn with ``\\r`` on stderr: ``[#####-----] 12/40  30% 1.2 img/s  name.png``."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30):
        self.stream, self.width, self.start, self.shown = stream, width, time.monotonic(), False

    def update(self, p: Progress) -> None:
        frac = p.done / p.total if p.total else 1.0
        filled = int(round(frac * self.width))
        rate = p.done / max(time.monotonic() - self.start, 1e-6)
        name = p.item.image.name if p.item else p.message
        line = f"[{'#' * filled}{'-' * (self.width - filled)}] {p.done}/{p.total} {frac:4.0%} {rate:.1f} img/s {name}"
        self.stream.write("\r" + line[:120].ljust(120))
        self.stream.flush()
        self.shown = True

    def note(self, text: str) -> None:
        """A line of its own above the bar."""
        self.stream.write(("\r" + " " * 120 + "\r" if self.shown else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    bar = ProgressBar()
    summary = Summary()
    try:
        for progress in caption_folder(Path(args.folder), options, log=bar.note):
            bar.update(progress)
            if progress.item is None:
                continue
            summary.items.append(progress.item)
            if progress.item.status == "failed":
                bar.note(f"failed: {progress.item.image}: {progress.item.reason}")
    finally:
        bar.close()
    print(f"captions in {args.folder}: {summary.line()}")
    return 0
