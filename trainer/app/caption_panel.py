"""The Caption sub-tab: caption a folder from the tab, with live progress and the written captions listed.

The handler is a generator (gradio streams each yield to the page), running the same
``trainer.caption.run.caption_folder`` as ``python -m trainer caption``, so the panel and the CLI write
the same files. The WebUI host adds its own interrogators (CLIP, DeepBooru) to the kinds.
"""
from __future__ import annotations

import logging
from html import escape
from pathlib import Path
from typing import Iterator, Optional

import gradio as gr

from ..caption.run import BUILTIN_KINDS, CaptionOptions, Progress, Summary, caption_folder
from ..caption.weights import KINDS
from ..errors import UserError

log = logging.getLogger(__name__)

EXISTING = {"keep existing captions": "keep", "overwrite existing captions": "overwrite",
            "append new tags to existing captions": "append"}
MAX_ROWS = 300        # the results table shows the newest rows only (a folder may hold thousands)


def kinds(host) -> list[str]:
    return list(BUILTIN_KINDS) + [k for k in _extra(host) if k not in BUILTIN_KINDS]


def _extra(host) -> dict:
    get = getattr(host, "caption_kinds", None)
    return dict(get() if get else {})


def progress_html(p: Optional[Progress], phase: str, note: str = "", ok: bool = True) -> str:
    done, total = (p.done, p.total) if p else (0, 0)
    frac = done / total if total else 0.0
    cls = "shinkansen-ok" if ok else "shinkansen-error"
    return (f'<div class="shinkansen-caption-progress" data-phase="{phase}" data-done="{done}" '
            f'data-total="{total}"><progress max="1" value="{frac:.4f}" style="width:100%"></progress>'
            f'<div class="{cls}">{escape(note)}</div></div>')


def results_html(summary: Summary) -> str:
    rows = []
    for item in summary.items[-MAX_ROWS:]:
        text = item.caption if item.status == "written" else item.reason
        rows.append(f'<tr data-status="{item.status}" data-image="{escape(item.image.name)}">'
                    f"<td>{escape(str(item.image))}</td><td class=\"state-{item.status}\">{item.status}</td>"
                    f"<td>{escape(text)}</td></tr>")
    hidden = len(summary.items) - MAX_ROWS
    more = f"<div>… {hidden} earlier rows not shown</div>" if hidden > 0 else ""
    return (f'<div class="shinkansen-caption-summary">{escape(summary.line())}</div>{more}'
            '<table class="shinkansen-caption-results"><thead><tr><th>image</th><th>result</th>'
            "<th>caption / reason</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def run_panel(host, folder, kind, model, threshold, character_threshold, trigger, exclude, existing, extension,
              recursive, batch_size, rating, character_first, keep_underscores, task) -> Iterator[tuple]:
    """The Run button: yields (progress, results) HTML after every image."""
    summary = Summary()
    options = CaptionOptions(
        kind=kind or "wd14", model=(model or "").strip(), trigger=trigger or "",
        threshold=float(threshold if threshold is not None else 0.35),
        character_threshold=None if character_threshold is None else float(character_threshold),
        exclude=exclude or "", mode=EXISTING.get(existing, existing or "keep"), extension=extension or ".txt",
        recursive=bool(recursive), batch_size=int(batch_size or 1), rating=rating or "none",
        character_first=bool(character_first), underscores_to_spaces=not keep_underscores,
        task=task or "more_detailed")
    last = None
    try:
        if not (folder or "").strip():
            raise UserError("folder: enter the folder of images to caption")
        yield progress_html(None, "starting", "checking the folder and the model files"), results_html(summary)
        for p in caption_folder(Path(folder.strip()).expanduser(), options, _extra(host), log=log.info):
            last = p
            if p.item is not None:
                summary.items.append(p.item)
                note = f"{p.done}/{p.total}: {p.item.image.name} {p.item.status}"
            else:
                note = f"{p.message} (waits for a running generation or training job in the WebUI)" \
                    if host.name == "webui" else p.message
            yield progress_html(p, "running", note), results_html(summary)
    except UserError as e:
        yield progress_html(last, "failed", str(e), ok=False), results_html(summary)
        return
    except Exception as e:   # a bug: the traceback goes to the log, one line to the user
        log.exception("captioning failed")
        yield progress_html(last, "failed", f"internal error: {type(e).__name__}: {e}", ok=False), \
            results_html(summary)
        return
    yield progress_html(last, "done", f"done: {summary.line()}"), results_html(summary)


