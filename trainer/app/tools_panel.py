"""The Tools sub-tab: resize, merge and extract forms over the same functions as the CLI.

Inputs are picked from the host's LoRA folder and checkpoints (or typed as paths); outputs are names
written into the LoRA folder (merged checkpoints: the model folder when the host has one). The report a
tool prints on the command line is shown in the form's report box.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import gradio as gr

from . import compat
from ..errors import UserError
from .views import message_html

log = logging.getLogger(__name__)

RULE_CHOICES = ["fixed rank", "sv_fro", "sv_ratio", "sv_cumulative"]
PRECISIONS = ["same as input", "fp16", "bf16", "fp32"]


def _lora_choices(host) -> list[str]:
    from .ui import lora_files
    return lora_files(host)


def _lora_path(host, name: str) -> Path:
    name = (name or "").strip()
    if not name:
        raise UserError("choose a LoRA file")
    path = Path(name)
    return path if path.is_absolute() else Path(host.lora_dir) / path


def _model_path(host, name: str) -> Path:
    from ..models.loader import DEFAULT_MODEL
    name = (name or "").strip()
    return Path(name) if name else Path(host.default_model or DEFAULT_MODEL)


def _output(folder, name: str) -> Path:
    name = (name or "").strip()
    if not name:
        raise UserError("output name: enter a file name")
    if re.search(r"[\\/]", name) or ".." in name:
        raise UserError(f"output name {name!r}: a plain file name, no folders")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return Path(folder) / name


def _int(value, label: str, required: bool = False):
    if value in (None, "") or (not required and float(value) == 0):
        if required:
            raise UserError(f"{label}: enter a number")
        return None
    return int(value)


def _precision(value):
    return None if value in (None, "", PRECISIONS[0]) else value


def _run(fn):
    """(report, message) of a tool call; user errors are one line, bugs are logged."""
    try:
        result = fn()
    except UserError as e:
        return "", message_html(str(e), ok=False)
    except Exception as e:      # a bug: traceback to the log, one line to the user
        log.exception("tool failed")
        return "", message_html(f"internal error: {type(e).__name__}: {e}", ok=False)
    return result.report, message_html(f"saved: {result.path}")


def tools_tab(host) -> None:
    """Build the Tools sub-tab inside the current ``gr.Tab``."""
    with gr.Tabs(elem_id="shinkansen-tools-tabs"):
        _forms(host)


def _forms(host) -> None:
    with gr.Tab("Resize", elem_id="shinkansen-tools-resize"):
        with gr.Row():
            r_lora = gr.Dropdown(choices=_lora_choices(host), value=None, allow_custom_value=True, scale=3,
                                 label="LoRA (from the LoRA folder, or a path)", elem_id="shinkansen-tools-resize-lora")
            r_refresh = gr.Button("Refresh", size="sm", scale=0, min_width=80, elem_id="shinkansen-tools-refresh")
            r_out = gr.Textbox(label="output name (written to the LoRA folder)", elem_id="shinkansen-tools-resize-out")
        with gr.Row():
            r_rule = gr.Dropdown(choices=RULE_CHOICES, value=RULE_CHOICES[0], label="rank rule",
                                 elem_id="shinkansen-tools-resize-rule")
            r_rank = gr.Number(value=4, precision=0, label="rank (with a rule: max rank, 0 = none)",
                               elem_id="shinkansen-tools-resize-rank")
            r_param = gr.Number(value=0.9, label="rule parameter", elem_id="shinkansen-tools-resize-param")
            r_conv = gr.Number(value=0, precision=0, label="conv 3×3 rank (0 = rank)",
                               elem_id="shinkansen-tools-resize-conv")
            r_prec = gr.Dropdown(choices=PRECISIONS, value=PRECISIONS[0], label="save precision",
                                 elem_id="shinkansen-tools-resize-precision")
            r_over = gr.Checkbox(value=False, label="overwrite", elem_id="shinkansen-tools-resize-overwrite")
        r_go = gr.Button("Resize", variant="primary", elem_id="shinkansen-tools-resize-run")
        r_msg = gr.HTML(elem_id="shinkansen-tools-resize-message")
        r_report = gr.Textbox(label="report", lines=12, interactive=False, elem_id="shinkansen-tools-resize-report")

    with gr.Tab("Merge", elem_id="shinkansen-tools-merge"):
        m_loras = gr.Textbox(lines=3, label="LoRAs, one per line: NAME[:WEIGHT[:BLOCK WEIGHTS]] (LoRA folder or path)",
                             elem_id="shinkansen-tools-merge-loras")
        with gr.Row():
            m_model = gr.Dropdown(choices=["(merge into one LoRA)", "(default model)"] + host.checkpoints()[1:],
                                  value="(merge into one LoRA)", allow_custom_value=True, label="into",
                                  elem_id="shinkansen-tools-merge-model")
            m_rank = gr.Number(value=0, precision=0, label="LoRA merge: SVD rank (0 = concatenate, exact)",
                               elem_id="shinkansen-tools-merge-rank")
            m_out = gr.Textbox(label="output name", elem_id="shinkansen-tools-merge-out")
            m_over = gr.Checkbox(value=False, label="overwrite", elem_id="shinkansen-tools-merge-overwrite")
        m_go = gr.Button("Merge", variant="primary", elem_id="shinkansen-tools-merge-run")
        m_msg = gr.HTML(elem_id="shinkansen-tools-merge-message")
        m_report = gr.Textbox(label="report", lines=12, interactive=False, elem_id="shinkansen-tools-merge-report")

    with gr.Tab("Extract", elem_id="shinkansen-tools-extract"):
        with gr.Row():
            e_base = gr.Dropdown(choices=host.checkpoints(), value="", allow_custom_value=True,
                                 label="base checkpoint (empty = default model)", elem_id="shinkansen-tools-extract-base")
            e_tuned = gr.Dropdown(choices=host.checkpoints()[1:], value=None, allow_custom_value=True,
                                  label="tuned checkpoint", elem_id="shinkansen-tools-extract-tuned")
        with gr.Row():
            e_rank = gr.Number(value=8, precision=0, label="rank", elem_id="shinkansen-tools-extract-rank")
            e_conv = gr.Number(value=0, precision=0, label="conv rank (0 = no conv layers)",
                               elem_id="shinkansen-tools-extract-conv")
            e_out = gr.Textbox(label="output name (written to the LoRA folder)", elem_id="shinkansen-tools-extract-out")
            e_over = gr.Checkbox(value=False, label="overwrite", elem_id="shinkansen-tools-extract-overwrite")
        e_go = gr.Button("Extract", variant="primary", elem_id="shinkansen-tools-extract-run")
        e_msg = gr.HTML(elem_id="shinkansen-tools-extract-message")
        e_report = gr.Textbox(label="report", lines=12, interactive=False, elem_id="shinkansen-tools-extract-report")

    r_refresh.click(lambda: compat.update(choices=_lora_choices(host)), [], [r_lora])

    def do_resize(lora, out, rule, rank, param, conv, prec, over):
        from ..tools.resize import resize

        def call():
            src = _lora_path(host, lora)
            dynamic = None if rule in (None, "", RULE_CHOICES[0]) else rule
            fixed = _int(rank, "rank", required=dynamic is None)
            return resize(src, _output(host.lora_dir, out), None if dynamic else fixed, dynamic=dynamic,
                          param=float(param) if dynamic else None, max_rank=fixed if dynamic else None,
                          conv_rank=_int(conv, "conv rank"), save_precision=_precision(prec), overwrite=bool(over))
        return _run(call)
    r_go.click(do_resize, [r_lora, r_out, r_rule, r_rank, r_param, r_conv, r_prec, r_over], [r_report, r_msg])

    def do_merge(loras, model, rank, out, over):
        from ..tools.merge import merge_into_checkpoint, merge_loras, parse_source

        def call():
            lines = [x.strip() for x in (loras or "").splitlines() if x.strip()]
            if not lines:
                raise UserError("LoRAs: enter at least one LoRA file")
            sources = []
            for line in lines:
                s = parse_source(line)
                s.path = _lora_path(host, str(s.path))
                sources.append(s)
            if model in (None, "", "(merge into one LoRA)"):
                return merge_loras(sources, _output(host.lora_dir, out), rank=_int(rank, "rank"),
                                   overwrite=bool(over))
            ckpt = _model_path(host, "" if model == "(default model)" else model)
            return merge_into_checkpoint(ckpt, sources, _output(host.model_dir or host.lora_dir, out),
                                         overwrite=bool(over))
        return _run(call)
    m_go.click(do_merge, [m_loras, m_model, m_rank, m_out, m_over], [m_report, m_msg])

    def do_extract(base, tuned, rank, conv, out, over):
        from ..tools.extract import extract

        def call():
            if not (tuned or "").strip():
                raise UserError("tuned checkpoint: choose or type a file")
            return extract(_model_path(host, base), Path(tuned.strip()), _output(host.lora_dir, out),
                           _int(rank, "rank", required=True), conv_rank=_int(conv, "conv rank"), overwrite=bool(over))
        return _run(call)
    e_go.click(do_extract, [e_base, e_tuned, e_rank, e_conv, e_out, e_over], [e_report, e_msg])
