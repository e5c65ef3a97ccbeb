"""Training events and the sinks that consume them: console progress bar, loss CSV, the UI.

The engine only emits events; what shows them (a terminal bar, a CSV file, the gradio tab,
the HTTP API) subscribes. A sink that fails never stops training: its error is logged once.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, TextIO

log = logging.getLogger(__name__)


@dataclass
class StepEvent:
    step: int                 # optimizer steps done (1-based after the first step)
    total: int
    loss: float
    loss_ema: float
    lr: float
    lr_te: Optional[float]
    it_per_s: float
    eta_s: float
    elapsed_s: float
    peak_memory_mb: float     # peak RSS on CPU, peak allocated on CUDA
    phase: str = ""           # e.g. "pass 1" / "pass 2" for Difference
    val_loss: Optional[float] = None   # the validation loss, on the steps it was measured


@dataclass
class RunEvent:
    kind: str                 # "start", "message", "saved", "sample", "done", "stopped", "failed"
    message: str = ""
    path: Optional[str] = None
    data: dict = field(default_factory=dict)


Sink = Callable[[object], None]


class EventBus:
    def __init__(self, sinks: Optional[list] = None):
        self.sinks: list[Sink] = list(sinks or [])
        self._broken: set[int] = set()

    def subscribe(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def emit(self, event: object) -> None:
        for sink in list(self.sinks):
            try:
                sink(event)
            except Exception:  # a display problem must never kill a training run
                if id(sink) not in self._broken:
                    self._broken.add(id(sink))
                    log.exception("event sink %r failed; further errors from it are suppressed", sink)

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close:
                try:
                    close()
                except Exception:
                    log.exception("closing event sink %r failed", sink)


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ConsoleProgress:
    """A one-line progress bar on a terminal, plain lines every ``every`` steps otherwise (logs, CI)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 24, every: int = 10):
        self.stream, self.width, self.every = stream, width, every
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._open_line = False

    def __call__(self, event: object) -> None:
        if isinstance(event, StepEvent):
            frac = event.step / max(1, event.total)
            bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
            phase = f"{event.phase} " if event.phase else ""
            line = (f"{phase}[{bar}] {event.step}/{event.total} loss {event.loss_ema:.4f} "
                    f"{event.it_per_s:.2f} it/s ETA {_fmt_time(event.eta_s)} mem {event.peak_memory_mb:.0f} MB")
            if self.tty:
                self.stream.write("\r" + line)
                self._open_line = True
            elif event.step % self.every == 0 or event.step == event.total or event.step == 1:
                self.stream.write(line + "\n")
            self.stream.flush()
        elif isinstance(event, RunEvent) and event.kind != "sample":
            if self._open_line:
                self.stream.write("\n")
                self._open_line = False
            text = event.message or event.kind
            if event.kind == "saved" and event.path:
                text = f"saved: {event.path}"
            self.stream.write(text + "\n")
            self.stream.flush()


def keep_csv_rows(path: Path, rows: int) -> None:
    """Cut a loss CSV back to its header and first ``rows`` rows (atomic: temp file + rename).

    A resumed run continues the CSV from where its state was saved; rows written after that (the
    run went on until it was killed) are dropped, as is an unterminated last line.
    """
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]   # complete lines only
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines[:1 + max(0, rows)]), encoding="utf-8")
    os.replace(tmp, path)


class CsvLogger:
    """``step,loss,loss_ema,lr[,lr_te],elapsed_s[,val_loss]``; each row one ``write`` on an append-mode
    descriptor, so a crash leaves whole rows only (a reader drops an unterminated last line).
    ``val_loss`` (``with_val``) is last so older readers find every other column where it was; it is
    empty on the steps without a validation.

    ``keep_rows`` continues an existing CSV after its first ``keep_rows`` rows (a resumed run);
    ``rows`` counts the rows in the file, ``muted`` skips rows that are already there (a pass re-run).
    """

    def __init__(self, path: Path, with_te_lr: bool, keep_rows: Optional[int] = None, with_val: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.with_te_lr, self.with_val = with_te_lr, with_val
        self.rows, self.muted = 0, False
        if keep_rows is not None and self.path.is_file():
            keep_csv_rows(self.path, keep_rows)
            self.rows = max(0, self.path.read_text(encoding="utf-8", errors="replace").count("\n") - 1)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size == 0:
            header = ("step,loss,loss_ema,lr" + (",lr_te" if with_te_lr else "") + ",elapsed_s"
                      + (",val_loss" if with_val else "") + "\n")
            os.write(self._fd, header.encode())

    def __call__(self, event: object) -> None:
        if not isinstance(event, StepEvent) or self._fd is None or self.muted:
            return
        row = [str(event.step), f"{event.loss:.6g}", f"{event.loss_ema:.6g}", f"{event.lr:.6g}"]
        if self.with_te_lr:
            row.append(f"{(event.lr_te if event.lr_te is not None else event.lr):.6g}")
        row.append(f"{event.elapsed_s:.2f}")
        if self.with_val:
            row.append(f"{event.val_loss:.6g}" if event.val_loss is not None else "")
        try:
            os.write(self._fd, (",".join(row) + "\n").encode())
        except OSError as e:   # a full disk: one line, no traceback; the run goes on and its save reports it
            log.warning("loss CSV %s: %s; no more rows are written", self.path, e.strerror or e)
            self.close()
            return
        self.rows += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def peak_memory_mb(device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on CPU."""
    import torch
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2**20
    except ImportError:  # Windows
        return 0.0