def add_tab(host) -> None:
    """The Caption sub-tab (call inside the tab's ``gr.Tabs``)."""
    with gr.Tab("Caption", id="caption", elem_id="shinkansen-tab-caption"):
        defaults = CaptionOptions()
        with gr.Row():
            folder = gr.Textbox(label="image folder", placeholder="/path/to/10_mychar",
                                elem_id="shinkansen-caption-folder", scale=3)
            kind = gr.Dropdown(choices=kinds(host), value="wd14", label="captioner",
                               elem_id="shinkansen-caption-kind", scale=1)
        model = gr.Textbox(label="model folder or Hugging Face repo id (empty: the captioner's default from the "
                                 "Hugging Face cache: " + ", ".join(f"{k.repo}" for k in KINDS.values()) + ")",
                           elem_id="shinkansen-caption-model")
        with gr.Row():
            threshold = gr.Slider(0, 1, value=defaults.threshold, step=0.01, label="threshold (WD14 general tags)",
                                  elem_id="shinkansen-caption-threshold")
            character_threshold = gr.Slider(0, 1, value=defaults.threshold, step=0.01,
                                            label="character threshold (WD14)",
                                            elem_id="shinkansen-caption-character-threshold")
        with gr.Row():
            trigger = gr.Textbox(label="trigger word (first tag)", elem_id="shinkansen-caption-trigger")
            exclude = gr.Textbox(label="exclude tags (comma-separated)", elem_id="shinkansen-caption-exclude")
        with gr.Row():
            existing = gr.Radio(choices=list(EXISTING), value="keep existing captions", label="existing captions",
                                elem_id="shinkansen-caption-existing")
            extension = gr.Textbox(value=".txt", label="caption extension", elem_id="shinkansen-caption-extension")
        with gr.Accordion("More options", open=False):
            with gr.Row():
                recursive = gr.Checkbox(label="include subfolders", elem_id="shinkansen-caption-recursive")
                batch_size = gr.Number(value=1, precision=0, label="batch size", elem_id="shinkansen-caption-batch")
                rating = gr.Dropdown(choices=["none", "first", "last"], value="none", label="WD14 rating tag",
                                     elem_id="shinkansen-caption-rating")
                character_first = gr.Checkbox(label="WD14: character tags first",
                                              elem_id="shinkansen-caption-character-first")
                keep_underscores = gr.Checkbox(label="WD14: keep underscores",
                                               elem_id="shinkansen-caption-keep-underscores")
                task = gr.Dropdown(choices=["caption", "detailed", "more_detailed"], value="more_detailed",
                                   label="Florence-2 task", elem_id="shinkansen-caption-task")
        with gr.Row():
            run = gr.Button("Caption", variant="primary", elem_id="shinkansen-caption-run")
            stop = gr.Button("Stop", variant="stop", elem_id="shinkansen-caption-stop")
        progress = gr.HTML(progress_html(None, "idle"), elem_id="shinkansen-caption-progress")
        results = gr.HTML(elem_id="shinkansen-caption-results")

        def handler(*values):
            yield from run_panel(host, *values)
        event = run.click(handler, [folder, kind, model, threshold, character_threshold, trigger, exclude, existing,
                                    extension, recursive, batch_size, rating, character_first, keep_underscores,
                                    task], [progress, results])
        stop.click(None, [], [], cancels=[event])
