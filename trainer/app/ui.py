"""The Shinkansen tab (Train / Queue / Plot / Samples), one gradio Blocks for the WebUI and standalone.

Every settings widget is made by iterating the schema (``trainer.settings.FIELDS``): a handler
receives the widgets' values in schema order and turns them into a :class:`Settings` by name, so
adding a field never shifts another (TrainTrain's positional lists did). The tab calls only
``settings``, ``presets``, ``jobs``, ``plot`` and ``generate``; the host says where models, LoRAs and
logs live. Long work runs in the queue's worker thread: handlers return at once and a polling timer
(``compat.poll``) refreshes the progress, the queue and the plot.

WebUI use: ``return [(build_tab(host), "Shinkansen", "shinkansen")]`` from ``on_ui_tabs``.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from . import compat
from ..errors import UserError
from .plot import figure, has_data, legend_labels, list_runs, read_loss_csv, run_in_logs
from ..presets import list_presets, load_preset, save_preset
from ..settings import FIELDS, IMAGE_FIELDS, MODES, Field, Settings, second_pass_fields
from .views import message_html, native_size_html, progress_html, queue_html, sample_items
from .dataset_panel import build as build_dataset_tab

log = logging.getLogger(__name__)

DEFAULT_MODEL = "(default model)"       # the host's default: the WebUI's loaded model / the embedded tiny one
POLL_S = 1.0                           # progress + queue refresh
PLOT_POLL_S = 2.0
_TEXT_LINES = {"text": 2, "kwargs": 2, "lines": 3}


# --------------------------------------------------------------------------- form <-> settings
class Form:
    """The schema's widgets: ``main[name]`` for every field, ``p2[name]`` for the 2nd-pass overrides."""

    def __init__(self, host):
        self.host = host
        self.main: dict[str, Any] = {}
        self.boxes: dict[str, Any] = {}      # what is shown/hidden per mode (a widget or its column)
        self.p2: dict[str, Any] = {}
        self.uploads: dict[str, Any] = {}
        self.size_hint: Any = None           # the native-size note under image_size

    # -- building --------------------------------------------------------------------------
    def widget(self, f: Field, value: Any, prefix: str = "", visible: bool = True) -> Any:
        label = f.label if not prefix else f"{f.label} (2nd pass)"
        kw = dict(label=label, info=field_info(f), elem_id=f"shinkansen-{prefix}{f.name}", visible=visible)
        shown = self.to_widget(f, value)
        if f.name == "model_checkpoint":
            return gr.Dropdown(choices=self.model_choices(), value=shown, allow_custom_value=True, **kw)
        if f.name == "model_vae":
            return gr.Dropdown(choices=self.host.vaes(), value=shown, allow_custom_value=True, **kw)
        if f.kind == "bool":
            return gr.Checkbox(value=shown, **kw)
        if f.kind == "choice":
            return gr.Dropdown(choices=list(f.choices), value=shown, **kw)
        if f.kind == "blocks":
            return gr.CheckboxGroup(choices=list(f.choices), value=shown, **kw)
        lines = _TEXT_LINES.get(f.kind, 1)
        placeholder = ", ".join(str(s) for s in f.suggest[:8]) if f.suggest else None
        return gr.Textbox(value=shown, lines=lines, max_lines=max(lines, 8) if lines > 1 else 1,
                          placeholder=placeholder, **kw)

    def build_fields(self, fields: list[Field], defaults: Settings, mode: str) -> None:
        for i in range(0, len(fields), 3):
            with gr.Row():
                for f in fields[i:i + 3]:
                    visible = mode in f.modes
                    if f.name == "image_size":       # the box plus what the selected model was trained at
                        with gr.Column(visible=visible) as col:
                            self.main[f.name] = self.widget(f, getattr(defaults, f.name))
                            self.size_hint = gr.HTML(self.native_size_html(defaults.model_checkpoint),
                                                     elem_id="shinkansen-native-size")
                        self.boxes[f.name] = col
                    elif f.name in IMAGE_FIELDS:       # a path box plus an upload that fills it
                        with gr.Column(visible=visible) as col:
                            self.main[f.name] = self.widget(f, getattr(defaults, f.name))
                            up = gr.Image(type="filepath", label=f"upload {f.name}",
                                          elem_id=f"shinkansen-upload-{f.name}", height=160)
                            up.upload(lambda p: compat.update(value=p or ""), [up], [self.main[f.name]])
                        self.boxes[f.name] = col
                    else:
                        self.main[f.name] = self.boxes[f.name] = self.widget(f, getattr(defaults, f.name),
                                                                              visible=visible)

    def build_second_pass(self, defaults: Settings) -> None:
        fields = list(second_pass_fields())
        for i in range(0, len(fields), 3):
            with gr.Row():
                for f in fields[i:i + 3]:
                    self.p2[f.name] = self.widget(f, getattr(defaults, f.name), prefix="p2-")

    def model_choices(self) -> list[str]:
        return [DEFAULT_MODEL] + [c for c in self.host.checkpoints() if c]

    def native_size_html(self, checkpoint: str) -> str:
        """The hint under the image size: the selected model's native resolution, when it can be told."""
        size = self.host.native_size(checkpoint)
        return native_size_html(size, Path(checkpoint).name if checkpoint else "the default model")

    # -- values ----------------------------------------------------------------------------
    @property
    def inputs(self) -> list:
        """Every settings widget, in schema order: the one list handlers read and fill."""
        return [self.main[f.name] for f in FIELDS] + [self.p2[f.name] for f in second_pass_fields()]

    @staticmethod
    def to_widget(f: Field, value: Any) -> Any:
        if f.name == "model_checkpoint":
            return value or DEFAULT_MODEL
        if f.name == "model_vae":
            return value or "None"
        if f.kind == "bool":
            return bool(value)
        if f.kind == "choice":
            return value
        if f.kind == "blocks":
            return list(value)
        return f.format(value)

    @staticmethod
    def from_widget(f: Field, value: Any) -> Any:
        if f.name == "model_checkpoint" and value in (None, DEFAULT_MODEL):
            return ""
        if value is None:
            return [] if f.kind == "blocks" else ("" if f.kind != "bool" else False)
        return value

    def settings(self, values: tuple) -> Settings:
        """Widget values (in :attr:`inputs` order) → validated settings; errors name the field."""
        main, p2 = values[:len(FIELDS)], values[len(FIELDS):]
        data = {f.name: self.from_widget(f, v) for f, v in zip(FIELDS, main)}
        if data.get("mode") == "Difference":
            data["second_pass"] = {f.name: self.from_widget(f, v) for f, v in zip(second_pass_fields(), p2)}
        return Settings.from_dict(data, strict=True)

    def values(self, s: Settings) -> list:
        """Settings → widget values in :attr:`inputs` order (the 2nd pass shows its overrides, else the 1st)."""
        return ([self.to_widget(f, getattr(s, f.name)) for f in FIELDS]
                + [self.to_widget(f, s.second_pass.get(f.name, getattr(s, f.name))) for f in second_pass_fields()])

    def visibility(self, mode: str) -> list:
        """Show only the chosen mode's fields; the 2nd-pass accordion only for Difference."""
        return [compat.update(visible=mode in f.modes) for f in FIELDS]


