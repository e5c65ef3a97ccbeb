"""The WebUI's own interrogators as caption kinds: ``clip`` (its BLIP + CLIP interrogator) and ``deepbooru``.

A1111 1.10 has ``shared.interrogator.interrogate(pil_image)`` (loads BLIP and CLIP, returns
"caption, flavour, ..." or text ending in ``<error>``, and moves them back to RAM itself) and
``modules.deepbooru.model`` (``start()`` loads and moves it to the GPU, ``tag_multi(pil_image)`` tags
with the WebUI's own settings — threshold, spaces, escaping — and ``stop()`` sends it back). The WebUI
runs both under its generation lock (``wrap_gradio_gpu_call``); a caption run holds that lock from
loading to the end, so no generation or training job shares the GPU with it.
"""
from __future__ import annotations

from typing import Sequence

from modules import call_queue, shared

from ..caption.tags import split_tags


def _optional(name: str):
    try:
        return __import__(f"modules.{name}", fromlist=[name])
    except Exception:   # noqa: BLE001 - a WebUI (or fork) without it just offers one kind fewer
        return None


class _Locked:
    """Holds the WebUI's generation lock from creation to :meth:`close`."""

    def __init__(self):
        call_queue.queue_lock.acquire()
        self._locked = True

    def close(self) -> None:
        if self._locked:
            self._locked = False
            call_queue.queue_lock.release()


class ClipInterrogator(_Locked):
    kind = "clip"

    def caption(self, images: Sequence) -> list:
        out = []
        for image in images:
            text = shared.interrogator.interrogate(image.convert("RGB"))
            out.append(None if text is None or "<error>" in text else split_tags(text))
        return out


class DeepBooruTagger(_Locked):
    kind = "deepbooru"

    def __init__(self, deepbooru):
        super().__init__()
        self.model = deepbooru.model
        try:
            self.model.start()
        except BaseException:
            self.close()
            raise

    def caption(self, images: Sequence) -> list:
        return [split_tags(self.model.tag_multi(image.convert("RGB"), force_disable_ranks=True)) for image in images]

    def close(self) -> None:
        try:
            if self.model is not None:
                self.model.stop()
        finally:
            self.model = None
            super().close()


def caption_kinds() -> dict:
    """Kind name → factory (see ``trainer.caption.run.Factory``) for what this WebUI has."""
    kinds: dict = {}
    if _optional("interrogate") is not None and getattr(shared, "interrogator", None) is not None:
        kinds["clip"] = lambda options, say: ClipInterrogator
    deepbooru = _optional("deepbooru")
    if deepbooru is not None and getattr(deepbooru, "model", None) is not None:
        kinds["deepbooru"] = lambda options, say: (lambda: DeepBooruTagger(deepbooru))
    return kinds
