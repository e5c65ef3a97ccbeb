"""The Dataset sub-tab: look at a training folder the way training will see it, and fix captions.

A folder (default: the Train form's ``lora_data_directory``) → a page of thumbnails with their
captions; click one, edit its caption, Save (atomic; a missing caption becomes ``NAME.txt``).
Above the grid: repeats per ``N_concept`` folder and the bucket histogram. Both come from
:func:`trainer.data.overview.dataset_overview`, which runs training's own planning with the
options the Train form's current values give (``modes.lora.dataset_options``), so changing the
image size or bucket settings in the form changes what this tab shows, and the histogram is the one
the run will log. The HTML builders are pure functions (tested without a browser); their
``data-*`` attributes are what the browser test reads.
"""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Mapping, Sequence

import gradio as gr
from PIL import Image, ImageDraw, ImageOps

from . import compat
from ..data.overview import PER_PAGE, ImageRow, Overview, caption_text, dataset_overview, save_caption
from ..errors import UserError
from ..settings import Settings, field
from .views import message_html

# The settings that decide how a folder is planned (what ``modes.lora.dataset_options`` reads).
DATASET_FIELDS = ("image_size", "image_buckets_step", "image_min_length", "image_max_ratio", "image_num_multiply",
                  "sub_image_num", "image_mirroring", "image_use_filename_as_tag", "image_disable_upscale",
                  "lora_trigger_word", "image_alpha_background", "image_masked_loss")
# The settings that decide how many steps an epoch is and how long the run is (``data.epochs``).
EPOCH_FIELDS = ("train_batch_size", "gradient_accumulation_steps", "train_epochs", "train_iterations")
THUMB = 160


def options_for(settings: Settings):
    """The dataset options a run with ``settings`` uses (the LoRA mode's own mapping, not a copy)."""
    from ..modes.lora import dataset_options
    return dataset_options(settings)


def overview_json(params: Mapping[str, str]) -> dict:
    """``GET /dataset``: ``folder`` (default: ``lora_data_directory``), ``page`` (0-based), ``per_page``,
    and any dataset setting by name, parsed as ``--set`` parses it (defaults: the schema's)."""
    params = dict(params)
    folder = params.pop("folder", "")
    try:
        page, per_page = int(params.pop("page", 0)), int(params.pop("per_page", PER_PAGE))
    except ValueError:
        raise UserError("page and per_page: expected whole numbers") from None
    settings = Settings().apply_set_args([f"{k}={v}" for k, v in params.items()])
    options = options_for(settings)
    overview = dataset_overview(folder or settings.lora_data_directory, options)
    return {**overview.to_dict(page, per_page, options), "epochs": epoch_lines(overview, settings)}


def epoch_lines(o: Overview, settings: Settings) -> list[str]:
    """The run's length for this folder with ``settings``, by training's own epoch plan (``prepare`` in
    ``modes.lora`` makes the same plan and prints the same lines). Regularisation images and a
    validation split change the count; the run prints the final one."""
    if not o.samples:
        return []
    from ..data.epochs import batches_per_epoch, plan_epochs
    return plan_epochs(settings, batches_per_epoch([b for b, _ in o.samples], [r for _, r in o.samples],
                                                   settings.train_batch_size)).lines()


# --------------------------------------------------------------------------- HTML (pure)
def summary_html(o: Overview, epochs: Sequence[str] = ()) -> str:
    """Repeats per folder, the bucket histogram with bars, the run's length, and the lines training will log."""
    concepts = "".join(
        f'<tr data-folder="{escape(c.folder)}" data-repeats="{c.repeats}" data-images="{c.images}" '
        f'data-samples="{c.samples_per_epoch}"><td>{escape(c.folder)}</td><td>{c.repeats}</td><td>{c.images}</td>'
        f"<td>{c.samples_per_epoch}</td></tr>" for c in o.concepts)
    concepts_table = (
        '<table class="shinkansen-dataset-concepts"><thead><tr><th>folder</th><th>repeats</th><th>images</th>'
        f"<th>samples per epoch</th></tr></thead><tbody>{concepts}</tbody>"
        f'<tfoot><tr data-total="{o.samples_per_epoch}"><td>total</td><td></td><td>{o.images}</td>'
        f"<td>{o.samples_per_epoch}</td></tr></tfoot></table>")
    top = max((n for _, n in o.histogram), default=1)
    bars = "".join(
        f'<tr data-bucket="{h}x{w}" data-count="{n}"><td>{h}x{w}</td><td>{n}</td><td style="width:60%">'
        f'<div style="background:#f97316;height:0.9em;width:{100 * n / top:.1f}%"></div></td></tr>'
        for (h, w), n in o.histogram)
    histogram = ('<table class="shinkansen-dataset-histogram"><thead><tr><th>bucket (H×W)</th>'
                 f"<th>placements</th><th></th></tr></thead><tbody>{bars}</tbody></table>")
    error = f'<div class="shinkansen-error">{escape(o.error)}</div>' if o.error else ""
    log = escape("\n".join([*o.log_lines, *epochs]))
    return (f'<div class="shinkansen-dataset-summary" data-folder="{escape(o.folder)}" data-files="{len(o.files)}">'
            f"{error}<div style='display:flex;gap:2em;flex-wrap:wrap'><div><b>Repeats per folder</b>{concepts_table}"
            f"</div><div style='min-width:18em'><b>Bucket histogram</b>{histogram}</div></div>"
            f'<details open><summary>What training logs for this folder</summary>'
            f'<pre class="shinkansen-dataset-log">{log}</pre></details></div>')


