"""TensorBoard event files (``log_with tensorboard``): an event sink beside the loss CSV.

kohya_ss and OneTrainer users keep their dashboards: the scalars carry kohya's tag names
(``loss/current``, ``loss/average``, ``lr/unet``, ``lr/textencoder``) plus ``loss/validation``, and
sample images go in as images. Written by tensorboard's own writer (``torch.utils.tensorboard``
needs the ``tensorboard`` package), imported only when asked for: the package is optional and a
run without it fails with one line before any model work (``Settings.problems``).

Difference's second pass restarts its step count, so a phase's tags are prefixed with it
(``pass 2/loss/current``). A resumed run appends to the same folder and tells the writer to drop
events at and after its first step (``purge_step``), so the interrupted tail is not shown twice.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

from .events import RunEvent, StepEvent

log = logging.getLogger(__name__)

INSTALL = "pip install tensorboard"


def missing_tensorboard() -> Optional[str]:
    """The one-line reason ``log_with tensorboard`` cannot run here, or None."""
    if importlib.util.find_spec("tensorboard") is None:
        return f"tensorboard is not installed; install it with `{INSTALL}` (or set log_with to none)"
    return None


class TensorBoardLogger:
    """EventBus sink: StepEvents → scalars, ``sample`` RunEvents → images (at the step they were drawn)."""

    def __init__(self, folder: Path, purge_step: Optional[int] = None):
        problem = missing_tensorboard()
        if problem:
            from .errors import UserError
            raise UserError(f"log_with: {problem}")
        from torch.utils.tensorboard import SummaryWriter
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge_step)
        self.step, self.phase = 0, ""

    def _tag(self, name: str) -> str:
        return f"{self.phase}/{name}" if self.phase else name

    def __call__(self, event: object) -> None:
        if self.writer is None:
            return
        if isinstance(event, StepEvent):
            self.step, self.phase = event.step, event.phase
            w, step = self.writer, event.step
            w.add_scalar(self._tag("loss/current"), event.loss, step)
            w.add_scalar(self._tag("loss/average"), event.loss_ema, step)
            w.add_scalar(self._tag("lr/unet"), event.lr, step)
            if event.lr_te is not None:
                w.add_scalar(self._tag("lr/textencoder"), event.lr_te, step)
            if event.val_loss is not None:
                w.add_scalar(self._tag("loss/validation"), event.val_loss, step)
        elif isinstance(event, RunEvent) and event.kind == "sample" and event.path:
            self._image(Path(event.path), int((event.data or {}).get("step", self.step)))

    def _image(self, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        # one tag per prompt (the file name ends in _<prompt index>): TensorBoard's slider walks the steps
        index = path.stem.rsplit("_", 1)[-1]
        self.writer.add_image(self._tag(f"samples/prompt_{index}"), pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