def field_info(f: Field) -> str:
    """The small text under a widget: the settings key first (what TrainTrain users, JSON files, ``--set``
    and the API call it; findable with Ctrl-F), then the help."""
    return f"{f.name} · {f.help}" if f.help else f.name


def form_defaults(host) -> Settings:
    """The form's starting values: the schema's, fitted to the default model's native size where the host
    can tell it (the embedded model draws at 64 px; the schema's 512 px would not fit it)."""
    defaults = Settings.from_dict({"model_checkpoint": host.default_model} if host.default_model else {})
    native = host.native_size(defaults.model_checkpoint)
    return defaults.fitted_to(native) if native else defaults


# --------------------------------------------------------------------------- samples
class _ModelCache:
    """The last model the Samples tab loaded (standalone: from a file; the WebUI host gives its own)."""

    def __init__(self):
        self.key, self.bundle = None, None
        self.lock = threading.Lock()

    def get(self, host, settings: Settings):
        got = host.bundle_for(settings)
        if got is not None:
            return got[0]
        from ..models.loader import load_model_or_default
        key = (settings.model_checkpoint, settings.model_vae)
        if key != self.key:
            self.bundle = load_model_or_default(settings.model_checkpoint or None, vae=settings.model_vae or None,
                                                log=lambda m: log.info(m))
            self.key = key
        return self.bundle