def rows_html(rows: Sequence[ImageRow]) -> str:
    """The page's images as a table: file, size, bucket, repeats, caption (as trained)."""
    body = []
    for r in rows:
        size = f"{r.width}×{r.height}" if r.height else ""
        where = r.bucket or ("–" if r.status == "ok" else r.status)
        note = f' <span class="shinkansen-error">{escape(r.status)}: {escape(r.reason)}</span>' if r.reason else ""
        body.append(f'<tr data-rel="{escape(r.rel)}" data-status="{r.status}" data-bucket="{r.bucket or ""}" '
                    f'data-repeats="{r.repeats}"><td>{escape(r.rel)}{note}</td><td>{size}</td><td>{where}</td>'
                    f'<td>{r.repeats or ""}</td><td class="shinkansen-dataset-caption-cell">{escape(r.caption)}</td>'
                    f'<td>{escape(r.caption_file)}</td></tr>')
    return ('<table class="shinkansen-dataset-rows"><thead><tr><th>image</th><th>W×H</th><th>bucket (H×W)</th>'
            "<th>repeats</th><th>caption</th><th>caption file</th></tr></thead><tbody>" + "".join(body)
            + "</tbody></table>")


def image_info_html(r: ImageRow) -> str:
    if r.status == "unreadable":
        return message_html(f"{r.rel}: unreadable ({r.reason}); training skips it", ok=False)
    trained = r.trained_caption or "(empty caption)"
    return (f'<div class="shinkansen-dataset-info" data-bucket="{r.bucket or ""}">{escape(r.rel)}: '
            f"{r.width}×{r.height} px → bucket {r.bucket or 'none'} (H×W), {r.placements} placement(s), "
            f"repeats {r.repeats}{'; ' + escape(r.reason) if r.reason else ''}<br>trained as: "
            f"<i>{escape(trained)}</i></div>")


