"""The embedded tiny model in the WebUI's checkpoint list (SPEC §12), loadable there with no edit.

A1111 lists the checkpoints of its ``models/Stable-diffusion`` folder (and ``--ckpt-dir``) and
builds a checkpoint from the ``NAME.yaml`` beside it; ldm's FrozenCLIPEmbedder hands the YAML's
``version`` to transformers' ``from_pretrained``, which resolves a relative path against the
WebUI's working folder, not the YAML's. Our asset YAML names its ``text_encoder/`` relatively
(the folder moves with the extension), so the WebUI gets a pair of its own in its checkpoint
folder: a link to (or a copy of) the checkpoint and a YAML whose ``version`` is the absolute
path of the asset's ``text_encoder/``.

Both are checked at every start and rewritten only when stale (a moved extension folder, a
retrained model), each atomically (temporary name, then rename); the YAML is written first and
carries :data:`MARKER`, which is how a later start knows the pair is ours. A user's own file
under that name is never touched. Nothing here imports ``modules.*``: the adapter calls it.
"""
from __future__ import annotations

import filecmp
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from ..models.loader import DEFAULT_MODEL

log = logging.getLogger(__name__)

NAME = "shinkansen-tiny-sd"
MARKER = ("# Shinkansen's embedded tiny model (64x64): this file and the checkpoint beside it are kept up to date "
          "by the Shinkansen extension at every WebUI start (Settings > Shinkansen turns that off).")


def webui_yaml(asset_yaml: Path) -> str:
    """The asset YAML with the text encoder's ``version`` as an absolute path, under :data:`MARKER`."""
    import yaml
    config = yaml.safe_load(asset_yaml.read_text(encoding="utf-8"))
    params = config["model"]["params"]["cond_stage_config"]["params"]
    params["version"] = str((asset_yaml.parent / params["version"]).resolve())
    return MARKER + "\n" + yaml.safe_dump(config, sort_keys=False)


def _ours(config: Path) -> bool:
    try:
        return config.read_text(encoding="utf-8").startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def _same_checkpoint(path: Path, source: Path) -> bool:
    """``path`` is ``source``: a link to it, a hard link, or a byte-identical copy."""
    try:
        if path.is_symlink():
            return path.resolve() == source.resolve()
        return path.is_file() and (os.path.samefile(path, source) or filecmp.cmp(path, source, shallow=False))
    except OSError:
        return False


def _foreign(target: Path, config: Path, checkpoint: Path) -> Optional[Path]:
    """A user's file holding our names: a YAML without our marker or, with no YAML, another checkpoint."""
    if config.exists():
        return None if _ours(config) else config
    if (target.exists() or target.is_symlink()) and not _same_checkpoint(target, checkpoint):
        return target
    return None


def _replace_with(path: Path, make: Callable[[Path], None]) -> None:
    """``make(tmp)`` then rename over ``path``; the temporary name is not one the WebUI lists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        make(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def _link_or_copy(source: Path) -> Callable[[Path], None]:
    """A symbolic link (no space, follows a retrained asset), else a hard link, else a copy (Windows)."""
    def make(tmp: Path) -> None:
        for attempt in (lambda: os.symlink(source.resolve(), tmp), lambda: os.link(source, tmp)):
            try:
                attempt()
                return
            except OSError:
                continue
        shutil.copyfile(source, tmp)
    return make


def offer_embedded_model(model_dir: Path, checkpoint: Path = DEFAULT_MODEL) -> Optional[Path]:
    """Make ``model_dir/shinkansen-tiny-sd.safetensors`` + ``.yaml`` load in the WebUI; the checkpoint's path.

    ``None`` (with a warning) when a file of the user's holds the name or the folder is not writable.
    """
    target = Path(model_dir) / f"{NAME}.safetensors"
    config = target.with_suffix(".yaml")
    if not checkpoint.is_file():
        return None
    in_the_way = _foreign(target, config, checkpoint)
    if in_the_way is not None:
        log.warning("Shinkansen: %s is not ours; the embedded tiny model is not added to the checkpoint list",
                    in_the_way)
        return None
    try:
        text = webui_yaml(checkpoint.with_suffix(".yaml"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (config.exists() and config.read_text(encoding="utf-8") == text):
            _replace_with(config, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        if not _same_checkpoint(target, checkpoint):
            _replace_with(target, _link_or_copy(checkpoint))
    except OSError as e:
        log.warning("Shinkansen: could not add the embedded tiny model to %s (%s)", target.parent, e)
        return None
    return target