_MODELS = _ModelCache()


def generate_sample(host, settings: Settings, prompt: str, negative: str, lora: str, weight: float, seed: int,
                    steps: int, size: str):
    """One image from the current model with an optional LoRA (removed again afterwards)."""
    from ..generate import apply_loras, generate
    if not prompt.strip():
        raise UserError("prompt: enter what to draw")
    hw = Field("size", "size", (64, 64), "").validate(size) if size.strip() else None
    loras = []
    if lora:
        path = Path(host.lora_dir) / lora
        if not path.is_file():
            raise UserError(f"LoRA {lora}: not found in {host.lora_dir}; press refresh")
        loras = [(path, float(weight))]
    with _MODELS.lock, host.job_context(settings):
        bundle = _MODELS.get(host, settings)
        nets = apply_loras(bundle, loras)
        try:
            return generate(bundle, [prompt], [int(seed)], negative=negative, steps=int(steps), size=hw,
                            clip_skip=settings.clip_skip)[0]
        finally:
            for net in nets:
                net.remove()


def lora_files(host) -> list[str]:
    folder = Path(host.lora_dir)
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))


# --------------------------------------------------------------------------- the tab
def build_tab(host, queue=None) -> gr.Blocks:
    """The whole tab; ``queue`` defaults to the process-wide queue of ``host.queue_db`` (started)."""
    from .jobs import queue_for
    queue = queue or queue_for(host)
    form = Form(host)
    defaults = form_defaults(host)

    with gr.Blocks(analytics_enabled=False, elem_id="shinkansen") as tab:
        with gr.Tabs(elem_id="shinkansen-tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="shinkansen-tab-train"):
                train = _train_tab(host, queue, form, defaults)
            build_dataset_tab(form)         # the Dataset sub-tab: images, captions, repeats, buckets
            with gr.Tab("Queue", id="queue", elem_id="shinkansen-tab-queue"):
                qtab = _queue_tab(host, queue, form, tabs)
            with gr.Tab("Plot", id="plot", elem_id="shinkansen-tab-plot"):
                _plot_tab(tab, host, queue)
            with gr.Tab("Samples", id="samples", elem_id="shinkansen-tab-samples") as samples_tab:
                loras = _samples_tab(host, form)
            from .caption_panel import add_tab as add_caption_tab
            add_caption_tab(host)
            with gr.Tab("Tools", id="tools", elem_id="shinkansen-tab-tools"):
                from .tools_panel import tools_tab
                tools_tab(host)
        samples_tab.select(lambda: compat.update(choices=[""] + lora_files(host)), [], [loras])
        _live(tab, queue, host, train, qtab, loras)
    return tab


def _train_tab(host, queue, form: Form, defaults: Settings) -> dict:
    ui: dict[str, Any] = {}
    with gr.Row():
        presets = list_presets(host.presets_dir)
        ui["preset"] = gr.Dropdown(choices=presets, value=None, label="Preset", elem_id="shinkansen-preset",
                                   scale=3)
        load_btn = gr.Button("Load preset", size="sm", elem_id="shinkansen-preset-load", scale=1)
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="shinkansen-preset-refresh", scale=0, min_width=80)
        preset_name = gr.Textbox(label="Save as preset", placeholder="name", elem_id="shinkansen-preset-name",
                                 scale=3)
        save_btn = gr.Button("Save preset", size="sm", elem_id="shinkansen-preset-save", scale=1)
    with gr.Accordion("Load a settings JSON (ours or TrainTrain's: presets, run files)", open=False):
        json_file = compat.file_input(label="settings JSON", file_types=[".json"], elem_id="shinkansen-json")
    mode_field = next(f for f in FIELDS if f.name == "mode")
    required = [f for f in FIELDS if f.group == "required" and f.name != "mode"]
    optional = [f for f in FIELDS if f.group != "required"]
    with gr.Group():
        gr.Markdown("**Required parameters**")
        form.main["mode"] = form.boxes["mode"] = gr.Radio(choices=list(MODES), value=defaults.mode,
                                                          label=mode_field.label, info=field_info(mode_field),
                                                          elem_id="shinkansen-mode")
        form.build_fields(required, defaults, defaults.mode)
    with gr.Accordion("Optional parameters", open=False, elem_id="shinkansen-optional"):
        form.build_fields(optional, defaults, defaults.mode)
    with gr.Column(visible=defaults.mode == "Difference", elem_id="shinkansen-2nd-pass-box") as p2_box:
        with gr.Accordion("2nd pass (Difference: used when use_2nd_pass_settings is on)", open=False,
                          elem_id="shinkansen-2nd-pass"):
            copy_btn = gr.Button("Copy from 1st pass", size="sm", elem_id="shinkansen-copy-1st")
            form.build_second_pass(defaults)
    with gr.Row():
        ui["start"] = gr.Button("Start Training", variant="primary", elem_id="shinkansen-start")
        ui["add"] = gr.Button("Add to Queue", elem_id="shinkansen-add")
        ui["stop"] = gr.Button("Stop", variant="stop", elem_id="shinkansen-stop")
        ui["stop_save"] = gr.Button("Stop & Save", elem_id="shinkansen-stop-save")
        ui["stop_all"] = gr.Button("Stop all", variant="stop", elem_id="shinkansen-stop-all")
    ui["message"] = gr.HTML(elem_id="shinkansen-message")
    ui["progress"] = gr.HTML(progress_html(queue.progress.snapshot()), elem_id="shinkansen-progress")
    ui["samples"] = gr.Gallery(label="Samples drawn during training (sample_every_n_steps; newest first)",
                               visible=False, columns=4, height=260, elem_id="shinkansen-train-samples")

    inputs, msg = form.inputs, ui["message"]
    boxes = [form.boxes[f.name] for f in FIELDS]

    form.main["mode"].change(lambda m: form.visibility(m) + [compat.update(visible=m == "Difference")],
                             [form.main["mode"]], boxes + [p2_box])
    form.main["model_checkpoint"].change(lambda c: form.native_size_html("" if c == DEFAULT_MODEL else c or ""),
                                         [form.main["model_checkpoint"]], [form.size_hint])

    def fill(load):
        def handler(*args):
            try:
                s = load(*args)
            except UserError as e:
                return [compat.no_change()] * len(inputs) + [message_html(str(e), ok=False)]
            note = "; ".join(s.warnings)
            return form.values(s) + [message_html("loaded" + (f" (warnings: {note})" if note else ""))]
        return handler

    load_btn.click(fill(lambda name: load_preset(name or "", host.presets_dir)), [ui["preset"]], inputs + [msg])
    json_file.upload(fill(lambda f: Settings.from_json(compat.file_path(f))), [json_file], inputs + [msg])
    refresh_btn.click(lambda: compat.update(choices=list_presets(host.presets_dir)), [], [ui["preset"]])

    def save(name, *values):
        try:
            path = save_preset(form.settings(values), name or "", host.presets_dir)
        except UserError as e:
            return message_html(str(e), ok=False), compat.no_change()
        return message_html(f"preset saved: {path}"), compat.update(choices=list_presets(host.presets_dir))
    save_btn.click(save, [preset_name] + inputs, [msg, ui["preset"]])

    copy_btn.click(lambda *v: [v[i] for i, f in enumerate(FIELDS) if f.second_pass],
                   [form.main[f.name] for f in FIELDS], [form.p2[f.name] for f in second_pass_fields()])

    def submit(front: bool):
        def handler(*values):
            try:
                s = form.settings(values)
                running = queue.running_job_id
                job = queue.add(s, front=front)
            except UserError as e:
                return message_html(str(e), ok=False)
            if front:
                queue.resume()
                text = (f"job #{job.id} {job.name} is next; it starts when job #{running} ends" if running
                        else f"job #{job.id} {job.name} started")
            else:
                text = f"job #{job.id} {job.name} added to the queue" + (" (paused)" if queue.paused else "")
            return message_html(text + (f"; {job.message}" if job.message else ""))
        return handler

    ui["start"].click(submit(True), inputs, [msg])
    ui["add"].click(submit(False), inputs, [msg])
    _stop_buttons(queue, ui["stop"], ui["stop_save"], ui["stop_all"], msg)
    return ui


