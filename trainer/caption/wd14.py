"""WD14-style taggers (SmilingWolf's ONNX models) through onnxruntime.

The model takes a batch of square BGR images, NHWC float32 in 0..255 (no normalisation), padded to a
square with white and resized to the model's input size (448 for the v2/v3 taggers), and gives one
probability per row of ``selected_tags.csv`` (columns ``tag_id,name,category,count``). Category 9 rows
are the ratings: exactly one is chosen, by the highest probability, and only when asked for (kohya's
``--use_rating_tags``); category 4 rows are characters, kept above the character threshold; every other
row is a general tag, kept above the general threshold (``>=``, as kohya compares).
"""
from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import UserError
from .tags import underscores_to_spaces

RATING, CHARACTER, GENERAL = 9, 4, 0
DEFAULT_SIZE = 448
RATING_PLACES = ("none", "first", "last")


def import_onnxruntime():
    """onnxruntime is optional at run time (only the WD14 taggers need it)."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise UserError("the WD14 tagger needs the package 'onnxruntime', which is not installed: "
                        "pip install onnxruntime (or onnxruntime-gpu)") from None


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def read_selected_tags(path: Path) -> list[Tag]:
    """``selected_tags.csv``: one row per model output, in output order."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise UserError(f"{path}: not a WD14 selected_tags.csv (the header must start tag_id,name,category)")
    try:
        return [Tag(r[1], int(r[2])) for r in rows[1:] if r]
    except (IndexError, ValueError):
        raise UserError(f"{path}: a row lacks a name or a numeric category") from None


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image → (size, size, 3) float32 BGR 0..255, padded to a square with white first."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


class WD14Tagger:
    """Tags for a batch of images: ``caption(images) -> [[tag, ...], ...]``."""

    kind = "wd14"

    def __init__(self, folder: Path, threshold: float = 0.35, character_threshold: float | None = None,
                 rating: str = "none", character_first: bool = False, underscores: bool = True,
                 device: str | None = None):
        folder = Path(folder)
        models = sorted(folder.glob("*.onnx"))
        if not models:
            raise UserError(f"{folder}: no .onnx model in the folder")
        onnx_path = folder / "model.onnx" if (folder / "model.onnx").is_file() else models[0]
        self.tags = read_selected_tags(folder / "selected_tags.csv")
        if rating not in RATING_PLACES:
            raise UserError(f"--rating {rating!r}: choose one of {', '.join(RATING_PLACES)}")
        self.threshold = float(threshold)
        self.character_threshold = float(threshold if character_threshold is None else character_threshold)
        self.rating, self.character_first, self.underscores = rating, character_first, underscores
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        wanted = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in available]
        providers = ["CPUExecutionProvider"] if device == "cpu" else wanted + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=providers)
        except Exception as e:   # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise UserError(f"{onnx_path}: not a loadable ONNX model ({str(e).splitlines()[0][:160]})") from None
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3:
            raise UserError(f"{onnx_path}: not a WD14 tagger (input {inp.name} has shape {shape}, "
                            "expected batch, height, width, 3)")
        self.input_name = inp.name
        self.size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        out = self.session.get_outputs()[0].shape
        if isinstance(out[-1], int) and out[-1] != len(self.tags):
            raise UserError(f"{onnx_path}: the model has {out[-1]} outputs but selected_tags.csv "
                            f"lists {len(self.tags)} tags")

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = np.stack([preprocess(im, self.size) for im in images])
        if self.fixed_batch:          # a model exported for one batch size: run in pieces of that size
            parts = []
            for i in range(0, len(batch), self.fixed_batch):
                chunk = batch[i:i + self.fixed_batch]
                pad = self.fixed_batch - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
                parts.append(self.session.run(None, {self.input_name: chunk})[0][:len(chunk) - pad])
            return np.concatenate(parts)
        return self.session.run(None, {self.input_name: batch})[0]

    def _name(self, tag: Tag) -> str:
        return underscores_to_spaces(tag.name) if self.underscores else tag.name

    def select(self, probs: np.ndarray) -> list[str]:
        """One image's tags: characters and general tags by falling probability, the rating where asked."""
        chars, general, ratings = [], [], []
        for tag, p in zip(self.tags, probs.tolist()):
            if tag.category == RATING:
                ratings.append((p, tag))
            elif tag.category == CHARACTER:
                if p >= self.character_threshold:
                    chars.append((p, tag))
            elif p >= self.threshold:
                general.append((p, tag))
        by_prob = lambda items: [self._name(t) for _, t in sorted(items, key=lambda x: -x[0])]  # noqa: E731
        tags = by_prob(chars) + by_prob(general) if self.character_first else by_prob(general) + by_prob(chars)
        if self.rating != "none" and ratings:
            best = self._name(max(ratings, key=lambda x: x[0])[1])
            tags = [best] + tags if self.rating == "first" else tags + [best]
        return tags

    def caption(self, images: Sequence[Image.Image]) -> list[list[str]]:
        return [self.select(p) for p in self.probabilities(images)]

    def close(self) -> None:
        self.session = None
