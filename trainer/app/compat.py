"""The few gradio differences the tab touches: 3.41.2 (A1111, the standalone pin) vs 4.x (Forge).

Rules from ``research/a1111.md`` §4: only ``gr.update`` for updates (``Component.update`` is gone in
4.x), no ``.style()``, no version-specific constructor kwargs (4.x raises on unknown ones), never
``queue()`` from inside the WebUI. What differs is detected here, by feature, not by version where
a feature test is possible.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
IS_GRADIO_4 = GRADIO_MAJOR >= 4
HAS_TIMER = hasattr(gr, "Timer")          # gradio >= 4.40


def update(**kwargs: Any) -> dict:
    """A property update for any component (both versions)."""
    return gr.update(**kwargs)


def no_change() -> dict:
    return gr.update()


def poll(blocks: gr.Blocks, fn: Callable, inputs: Sequence, outputs: Sequence, seconds: float) -> None:
    """Call ``fn`` every ``seconds`` while the page is open, with no user action.

    3.x: ``load(every=)`` (runs through the queue, so it needs ``Blocks.queue()``: the WebUI enables
    it, the standalone app calls it). 4.40+: a ``gr.Timer``. No progress overlay either way.
    """
    if HAS_TIMER:
        gr.Timer(seconds).tick(fn, list(inputs), list(outputs), show_progress="hidden")
    else:
        blocks.load(fn, list(inputs), list(outputs), every=seconds, show_progress="hidden")


def on_load(blocks: gr.Blocks, fn: Callable, inputs: Sequence, outputs: Sequence) -> None:
    """Call ``fn`` once when a page opens, so it shows the state of that moment, not the state when the
    tab was built (gradio sends build-time values with the page).

    Outside the queue: the pollers of :func:`poll` hold it (3.x runs each ``every=`` event as an endless
    job there; 4.x's Timer first ticks after its interval), and the page must not wait for them.
    """
    blocks.load(fn, list(inputs), list(outputs), queue=False, show_progress="hidden")


def file_input(**kwargs: Any) -> gr.File:
    """A single-file upload whose value :func:`file_path` turns into a path in both versions."""
    return gr.File(type="filepath" if IS_GRADIO_4 else "file", **kwargs)


def file_path(value: Any) -> str:
    """Path of an uploaded file: 4.x gives a str, 3.41 a tempfile wrapper (``.name``) or a dict."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path") or value.get("name") or ""
    return getattr(value, "name", "") or ""


def queue_kwargs(concurrency: int) -> dict:
    """``Blocks.queue`` arguments for ``concurrency`` parallel handlers (standalone only)."""
    return {"default_concurrency_limit": concurrency} if IS_GRADIO_4 else {"concurrency_count": concurrency}


def dropdown_value(value: Any, choices: Sequence[str]) -> Any:
    """4.x refuses a value outside the choices: fall back to None rather than failing the update."""
    return value if value in choices else None