def _stop_buttons(queue, stop, stop_save, stop_all, msg) -> None:
    def do(fn, what):
        def handler():
            job = fn()
            return message_html(f"{what} job #{job}" if job else "no job is running"
                                + (" (queue paused)" if fn is queue.stop_all else ""))
        return handler
    stop.click(do(queue.stop, "stopping"), [], [msg])
    stop_save.click(do(lambda: queue.stop(save=True), "saving and stopping"), [], [msg])
    stop_all.click(do(queue.stop_all, "stopping all: paused the queue and stopping"), [], [msg])


def _job_id(choice: Optional[str]) -> int:
    if not choice:
        raise UserError("select a job first")
    return int(str(choice).split()[0].lstrip("#"))


def _queue_tab(host, queue, form: Form, tabs) -> dict:
    ui: dict[str, Any] = {}
    ui["progress"] = gr.HTML(progress_html(queue.progress.snapshot()), elem_id="shinkansen-queue-progress")
    ui["table"] = gr.HTML(queue_html(queue.list(), queue.paused), elem_id="shinkansen-queue-table")
    with gr.Row():
        ui["select"] = gr.Dropdown(choices=_job_choices(queue.list()), value=None, label="Job",
                                   elem_id="shinkansen-queue-select", scale=3)
        up = gr.Button("Move up", size="sm", elem_id="shinkansen-queue-up")
        down = gr.Button("Move down", size="sm", elem_id="shinkansen-queue-down")
        delete = gr.Button("Delete", size="sm", elem_id="shinkansen-queue-delete")
        edit = gr.Button("Edit in form", size="sm", elem_id="shinkansen-queue-edit")
        requeue = gr.Button("Re-queue", size="sm", elem_id="shinkansen-queue-requeue")
        resume = gr.Button("Resume from state", size="sm", elem_id="shinkansen-queue-resume")
    with gr.Row():
        run = gr.Button("Run queue", variant="primary", elem_id="shinkansen-queue-run")
        pause = gr.Button("Pause after this job", elem_id="shinkansen-queue-pause")
        stop = gr.Button("Stop", variant="stop", elem_id="shinkansen-queue-stop")
        stop_save = gr.Button("Stop & Save", elem_id="shinkansen-queue-stop-save")
        stop_all = gr.Button("Stop all", variant="stop", elem_id="shinkansen-queue-stop-all")
    ui["message"] = msg = gr.HTML(elem_id="shinkansen-queue-message")
    sel, table = ui["select"], ui["table"]

    def act(fn, done):
        def handler(choice):
            try:
                job_id = _job_id(choice)
                fn(job_id)
            except UserError as e:
                return message_html(str(e), ok=False), compat.no_change(), compat.no_change()
            jobs = queue.list()
            keep = choice if any(j.id == job_id for j in jobs) else None
            return (message_html(done.format(id=job_id)), queue_html(jobs, queue.paused),
                    compat.update(choices=_job_choices(jobs), value=keep))
        return handler

    up.click(act(lambda i: queue.move(i, -1), "moved job #{id} up"), [sel], [msg, table, sel])
    down.click(act(lambda i: queue.move(i, +1), "moved job #{id} down"), [sel], [msg, table, sel])
    delete.click(act(queue.delete, "deleted job #{id}"), [sel], [msg, table, sel])
    requeue.click(act(queue.requeue, "job #{id} is pending again"), [sel], [msg, table, sel])
    resume.click(act(lambda i: queue.requeue(i, resume=True), "job #{id} will continue from its saved state"),
                 [sel], [msg, table, sel])

    def edit_back(choice):
        try:
            s = queue.edit_back(_job_id(choice))
        except UserError as e:
            return [compat.no_change()] * len(form.inputs) + [message_html(str(e), ok=False), compat.no_change()]
        return form.values(s) + [message_html(f"job {s.save_lora_name} is in the form; Add to Queue puts it back"),
                                 compat.update(selected="train")]
    edit.click(edit_back, [sel], form.inputs + [msg, tabs])

    def control(fn, text):
        def handler():
            fn()
            return message_html(text), queue_html(queue.list(), queue.paused)
        return handler
    run.click(control(queue.resume, "queue running"), [], [msg, table])
    pause.click(control(queue.pause, "queue paused: the running job finishes, no new job starts"), [], [msg, table])
    _stop_buttons(queue, stop, stop_save, stop_all, msg)
    return ui


