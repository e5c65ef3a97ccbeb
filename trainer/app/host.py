"""What the environment gives the queue, the UI and the API: standalone process or the WebUI.

The rest of the product never asks "am I in the WebUI?"; it asks the host. The standalone
host loads models from files; the WebUI host (``trainer/webui/adapter.py``) shares the loaded
model's tensors, holds the WebUI's generation lock for a whole job and restores the WebUI
model afterwards. Both are plain objects with the same methods, so tests can use either.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional

from ..engine import ROOT
from ..errors import UserError


@dataclass
class Host:
    """Standalone defaults; the WebUI adapter subclasses it and overrides what differs."""

    name: str = "standalone"
    root: Path = ROOT                                  # extension folder: presets/, json/, logs/, jobs.sqlite
    lora_dir: Path = field(default_factory=lambda: ROOT / "output")
    model_dir: Optional[Path] = None                   # where the model picker looks for checkpoints
    vae_dir: Optional[Path] = None
    default_model: str = ""                            # "" = the embedded tiny model
    auth: Optional[tuple] = None                       # (user, password) for the UI and the API

    @property
    def presets_dir(self) -> Path:
        return self.root / "presets"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def json_dir(self) -> Path:
        return self.root / "json"

    @property
    def queue_db(self) -> Path:
        return self.root / "jobs.sqlite"

    def checkpoints(self) -> list[str]:
        """Model picker choices: "" (the default model) first, then checkpoint files found."""
        return [""] + _files(self.model_dir, (".safetensors", ".ckpt"))

    def vaes(self) -> list[str]:
        return ["None"] + _files(self.vae_dir, (".safetensors", ".pt", ".ckpt"))

    def native_size(self, checkpoint: str) -> Optional[tuple]:
        """(height, width) the form's model ("" = the embedded one) was trained at, from the file's header;
        None when it cannot be told without loading the model."""
        try:       # the model stack needs transformers; a host whose copy does not import gets no hint
            from ..models.loader import DEFAULT_MODEL, read_config
            path = Path(checkpoint or self.default_model or DEFAULT_MODEL)
            return tuple(read_config(path).native_size) if path.is_file() else None
        except (ImportError, UserError, OSError, ValueError):
            return None

    def bundle_for(self, settings, device=None, log: Optional[Callable[[str], None]] = None):
        """``(bundle, model_info)`` to train on, or ``None`` to let the runner load the settings' file."""
        return None

    def prompt_encoder(self, bundle) -> Optional[Callable[..., dict]]:
        """A replacement for ``bundle.encode_prompts`` (the WebUI's prompt parser), or ``None``."""
        return None

    def job_context(self, settings) -> ContextManager:
        """Held for a whole job (the WebUI: its generation lock, then restoring its model)."""
        return contextlib.nullcontext()

    def after_job(self, result) -> None:
        """Called after every job that wrote files (the WebUI refreshes its Lora list)."""

    def caption_kinds(self) -> dict:
        """Captioners this host adds to WD14/BLIP/Florence-2 (the WebUI: its CLIP and DeepBooru interrogators),
        as ``{kind: factory}`` for ``trainer.caption.run.caption_folder``."""
        return {}


def _files(folder: Optional[Path], suffixes: tuple) -> list[str]:
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and p.is_file())
