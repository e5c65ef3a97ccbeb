"""Where a captioner's weights come from: a local folder, else the user's Hugging Face cache.

Why this order: kohya users already have the taggers on disk (``--model PATH``), and everyone else
has them in the Hugging Face cache once they have been downloaded with ``hf download``. When they are
in neither place they are downloaded into that cache like kohya's scripts do, unless the machine is
offline (``HF_HUB_OFFLINE=1``) or the download fails: then one line says exactly how to get them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # owner/name; anything else is a path


@dataclass(frozen=True)
class Kind:
    """One model family: its default repository and the files a folder of it must hold."""
    name: str
    label: str
    repo: str
    patterns: tuple          # what to fetch from the repository (no TF/Flax copies of the weights)
    required: tuple          # file names (globs) a usable folder holds
    download_files: str      # the file list for the one-line ``hf download`` hint ("" = whole repo)


KINDS = {
    "wd14": Kind("wd14", "WD14 tagger", "SmilingWolf/wd-v1-4-convnext-tagger-v2",
                 ("*.onnx", "selected_tags.csv"), ("*.onnx", "selected_tags.csv"), "model.onnx selected_tags.csv"),
    "blip": Kind("blip", "BLIP", "Salesforce/blip-image-captioning-large",
                 ("*.json", "*.txt", "*.safetensors"), ("config.json",), ""),
    "florence2": Kind("florence2", "Florence-2", "florence-community/Florence-2-large",
                      ("*.json", "*.txt", "*.safetensors", "*.model"), ("config.json",), ""),
}


def _has(folder: Path, pattern: str) -> bool:
    return any(folder.glob(pattern))


def _check_folder(folder: Path, kind: Kind) -> Path:
    missing = [p for p in kind.required if not _has(folder, p)]
    if missing:
        raise UserError(f"{folder}: not a {kind.label} model folder (missing {', '.join(missing)})")
    return folder


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def how_to_get(kind: Kind, repo: str) -> str:
    files = f" {kind.download_files}" if kind.download_files and repo == kind.repo else ""
    return f"get them with `hf download {repo}{files}` (online), or pass --model FOLDER holding them"


def resolve(kind_name: str, model: Optional[str] = None, log: Callable[[str], None] = lambda m: None) -> Path:
    """The folder holding ``kind_name``'s weights.

    ``model``: a folder (or, for WD14, the ``.onnx`` file itself), a Hugging Face repository id, or
    empty for the kind's default repository. Raises :class:`UserError` (one line) when they cannot be had.
    """
    if kind_name not in KINDS:
        raise UserError(f"--kind: unknown captioner {kind_name!r}; choose one of {', '.join(KINDS)}")
    kind = KINDS[kind_name]
    model = (model or "").strip()
    if model:
        path = Path(model).expanduser()
        if path.is_file() and path.suffix.lower() == ".onnx" and kind.name == "wd14":
            return _check_folder(path.parent, kind)
        if path.is_dir():
            return _check_folder(path, kind)
        if path.exists() or not _REPO_ID.match(model):
            raise UserError(f"--model {model}: not found (a {kind.label} folder or a Hugging Face repository id)")
    repo = model or kind.repo
    try:
        from huggingface_hub import snapshot_download
    except ImportError:   # a dependency of transformers; absent only in a broken environment
        raise UserError(f"{kind.label} weights: the package 'huggingface_hub' is not installed: "
                        f"pip install huggingface_hub, or pass --model FOLDER") from None
    try:
        return _check_folder(Path(snapshot_download(repo, allow_patterns=list(kind.patterns),
                                                    local_files_only=True)), kind)
    except UserError:
        pass                  # an incomplete snapshot in the cache: fetch the rest below
    except Exception:         # noqa: BLE001 - not in the cache (huggingface_hub's error types vary by version)
        pass
    where = f"no folder {model} here, and " if model else ""
    if _offline():
        raise UserError(f"{kind.label} weights: {where}{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE "
                        f"is set: {how_to_get(kind, repo)}")
    log(f"downloading {kind.label} weights from {repo} into the Hugging Face cache")
    try:
        folder = Path(snapshot_download(repo, allow_patterns=list(kind.patterns)))
    except Exception as e:    # noqa: BLE001 - network, auth, unknown repo: all are the user's to fix
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{kind.label} weights: {where}{repo} could not be downloaded ({reason[:160]}): "
                        f"{how_to_get(kind, repo)}") from None
    return _check_folder(folder, kind)