def _job_choices(jobs) -> list[str]:
    return [f"#{j.id} {j.name}" for j in jobs]


def _live(tab, queue, host, train: dict, qtab: dict, loras) -> None:
    """Progress panels, queue table, job picker, the run's samples and the Samples tab's LoRA list: filled
    when a page opens (the state of that moment, not of the build) and refreshed every POLL_S with no
    user action. Lists are sent only when they changed; the LoRA folder is listed again only when a
    job has written files."""
    seen = gr.State(None)      # what this page shows: (job choices, sample paths, (job id, files saved))

    def refresh(last):
        shown_choices, shown_samples, shown_saved = last or (None, None, None)
        jobs = queue.list()
        p = queue.progress.snapshot()
        pending = sum(j.state == "pending" for j in jobs)
        choices = _job_choices(jobs)
        saved = (p.job_id, len(p.saved))
        picker = compat.no_change() if choices == shown_choices else compat.update(choices=choices)
        gallery = (compat.no_change() if p.samples == shown_samples
                   else compat.update(value=sample_items(p.samples), visible=bool(p.samples)))
        lora_list = compat.no_change() if saved == shown_saved else compat.update(choices=[""] + lora_files(host))
        panel = progress_html(p, queue.paused, pending)
        return (panel, panel, queue_html(jobs, queue.paused), picker, gallery, lora_list,
                (choices, p.samples, saved))

    outputs = [train["progress"], qtab["progress"], qtab["table"], qtab["select"], train["samples"], loras, seen]
    compat.on_load(tab, lambda: refresh(None), [], outputs)
    compat.poll(tab, refresh, [seen], outputs, POLL_S)


