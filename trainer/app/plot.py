"""Loss CSVs → a matplotlib figure: raw loss (faint), its EMA, the validation loss (dots joined by a
dotted line, on the steps it was measured) and the learning rate on a second axis.

Reads our CSV (``step,loss,loss_ema,lr[,lr_te],elapsed_s[,val_loss]``) and TrainTrain's (a ``key,value``
preamble, then ``Step,Loss,Learning Rate 1[,Learning Rate 2…]``: one LR column per optimizer
param group, the text encoder's first when it is trained, so the UNet's is the last; its
``Loss`` is already its EMA, so it is drawn as the smoothed curve and not smoothed again).
Figures use the object-oriented API only (no pyplot state), so plotting from a UI thread is safe.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import atomic_path
from ..errors import UserError


@dataclass
class Series:
    name: str
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    loss_is_ema: bool = False        # TrainTrain writes its EMA as "Loss": there is no raw loss to smooth
    val_steps: list = field(default_factory=list)   # steps with a validation loss (a sparse column)
    val_loss: list = field(default_factory=list)

    def ema(self, alpha: float = 0.1) -> list:
        if self.loss_is_ema:
            return list(self.loss)
        out, value = [], None
        for x in self.loss:
            value = x if value is None else (1 - alpha) * value + alpha * x
            out.append(value)
        return out


def _float(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_loss_csv(path: Path) -> Series:
    """Either format; an unterminated last row (a run that crashed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: loss CSV not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(text.splitlines()))
    header_at = next((i for i, r in enumerate(rows) if r and r[0].strip().lower() == "step"), None)
    if header_at is None:
        raise UserError(f"{path}: not a loss CSV (no step column)")
    header = [h.strip().lower() for h in rows[header_at]]
    try:
        i_step, i_loss = header.index("step"), header.index("loss")
    except ValueError:
        raise UserError(f"{path}: not a loss CSV (no loss column)") from None
    tt_lr_columns = [i for i, h in enumerate(header) if re.fullmatch(r"learning[ _]rate(\s*\d+)?", h)]
    i_lr = header.index("lr") if "lr" in header else (tt_lr_columns[-1] if tt_lr_columns else None)
    i_val = header.index("val_loss") if "val_loss" in header else None
    series = Series(path.stem, loss_is_ema=bool(tt_lr_columns) and "loss_ema" not in header)
    for row in rows[header_at + 1:]:
        if len(row) <= max(i_step, i_loss):
            continue
        step, loss = _float(row[i_step]), _float(row[i_loss])
        if step is None or loss is None:
            continue
        series.steps.append(int(step))
        series.loss.append(loss)
        series.lr.append(_float(row[i_lr]) if i_lr is not None and i_lr < len(row) else None)
        val = _float(row[i_val]) if i_val is not None and i_val < len(row) else None
        if val is not None:
            series.val_steps.append(int(step))
            series.val_loss.append(val)
    return series


def has_data(series: Sequence[Series]) -> bool:
    """Whether any run has logged a step (a run's CSV exists, header only, until its first step)."""
    return any(s.steps for s in series)


def legend_labels(fig) -> list[str]:
    """The series names in a figure's legend (what the Plot tab lists under the plot)."""
    legend = fig.axes[0].get_legend() if fig.axes else None
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def figure(series: Sequence[Series], title: str = ""):
    """One figure: each run's raw loss faint, its EMA solid, validation dotted, LR dashed on the right axis."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if not has_data(series):     # empty axes would read as a plot of values around zero
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", fontsize=16, color="#666666")
        ax.set_title(title or ", ".join(s.name for s in series))
        return fig
    ax_lr = ax.twinx()
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, s in enumerate(series):
        c = colors[i % len(colors)]
        if not s.loss_is_ema:
            ax.plot(s.steps, s.loss, color=c, alpha=0.25, linewidth=0.8)
        ax.plot(s.steps, s.ema(), color=c, linewidth=1.8, label=s.name)
        if s.val_steps:
            ax.plot(s.val_steps, s.val_loss, color=c, linestyle=":", marker="o", markersize=4, linewidth=1.2,
                    label=f"{s.name} validation")
        lr = [(x, y) for x, y in zip(s.steps, s.lr) if y is not None]
        if lr:
            ax_lr.plot([x for x, _ in lr], [y for _, y in lr], color=c, linestyle="--", linewidth=1.0, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (EMA solid, raw faint, validation dotted)")
    ax_lr.set_ylabel("learning rate (dashed)")
    if series:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or (series[0].name if len(series) == 1 else f"{len(series)} runs"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_files(paths: Sequence[Path], output: Path, title: str = "") -> Path:
    output = Path(output)
    fig = figure([read_loss_csv(p) for p in paths], title)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    return output


# --------------------------------------------------------------------------- runs in the logs folder
def list_runs(logs_dir: Path) -> list[Path]:
    """Loss CSVs under ``logs_dir`` (``DATE/NAME-STAMP.csv`` and TrainTrain's), newest first."""
    logs_dir = Path(logs_dir)
    if not logs_dir.is_dir():
        return []
    found = [p for p in logs_dir.rglob("*.csv") if p.is_file() and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def run_in_logs(logs_dir: Path, name: str) -> Path:
    """``name`` (relative to ``logs_dir``) as a path, refusing anything outside the logs folder."""
    root = Path(logs_dir).resolve()
    path = (root / name).resolve()
    if root not in path.parents or path.suffix.lower() != ".csv":
        raise UserError(f"{name}: pick a loss CSV inside the logs folder {root}")
    if not path.is_file():
        raise UserError(f"{name}: no such run in {root}")
    return path


def series_dict(series: Series) -> dict:
    """JSON form of a run for the HTTP API: steps, raw loss, its EMA and the LR."""
    return {"name": series.name, "steps": series.steps, "loss": series.loss, "loss_ema": series.ema(),
            "lr": series.lr, "val_steps": series.val_steps, "val_loss": series.val_loss}
