"""Presets: named settings files in ``presets/``.

Files are written in TrainTrain's key format (``Settings.to_dict("traintrain")``) so presets move
between the two extensions both ways, and either format is read -- TrainTrain users drop their own
preset files into the folder unchanged. Saving a preset only writes a file (TrainTrain's 💾 also
started queued jobs).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError
from .settings import Settings, SettingsError, check_plain_name

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def list_presets(folder: str | os.PathLike = PRESETS_DIR) -> list[str]:
    """Preset names (file stems), sorted case-insensitively; a missing folder has none."""
    d = Path(folder)
    if not d.is_dir():
        return []
    return sorted((p.stem for p in d.glob("*.json") if p.is_file() and not p.name.startswith(".")),
                  key=str.lower)


def preset_path(name: str, folder: str | os.PathLike = PRESETS_DIR) -> Path:
    """``folder/NAME.json`` for a valid preset name (a plain file name, no folders)."""
    name = name.strip()
    if name.lower().endswith(".json"):
        name = name[:-5]
    problem = "is empty; enter a name" if not name else check_plain_name(name)
    if problem:
        raise SettingsError("preset name", problem)
    return Path(folder) / f"{name}.json"


class PresetNotFound(UserError):
    """No preset of that name (HTTP 404 in the API)."""


def load_preset(name_or_path: str | os.PathLike, folder: str | os.PathLike = PRESETS_DIR) -> Settings:
    """Load a preset by name (from ``folder``) or by path to a JSON file."""
    p = Path(name_or_path)
    if p.suffix.lower() == ".json" and p.is_file():
        return Settings.from_json(p)
    return load_named_preset(str(name_or_path), folder)


def load_named_preset(name: str, folder: str | os.PathLike = PRESETS_DIR) -> Settings:
    """Load the preset called ``name`` from ``folder``; never a path (the HTTP API reads no other file)."""
    p = preset_path(name, folder)
    if not p.is_file():
        available = ", ".join(list_presets(folder)) or "none"
        raise PresetNotFound(f"preset {name!r} not found in {folder} (available: {available})")
    return Settings.from_json(p)


def save_preset(settings: Settings, name: str, folder: str | os.PathLike = PRESETS_DIR) -> Path:
    """Write ``settings`` as preset ``name`` atomically (replacing a preset of that name)."""
    return settings.to_json(preset_path(name, folder), aliases="traintrain")