def _run_choices(host) -> list[str]:
    logs = Path(host.logs_dir)
    return [str(p.relative_to(logs)) for p in list_runs(logs)]


def _plot_tab(tab, host, queue) -> None:
    with gr.Row():
        runs = gr.Dropdown(choices=_run_choices(host), value=[], multiselect=True, scale=4,
                           label="Runs (from the logs folder; empty = the running or most recent run)",
                           elem_id="shinkansen-plot-runs")
        refresh = gr.Button("Refresh", size="sm", elem_id="shinkansen-plot-refresh", scale=0, min_width=80)
        auto = gr.Checkbox(value=True, label="auto-refresh while training", elem_id="shinkansen-plot-auto")
    plot = gr.Plot(label="loss", elem_id="shinkansen-plot")
    info = gr.HTML(elem_id="shinkansen-plot-info")
    with gr.Row():
        export = gr.Button("Export PNG", size="sm", elem_id="shinkansen-plot-export")
        png = gr.File(label="PNG", elem_id="shinkansen-plot-file", interactive=False)
    last = gr.State(None)

    def selected(names) -> list[Path]:
        if names:
            return [run_in_logs(host.logs_dir, n) for n in names]
        running = queue.progress.snapshot().csv
        if running and Path(running).is_file():
            return [Path(running)]
        newest = list_runs(host.logs_dir)
        return newest[:1]

    def draw(names, force=True, sig=None):
        try:
            paths = selected(names)
        except UserError as e:
            return compat.no_change(), message_html(str(e), ok=False), sig
        stamp = tuple((str(p), p.stat().st_size) for p in paths)
        if not force and stamp == sig:
            return compat.no_change(), compat.no_change(), sig
        if not paths:
            return None, message_html("no data yet: no runs in the logs folder"), stamp
        series = [read_loss_csv(p) for p in paths]
        if not has_data(series):
            names = ", ".join(s.name for s in series)
            return None, message_html(f"no data yet: {names} has not logged a step so far"), stamp
        text = " · ".join(f'<span class="shinkansen-run" data-steps="{len(s.steps)}" '
                          f'data-val-points="{len(s.val_steps)}">{s.name}: {len(s.steps)} steps'
                          f'{f", last loss {s.loss[-1]:.4f}" if s.loss else ""}'
                          f'{f", validation {s.val_loss[-1]:.4f} at step {s.val_steps[-1]}" if s.val_steps else ""}'
                          f'</span>' for s in series)
        from html import escape
        fig = figure(series)   # the legend as drawn, listed under the plot (a series missing from it shows)
        labels = legend_labels(fig)
        text += (f'<div class="shinkansen-legend" data-series="{escape(" | ".join(labels))}">legend: '
                 f'{escape(", ".join(labels))}</div>')
        return fig, text, stamp

    refresh.click(lambda names: compat.update(choices=_run_choices(host)), [runs], [runs]).then(
        lambda n: draw(n), [runs], [plot, info, last])
    runs.change(lambda n: draw(n), [runs], [plot, info, last])
    compat.poll(tab, lambda n, a, s: draw(n, False, s) if a else (compat.no_change(), compat.no_change(), s),
                [runs, auto, last], [plot, info, last], PLOT_POLL_S)

    def to_png(names):
        from .plot import plot_files
        paths = selected(names)
        if not paths:
            return None
        out = Path(host.logs_dir) / "plots" / f"loss-{time.strftime('%Y%m%d_%H%M%S')}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        return str(plot_files(paths, out))
    export.click(to_png, [runs], [png])


