"""HTML for the tab's live parts: the progress panel and the queue table (pure functions, no gradio).

Kept apart from ``ui.py`` so what the user reads can be tested without a browser, and so the
HTML carries ``data-*`` attributes (step, total, job id, state) that the browser test reads.
"""
from __future__ import annotations

import datetime as _dt
from html import escape
from pathlib import Path
from typing import Optional, Sequence

from ..events import _fmt_time
from .jobs import Job, Progress


def _num(v: Optional[float], fmt: str = "{:.4f}") -> str:
    return "–" if v is None else fmt.format(v)


def progress_html(p: Progress, paused: bool = False, pending: int = 0) -> str:
    """Step/total, loss (raw and EMA), it/s, ETA, peak memory, phase and the last message."""
    waiting = ""
    if pending:
        waiting = (f" · {pending} pending" + (" (queue paused: press <b>Run queue</b> to start)" if paused else ""))
    if p.job_id is None:
        return (f'<div class="shinkansen-progress" data-phase="idle" data-step="0" data-total="0">'
                f"No job has run yet.{waiting}</div>")
    frac = p.step / p.total if p.total else 0.0
    active = p.phase not in ("done", "failed", "stopped", "interrupted")
    stats = (f'<span class="shinkansen-step">step {p.step}/{p.total}</span> · loss {_num(p.loss)} '
             f"(EMA {_num(p.loss_ema)}) · "
             + (f'<span class="shinkansen-val" data-val-step="{p.val_step}">validation {_num(p.val_loss)} '
                f"(step {p.val_step})</span> · " if p.val_loss is not None else "")
             + f"lr {_num(p.lr, '{:.2e}')} · {p.it_per_s:.2f} it/s · "
             f"ETA {_fmt_time(p.eta_s) if active else '–'} · elapsed {_fmt_time(p.elapsed_s)} · "
             f"peak memory {p.peak_memory_mb:.0f} MB")
    return (f'<div class="shinkansen-progress" data-phase="{escape(p.phase)}" data-step="{p.step}" '
            f'data-total="{p.total}" data-job="{p.job_id}">'
            f'<div><b>#{p.job_id} {escape(p.name)}</b> · <span class="shinkansen-phase">{escape(p.phase)}</span>'
            f"{waiting}</div>"
            f'<progress max="1" value="{frac:.4f}" style="width:100%"></progress>'
            f"<div>{stats}</div>"
            f'<div class="shinkansen-last-message">{escape(p.message)}</div></div>')


def _when(ts: Optional[float]) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S") if ts else ""


def queue_html(jobs: Sequence[Job], paused: bool = False) -> str:
    """The queue as a table: running, then pending in order, then finished jobs newest first."""
    head = (f'<div class="shinkansen-queue-state" data-paused="{str(paused).lower()}">Queue '
            f'{"paused" if paused else "running"} · {sum(j.state == "pending" for j in jobs)} pending</div>')
    if not jobs:
        return head + '<table class="shinkansen-queue"><tr><td>The queue is empty.</td></tr></table>'
    rows = []
    for j in jobs:
        steps = j.settings.get("train_iterations", "")
        rows.append(f'<tr data-job-id="{j.id}" data-state="{j.state}" data-name="{escape(j.name)}">'
                    f"<td>#{j.id}</td><td>{escape(j.name)}</td><td>{escape(j.mode)}</td>"
                    f'<td class="state-{j.state}">{j.state}</td><td>{steps}</td>'
                    f"<td>{_when(j.created)}</td><td>{_when(j.finished)}</td><td>{escape(j.message)}</td></tr>")
    return (head + '<table class="shinkansen-queue"><thead><tr><th>job</th><th>LoRA name</th><th>mode</th>'
            "<th>state</th><th>steps</th><th>added</th><th>finished</th><th>message</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def message_html(text: str, ok: bool = True) -> str:
    """A one-line status under the buttons (errors in red, never a traceback)."""
    cls = "shinkansen-ok" if ok else "shinkansen-error"
    return f'<div class="{cls}">{escape(text)}</div>'


def native_size_html(size: Optional[tuple], model: str) -> str:
    """The note under the image size: what the selected model was trained at ("" when unknown)."""
    if not size:
        return ""
    return (f'<div class="shinkansen-hint" data-native="{size[0]}x{size[1]}">{escape(model)} was trained at '
            f"{size[0]}×{size[1]} px: train at or near that size</div>")


def sample_items(paths: Sequence[str], limit: int = 8) -> list[tuple[str, str]]:
    """The gallery's (image, caption) pairs: the run's newest samples first, captioned by file name
    (``step000040_0`` = step 40, prompt 0)."""
    return [(p, Path(p).stem) for p in reversed(list(paths)[-limit:])]
