"""A job on N local processes: the app (or ``train --set processes=N``) starts torchrun; rank 0 reports back.

torchrun is the launcher (``python -m torch.distributed.run --standalone --nproc_per_node N -m trainer train
JOB.json``): its workers are ordinary ``train`` commands (trainer/dist.py joins them into one group). The
app cannot share Python objects with them, so two files carry what a thread-local run passes in memory:

- ``SHINKANSEN_EVENTS_FILE``: rank 0 appends every event (step, message, saved, sample …) as one JSON
  line; the app tails it and re-emits the events on its own bus, so live progress, the loss plot's CSV and
  the saved-file list work as for one process;
- ``SHINKANSEN_STOP_FILE``: the app's Stop / Stop & Save writes ``stop`` or ``save`` there; rank 0 polls
  it and requests the stop, which every rank then agrees on at the next step.

A run that fails gives the job its first ``error:`` line (every rank raises the same one), else the rank
and exit code torchrun reports for a worker that died.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .atomic import atomic_path
from .errors import UserError
from .events import EventBus, RunEvent, StepEvent

EVENTS_ENV, STOP_ENV = "SHINKANSEN_EVENTS_FILE", "SHINKANSEN_STOP_FILE"
ROOT = Path(__file__).resolve().parents[1]


def torchrun_command(job: Path, processes: int, *train_args: str) -> list[str]:
    """The torchrun command line for ``job`` on ``processes`` local processes (one node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(processes)}",
            "-m", "trainer", "train", str(job), *map(str, train_args)]


def relaunch(job: Path, processes: int, args) -> int:
    """``train JOB --set processes=N`` outside torchrun: the same command under torchrun (its exit code)."""
    extra = [x for kv in args.set for x in ("--set", kv)]
    for flag in ("model", "lora_dir", "device", "log_dir", "json_dir"):
        if getattr(args, flag, None):
            extra += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.call(torchrun_command(job, processes, *extra), env=env)


# --------------------------------------------------------------------------- the worker's side (rank 0)
class JsonLinesSink:
    """Events as JSON lines, flushed per event (the app reads them while the run goes on)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, event: object) -> None:
        kind = "step" if isinstance(event, StepEvent) else "run" if isinstance(event, RunEvent) else None
        if kind is None:
            return
        self.file.write(json.dumps({"type": kind, **asdict(event)}, default=str) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class StopFileWatcher:
    """Polls the stop file and turns its content into a Stop (``stop``) or Stop & Save (``save``)."""

    def __init__(self, path: Path, stop, poll_s: float = 0.3):
        self.path, self.stop, self.poll_s = Path(path), stop, poll_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shinkansen-stop-file", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(self.poll_s):
            try:
                mode = self.path.read_text().strip()
            except OSError:
                continue
            if mode in ("stop", "save"):
                self.stop.request(mode)

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)


def worker_hooks(stop, sinks: list) -> tuple[Optional[EventBus], list]:
    """For a ``train`` the app started through torchrun: a bus that also writes the events file, and the stop
    watcher (rank 0 only; the others stop with it). ``(None, [])`` for an ordinary run."""
    events, stop_file = os.environ.get(EVENTS_ENV), os.environ.get(STOP_ENV)
    if int(os.environ.get("RANK", "0")) != 0 or not (events or stop_file):
        return None, []
    closers: list = []
    bus = EventBus(list(sinks))
    if events:
        sink = JsonLinesSink(Path(events))
        bus.subscribe(sink)
        closers.append(sink)
    if stop_file:
        closers.append(StopFileWatcher(Path(stop_file), stop))
    return bus, closers


# --------------------------------------------------------------------------- the app's side
def _event(line: str):
    try:
        d = json.loads(line)
    except ValueError:
        return None
    kind = d.pop("type", None)
    try:
        return StepEvent(**d) if kind == "step" else RunEvent(**d) if kind == "run" else None
    except TypeError:
        return None


def _failure(log_text: str, code: int) -> str:
    """One line for a failed torchrun: the workers' ``error:`` line, else the rank that died and its code."""
    for line in log_text.splitlines():
        if line.startswith("error: "):
            return line[len("error: "):].strip()
    rank = re.search(r"rank\s*:\s*(\d+)", log_text)
    exit_code = re.search(r"exitcode\s*:\s*(-?\d+)", log_text)
    who = f"rank {rank.group(1)} " if rank else "a training process "
    return f"{who}exited with code {exit_code.group(1) if exit_code else code} (torchrun exit code {code})"


def run_processes(settings, processes: int, *, lora_dir: Path, log_dir: Path, json_dir: Path, work: Path,
                  events: EventBus, stop, poll_s: float = 0.5):
    """Run ``settings`` on ``processes`` local processes through torchrun; events re-emitted on ``events``,
    ``stop`` (a StopRequest) forwarded. Returns the runner's JobResult; a failure raises UserError."""
    from .dist import check_mode
    from .runner import JobResult
    from .settings import write_json_atomic
    check_mode(settings.mode, processes)
    settings.validate_for_run(check_files=True)
    work.mkdir(parents=True, exist_ok=True)
    job, events_file, stop_file, log_file = (work / n for n in ("job.json", "events.jsonl", "stop", "torchrun.log"))
    for f in (events_file, stop_file):
        f.unlink(missing_ok=True)
    write_json_atomic(job, settings.to_dict("ours"))
    cmd = torchrun_command(job, processes, "--lora-dir", lora_dir, "--log-dir", log_dir, "--json-dir", json_dir)
    env = {**os.environ, EVENTS_ENV: str(events_file), STOP_ENV: str(stop_file), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0, saved, status, sent, offset = time.time(), [], None, None, 0
    events.emit(RunEvent("message", f"starting {processes} processes: {' '.join(cmd[1:6])} …"))
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

        def pump() -> None:
            nonlocal offset, status
            if not events_file.is_file():
                return
            with open(events_file, encoding="utf-8") as f:
                f.seek(offset)
                for line in f:
                    if not line.endswith("\n"):   # a line being written: read it next time
                        break
                    offset += len(line.encode("utf-8"))
                    ev = _event(line)
                    if ev is None:
                        continue
                    if isinstance(ev, RunEvent) and ev.kind == "saved" and ev.path:
                        saved.append(Path(ev.path))
                    if isinstance(ev, RunEvent) and ev.kind in ("done", "stopped"):
                        status = ev.kind
                        continue   # the queue announces the end itself
                    events.emit(ev)

        try:
            while proc.poll() is None:
                if stop.mode is not None and stop.mode != sent:
                    with atomic_path(stop_file) as tmp:
                        Path(tmp).write_text(stop.mode)
                    sent = stop.mode
                pump()
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:   # the app itself is going away: end the workers
                proc.terminate()
                proc.wait(60)
    pump()
    code = proc.returncode
    if status is None:   # rank 0 never reported an end: a failure (a stopped run's workers exit 3)
        raise UserError(_failure(log_file.read_text(errors="replace"), code))
    csvs = [p for p in log_dir.glob(f"*/{settings.save_lora_name}-*.csv") if p.stat().st_mtime >= t0 - 2]
    csv = max(csvs, key=lambda p: p.stat().st_mtime) if csvs else None
    return JobResult(status, saved, csv, None, time.time() - t0)