def _samples_tab(host, form: Form):
    """The Samples tab; returns its LoRA picker, which the tab's select, page load and the poll refresh."""
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="prompt", lines=2, elem_id="shinkansen-sample-prompt",
                                value="a small blue triangle on a black background")
            negative = gr.Textbox(label="negative prompt", elem_id="shinkansen-sample-negative")
            with gr.Row():
                lora = gr.Dropdown(choices=[""] + lora_files(host), value="", label="LoRA (from the LoRA folder)",
                                   elem_id="shinkansen-sample-lora", scale=3)
                refresh = gr.Button("Refresh", size="sm", elem_id="shinkansen-sample-refresh", scale=0, min_width=80)
                weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA weight", elem_id="shinkansen-sample-weight")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="shinkansen-sample-seed")
                steps = gr.Number(value=20, precision=0, label="steps", elem_id="shinkansen-sample-steps")
                size = gr.Textbox(value="", label="size H,W (empty = model's native)", elem_id="shinkansen-sample-size")
            go = gr.Button("Generate", variant="primary", elem_id="shinkansen-sample-generate")
            msg = gr.HTML(elem_id="shinkansen-sample-message")
        with gr.Column(scale=2):
            image = gr.Image(label="sample", type="pil", interactive=False, elem_id="shinkansen-sample-image")

    refresh.click(lambda: compat.update(choices=[""] + lora_files(host)), [], [lora])

    def run(p, n, l, w, sd, st, sz, *values):
        try:
            s = form.settings(values)
            img = generate_sample(host, s, p or "", n or "", l or "", w or 1.0, int(sd or 0), int(st or 20), sz or "")
        except UserError as e:
            return compat.no_change(), message_html(str(e), ok=False)
        except Exception as e:   # a bug: the traceback goes to the log, one line to the user
            log.exception("sample generation failed")
            return compat.no_change(), message_html(f"internal error: {type(e).__name__}: {e}", ok=False)
        return img, message_html(f"model: {s.model_checkpoint or 'default'}" + (f", LoRA {l} at {w}" if l else ""))
    go.click(run, [prompt, negative, lora, weight, seed, steps, size] + form.inputs, [image, msg])
    return lora