# --------------------------------------------------------------------------- thumbnails
def placeholder(text: str) -> Image.Image:
    """A grey tile with a red cross for a file that cannot be shown (the grid must not fail on it)."""
    im = Image.new("RGB", (THUMB, THUMB), (90, 90, 90))
    d = ImageDraw.Draw(im)
    d.line((12, 12, THUMB - 12, THUMB - 12), fill=(220, 40, 40), width=5)
    d.line((12, THUMB - 12, THUMB - 12, 12), fill=(220, 40, 40), width=5)
    d.text((8, THUMB // 2 - 6), text[:24], fill=(255, 255, 255))
    return im


def thumbnail(path: Path) -> Image.Image:
    """A small copy (JPEG draft mode: large photos decode at reduced size), EXIF-rotated like training."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB * 2, THUMB * 2))
            im.load()
            out = ImageOps.exif_transpose(im)
            out = out.convert("RGBA" if "A" in out.getbands() or "transparency" in out.info else "RGB")
            out.thumbnail((THUMB, THUMB))
            return out
    except Exception:   # any decoder failure: a tile that says so, never a failed page
        return placeholder("unreadable")


def gallery_items(o: Overview, rows: Sequence[ImageRow]) -> list:
    items = []
    for r in rows:
        img = placeholder("unreadable") if r.status == "unreadable" else thumbnail(Path(o.folder) / r.rel)
        label = r.reason if r.status == "unreadable" else (r.caption or "(no caption)")
        # the caption first: a tile's label has room for a few words only, the file name is in the table
        items.append((img, f"{label} · {r.rel} · {r.bucket or r.status}"[:200]))
    return items


# --------------------------------------------------------------------------- the sub-tab
def build(form) -> None:
    """The Dataset sub-tab (call inside ``gr.Tabs``); reads the Train form's dataset fields."""
    with gr.Tab("Dataset", id="dataset", elem_id="shinkansen-tab-dataset"):
        gr.Markdown("Images and captions as LoRA training plans them, with the **Train** form's current image "
                    "size and bucket settings. Click an image to edit its caption.")
        with gr.Row():
            folder = gr.Textbox(label="Image folder (empty = the Train form's lora_data_directory)",
                                elem_id="shinkansen-dataset-folder", scale=5)
            load = gr.Button("Load", variant="primary", elem_id="shinkansen-dataset-load", scale=1)
            prev = gr.Button("◀ Prev", size="sm", elem_id="shinkansen-dataset-prev", scale=0, min_width=70)
            page = gr.Number(value=1, precision=0, label="page", elem_id="shinkansen-dataset-page", scale=0,
                             min_width=80)
            nxt = gr.Button("Next ▶", size="sm", elem_id="shinkansen-dataset-next", scale=0, min_width=70)
        msg = gr.HTML(elem_id="shinkansen-dataset-message")
        summary = gr.HTML(elem_id="shinkansen-dataset-summary")
        with gr.Row():
            with gr.Column(scale=3):
                gallery = gr.Gallery(label=f"Images ({PER_PAGE} per page)", columns=6, height=420,
                                     allow_preview=False, object_fit="contain", elem_id="shinkansen-dataset-gallery")
            with gr.Column(scale=2):
                image = gr.Textbox(label="Selected image", interactive=False, elem_id="shinkansen-dataset-image")
                info = gr.HTML(elem_id="shinkansen-dataset-info")
                caption = gr.Textbox(label="Caption (saved to NAME.txt, or the NAME.caption it already has)",
                                     lines=4, elem_id="shinkansen-dataset-caption")
                save = gr.Button("Save caption", variant="primary", elem_id="shinkansen-dataset-save")
        table = gr.HTML(elem_id="shinkansen-dataset-table")
        shown = gr.State({})                 # {"folder": root, "rels": [rel per gallery tile]}

    names = ("lora_data_directory",) + DATASET_FIELDS + EPOCH_FIELDS
    fields = [form.main[name] for name in names]

    def settings_from(values) -> Settings:
        return Settings.from_dict({n: form.from_widget(field(n), v) for n, v in zip(names, values)}, strict=True)

    def show(folder_text, number, values, note=""):
        s = settings_from(values)
        options = options_for(s)
        o = dataset_overview((folder_text or "").strip() or s.lora_data_directory, options)
        number = min(max(1, int(number or 1)), o.pages)
        rows = o.page(number - 1, PER_PAGE, options.lora_trigger_word, options.image_use_filename_as_tag)
        text = (f"{len(o.files)} image file(s) in {o.folder}; page {number} of {o.pages}"
                + (f" · {note}" if note else ""))
        return (message_html(text), summary_html(o, epoch_lines(o, s)), gallery_items(o, rows), rows_html(rows), number,
                {"folder": o.folder, "rels": [r.rel for r in rows]})

    outputs = [msg, summary, gallery, table, page, shown]

    def failed(e: UserError):
        return [message_html(str(e), ok=False)] + [compat.no_change()] * (len(outputs) - 1)

    def on_load(folder_text, number, *values):
        try:
            return show(folder_text, number, values)
        except UserError as e:
            return failed(e)

    def turn(by):
        def handler(folder_text, number, *values):
            try:
                return show(folder_text, int(number or 1) + by, values)
            except UserError as e:
                return failed(e)
        return handler

    load.click(on_load, [folder, page] + fields, outputs)
    folder.submit(on_load, [folder, page] + fields, outputs)
    prev.click(turn(-1), [folder, page] + fields, outputs)
    nxt.click(turn(+1), [folder, page] + fields, outputs)

    def on_select(evt: gr.SelectData, state, number, *values):   # gradio inserts evt at its position: first
        rels = (state or {}).get("rels", [])
        index = evt.index
        if isinstance(index, (list, tuple)):
            index = index[0]
        if index is None or not 0 <= int(index) < len(rels):
            return compat.no_change(), compat.no_change(), compat.no_change()
        rel = rels[int(index)]
        try:
            s = settings_from(values)
            options = options_for(s)
            row = _row(dataset_overview(state["folder"], options), rel, options)
        except UserError as e:
            return rel, compat.no_change(), message_html(str(e), ok=False)
        return rel, row.caption, image_info_html(row)

    gallery.select(on_select, [shown, page] + fields, [image, caption, info])

    def on_save(state, rel, text, number, *values):
        try:
            if not (state or {}).get("folder"):
                raise UserError("load a folder first")
            path = save_caption(state["folder"], rel or "", text or "")
            out = show(state["folder"], number, values, note=f"saved {path.name} for {rel}")
            options = options_for(settings_from(values))
            row = _row(dataset_overview(state["folder"], options), rel, options)
        except UserError as e:
            return failed(e) + [compat.no_change(), compat.no_change()]
        return list(out) + [row.caption, image_info_html(row)]

    save.click(on_save, [shown, image, caption, page] + fields, outputs + [caption, info])


def _row(o: Overview, rel: str, options) -> ImageRow:
    """One image's row (captions read now), without reading every other caption of a large folder."""
    if rel not in o.rows:
        raise UserError(f"{rel}: no longer in {o.folder}; press Load")
    i = o.files.index(rel)
    return o.page(i, 1, options.lora_trigger_word, options.image_use_filename_as_tag)[0]
