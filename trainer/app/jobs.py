"""The persistent job queue (SPEC §9): SQLite rows, one worker thread, a live progress record.

Why SQLite: a queued job must survive a restart or a crash of the WebUI, and every state
change must be atomic; it is in the standard library. Several processes may open the same
file (the server and ``python -m trainer queue …``), so every change is one transaction
(``BEGIN IMMEDIATE``) and the worker claims a job with a conditional ``UPDATE``.

A job is a full settings snapshot (``Settings.to_dict``) plus copies of its image inputs
(:data:`trainer.settings.IMAGE_FIELDS`) in ``jobs/ID/`` under the extension folder, so the
queue never depends on the browser's temporary upload files. Dataset *folders* are the
user's own and are not copied (they may hold thousands of images).

States: ``pending → running → done | failed | stopped``; a job found ``running`` when a new
server starts (its process died) becomes ``interrupted``, and any finished job can be put
back with :meth:`JobQueue.requeue`. Jobs left pending by a previous session wait until the
queue is resumed (Start Training, Run queue), so a restart never starts a training run
unasked.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from ..errors import UserError
from ..events import ConsoleProgress, EventBus, RunEvent, StepEvent
from ..settings import IMAGE_FIELDS, Settings, fields_for_mode

log = logging.getLogger(__name__)

STATES = ("pending", "running", "done", "failed", "stopped", "interrupted")
ACTIVE = ("pending", "running")
FINISHED = ("done", "failed", "stopped", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    position INTEGER NOT NULL,
    name     TEXT NOT NULL,
    mode     TEXT NOT NULL,
    state    TEXT NOT NULL,
    settings TEXT NOT NULL,
    message  TEXT NOT NULL DEFAULT '',
    result   TEXT NOT NULL DEFAULT '{}',
    owner    INTEGER,
    created  REAL NOT NULL,
    started  REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, position);
"""


class DuplicateJob(UserError):
    """A pending/running job already writes this ``save_lora_name`` (HTTP 409 in the API)."""


class JobNotFound(UserError):
    """No job with that id (HTTP 404 in the API)."""


@dataclass
class Job:
    id: int
    name: str
    mode: str
    state: str
    position: int
    settings: dict
    message: str = ""
    result: dict = field(default_factory=dict)
    created: float = 0.0
    started: Optional[float] = None
    finished: Optional[float] = None

    @property
    def label(self) -> str:
        return f"#{self.id} {self.name} ({self.state})"

    def to_dict(self, with_settings: bool = True) -> dict:
        d = asdict(self)
        if not with_settings:
            d.pop("settings")
        return d


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], name=row["name"], mode=row["mode"], state=row["state"], position=row["position"],
               settings=json.loads(row["settings"]), message=row["message"], result=json.loads(row["result"] or "{}"),
               created=row["created"], started=row["started"], finished=row["finished"])


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _pid_alive(pid: Optional[int]) -> bool:
    """Whether another live process owns a running job (our own pid can only be a reused one)."""
    if not pid or pid == os.getpid():
        return False
    if sys.platform == "win32":   # os.kill(pid, 0) would terminate the process there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- live progress
@dataclass
class Progress:
    """What the UI and the API show about the running job (a snapshot; plain values only)."""
    job_id: Optional[int] = None
    name: str = ""
    phase: str = "idle"          # idle | loading | training | <mode phase, e.g. "pass 1"> | done | failed | stopped
    step: int = 0
    total: int = 0
    loss: Optional[float] = None
    loss_ema: Optional[float] = None
    lr: Optional[float] = None
    val_loss: Optional[float] = None       # the latest validation loss, measured at step val_step
    val_step: Optional[int] = None
    it_per_s: float = 0.0
    eta_s: float = 0.0
    elapsed_s: float = 0.0
    peak_memory_mb: float = 0.0
    message: str = ""
    csv: Optional[str] = None
    saved: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    updated: float = 0.0


class ProgressTracker:
    """An EventBus sink that keeps the latest :class:`Progress`; read from any thread."""

    def __init__(self, logs_dir: Path):
        self.logs_dir = Path(logs_dir)
        self._lock = threading.Lock()
        self._p = Progress()
        self._started = 0.0

    def begin(self, job: Job) -> None:
        with self._lock:
            total = int(job.settings.get("train_iterations") or 0)
            self._p = Progress(job_id=job.id, name=job.name, phase="loading", total=total,
                               message="preparing", updated=time.time())
            self._started = time.time()

    def end(self, state: str, message: str) -> None:
        with self._lock:
            self._p.phase, self._p.message, self._p.updated = state, message, time.time()

    def __call__(self, event: object) -> None:
        with self._lock:
            p = self._p
            if isinstance(event, StepEvent):
                p.step, p.total, p.loss, p.loss_ema, p.lr = event.step, event.total, event.loss, event.loss_ema, event.lr
                p.it_per_s, p.eta_s, p.elapsed_s = event.it_per_s, event.eta_s, event.elapsed_s
                p.peak_memory_mb, p.phase = event.peak_memory_mb, event.phase or "training"
                if event.val_loss is not None:
                    p.val_loss, p.val_step = event.val_loss, event.step
                if p.csv is None:
                    p.csv = self._find_csv(p.name)
            elif isinstance(event, RunEvent):
                if event.kind == "saved" and event.path:
                    p.saved.append(event.path)
                elif event.kind == "sample" and event.path:
                    p.samples.append(event.path)
                elif event.kind == "start":
                    p.phase = (event.data or {}).get("phase") or "training"
                if event.message:
                    p.message = event.message
            p.updated = time.time()

    def _find_csv(self, name: str) -> Optional[str]:
        """The loss CSV this run is writing: ``logs/DATE/NAME-STAMP.csv`` created since the job began."""
        found = [c for c in self.logs_dir.glob(f"*/{name}-*.csv") if c.stat().st_mtime >= self._started - 2]
        return str(max(found, key=lambda c: c.stat().st_mtime)) if found else None

    def snapshot(self) -> Progress:
        with self._lock:
            return Progress(**{**asdict(self._p), "saved": list(self._p.saved), "samples": list(self._p.samples)})


# --------------------------------------------------------------------------- the queue
class JobQueue:
    """The queue in ``host.queue_db``; :meth:`start` runs the worker thread (the CLI never does)."""

    def __init__(self, host, *, poll_s: float = 1.0):
        self.host = host
        self.db_path = Path(host.queue_db)
        self.jobs_dir = Path(host.root) / "jobs"
        self.poll_s = poll_s
        self.progress = ProgressTracker(host.logs_dir)
        self._lock = threading.RLock()
        self._wakeup = threading.Condition()
        self._paused = False
        self._closing = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._current: Optional[tuple[int, Any]] = None      # (job id, StopRequest)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    # -- storage ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.db_path), timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction (a write lock from the start, so checks and writes cannot interleave)."""
        with self._lock:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                db.close()

    def _get(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobNotFound(f"job #{job_id} does not exist (it may have been deleted)")
        return _job(row)

    # -- reading ---------------------------------------------------------------------------
    def list(self) -> list[Job]:
        """Running first, then pending in queue order, then finished jobs newest first."""
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT * FROM jobs ORDER BY CASE state WHEN 'running' THEN 0 WHEN 'pending' THEN 1 ELSE 2 END, "
                "CASE WHEN state = 'pending' THEN position ELSE -id END").fetchall()
        finally:
            db.close()
        return [_job(r) for r in rows]

    def get(self, job_id: int) -> Job:
        db = self._connect()
        try:
            return self._get(db, job_id)
        finally:
            db.close()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def running_job_id(self) -> Optional[int]:
        current = self._current
        return current[0] if current else None

    # -- adding ----------------------------------------------------------------------------
    def add(self, settings: Union[Settings, Mapping[str, Any]], *, front: bool = False) -> Job:
        """Validate and append a job (``front``: run it next). Refuses bad settings, a name already queued
        or running, and an existing output file without ``save_overwrite`` -- before anything is stored."""
        from ..runner import check_output
        if not isinstance(settings, Settings):
            settings = Settings.from_dict(settings)
        settings.validate_for_run(check_files=True)
        check_output(settings, Path(self.host.lora_dir))
        with self._tx() as db:
            self._refuse_duplicate(db, settings.save_lora_name)
            edge = db.execute("SELECT MIN(position), MAX(position) FROM jobs WHERE state = 'pending'").fetchone()
            position = ((edge[0] or 0) - 1) if front else ((edge[1] or 0) + 1)
            advice = "; ".join(f"warning: {a}" for a in settings.advice())   # shown until the job ends
            cur = db.execute("INSERT INTO jobs (position, name, mode, state, settings, message, created) "
                             "VALUES (?, ?, ?, 'pending', '{}', ?, ?)",
                             (position, settings.save_lora_name, settings.mode, advice, time.time()))
            job_id = cur.lastrowid
            snapshot = self._copy_inputs(job_id, settings)
            db.execute("UPDATE jobs SET settings = ? WHERE id = ?", (json.dumps(snapshot), job_id))
            job = self._get(db, job_id)
        self._wake()
        return job

    def _refuse_duplicate(self, db: sqlite3.Connection, name: str, except_id: Optional[int] = None) -> None:
        row = db.execute("SELECT id, state FROM jobs WHERE state IN ('pending', 'running') AND name = ? "
                         "COLLATE NOCASE AND id != ?", (name, except_id or -1)).fetchone()
        if row is not None:
            raise DuplicateJob(f"save_lora_name: job #{row['id']} ({row['state']}) already writes {name!r}; "
                               "pick another name")

    def _copy_inputs(self, job_id: int, settings: Settings) -> dict:
        """The settings snapshot with the mode's image files copied into ``jobs/ID/`` (atomic: temp folder + rename)."""
        data = settings.to_dict("ours")
        used = {f.name for f in fields_for_mode(settings.mode)}
        todo = [(n, Path(data[n])) for n in IMAGE_FIELDS if n in used and data.get(n)]
        if not todo:
            return data
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.jobs_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        final = self.jobs_dir / str(job_id)
        try:
            tmp.mkdir()
            for name, src in todo:
                dst = tmp / f"{name}{src.suffix.lower()}"
                shutil.copyfile(src, dst)
                data[name] = str(final / dst.name)
            if final.exists():          # a folder left by a deleted job of a reset database
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not copy the job's images into {self.jobs_dir}: {e}") from None
        return data

    # -- changing ----------------------------------------------------------------------------
    def delete(self, job_id: int, *, keep_files: bool = False) -> Job:
        """Remove a job that is not running (and its copied inputs unless ``keep_files``)."""
        with self._tx() as db:
            job = self._get(db, job_id)
            if job.state == "running":
                raise UserError(f"job #{job.id} is running; stop it first")
            db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
        if not keep_files:
            shutil.rmtree(self.jobs_dir / str(job.id), ignore_errors=True)
        return job

    def move(self, job_id: int, by: int) -> list[Job]:
        """Move a pending job ``by`` places (negative = earlier) among the pending jobs."""
        with self._tx() as db:
            job = self._get(db, job_id)
            if job.state != "pending":
                raise UserError(f"job #{job.id} is {job.state}; only pending jobs can be reordered")
            rows = db.execute("SELECT id FROM jobs WHERE state = 'pending' ORDER BY position").fetchall()
            order = [r["id"] for r in rows]
            i = order.index(job.id)
            j = max(0, min(len(order) - 1, i + int(by)))
            order.insert(j, order.pop(i))
            for pos, jid in enumerate(order):
                db.execute("UPDATE jobs SET position = ? WHERE id = ?", (pos, jid))
        return self.list()

    def edit_back(self, job_id: int) -> Settings:
        """The job's settings for the form. A pending job leaves the queue (Add to Queue puts it back);
        its copied images stay where the settings point until the next start prunes them."""
        job = self.get(job_id)
        settings = Settings.from_dict(job.settings)
        if job.state == "pending":
            self.delete(job.id, keep_files=True)
        return settings

    def requeue(self, job_id: int, resume: bool = False) -> Job:
        """Put a finished (interrupted, failed, stopped, done) job back at the end of the queue.

        ``resume``: continue from the training state the job saved (``save_state``; written every
        ``save_every_n_steps`` and on stop) instead of starting over; an error if there is none.
        """
        from ..runner import check_output
        with self._tx() as db:
            job = self._get(db, job_id)
            if job.state in ACTIVE:
                raise UserError(f"job #{job.id} is already {job.state}")
            self._refuse_duplicate(db, job.name, except_id=job.id)
            settings = dict(job.settings, train_resume_state=str(self.saved_state(job)) if resume else "")
            check_output(Settings.from_dict(settings), Path(self.host.lora_dir))
            edge = db.execute("SELECT MAX(position) FROM jobs WHERE state = 'pending'").fetchone()
            db.execute("UPDATE jobs SET state = 'pending', position = ?, message = '', result = '{}', owner = NULL, "
                       "started = NULL, finished = NULL, settings = ? WHERE id = ?",
                       ((edge[0] or 0) + 1, json.dumps(settings), job.id))
            job = self._get(db, job.id)
        self._wake()
        return job

    def saved_state(self, job: Job) -> Path:
        """The newest training-state file this job's run wrote (the engine names it after the LoRA)."""
        name = Settings.from_dict(job.settings).save_lora_name
        folder = Path(self.host.logs_dir) / "states"
        since = (job.started or 0) - 1
        found = [folder / f"{name}{suffix}.state.pt" for suffix in ("", "-pass1", "-pass2")]
        found = [p for p in found if p.is_file() and p.stat().st_mtime >= since]
        if not found:
            raise UserError(f"job #{job.id} saved no training state to resume from (turn on save_state and "
                            "save_every_n_steps before the run); use Re-queue to start it over")
        return max(found, key=lambda p: p.stat().st_mtime)

    # -- control ----------------------------------------------------------------------------
    def stop(self, save: bool = False) -> Optional[int]:
        """Stop the running job (``save``: write the LoRA first); the queue goes on. Returns its id or None."""
        current = self._current
        if current is None:
            return None
        current[1].request("save" if save else "stop")
        return current[0]

    def stop_all(self, save: bool = False) -> Optional[int]:
        """Stop the running job and pause the queue (pending jobs stay pending)."""
        self.pause()
        return self.stop(save)

    def pause(self) -> None:
        """No new job starts until :meth:`resume`; a running job finishes."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    # -- the worker ------------------------------------------------------------------------
    def start(self) -> "JobQueue":
        """Recover from a previous process, then run the worker thread (idempotent)."""
        if self._thread is not None:
            return self
        with self._tx() as db:
            for row in db.execute("SELECT id, owner FROM jobs WHERE state = 'running'").fetchall():
                if not _pid_alive(row["owner"]):
                    db.execute("UPDATE jobs SET state = 'interrupted', finished = ?, message = ? WHERE id = ?",
                               (time.time(), "interrupted: the server stopped while this job ran; re-queue it to "
                                "run it again", row["id"]))
            pending = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending'").fetchone()[0]
            kept = {str(r["id"]) for r in db.execute("SELECT id FROM jobs").fetchall()}
        self._prune(kept)
        if pending:
            self._paused = True
            # warning, not info: the WebUI's console (and ours) shows only warnings unless told otherwise,
            # and a user who does not see this thinks the queued jobs are lost.
            log.warning("Shinkansen: %d job(s) from the previous session are waiting; press Run queue to start them",
                        pending)
        self._thread = threading.Thread(target=self._loop, name="shinkansen-queue", daemon=True)
        self._thread.start()
        return self

    def _prune(self, kept: set) -> None:
        """Copied inputs of jobs no longer in the database (deleted, edited back) and half-made folders."""
        if not self.jobs_dir.is_dir():
            return
        for d in self.jobs_dir.iterdir():
            if d.is_dir() and d.name not in kept:
                shutil.rmtree(d, ignore_errors=True)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker: a running job is stopped (it ends as ``stopped``); pending jobs stay."""
        self._closing.set()
        self.stop()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def shutdown(self) -> None:
        """The server is going away: a running job is marked interrupted (re-queueable) and asked to stop."""
        current = self._current
        if current is not None:
            self._finish(current[0], "interrupted", "interrupted: the server was shut down while this job ran; "
                         "re-queue it to run it again", {})
        self._closing.set()
        self.stop()
        self._wake()

    def _loop(self) -> None:
        while not self._closing.is_set():
            job = None if self._paused else self._claim_next()
            if job is None:
                with self._wakeup:
                    self._wakeup.wait(self.poll_s)
                continue
            try:
                self._run(job)
            except Exception:   # never let one job kill the worker
                log.exception("queue worker: job #%s", job.id)

    def _claim_next(self) -> Optional[Job]:
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'pending' ORDER BY position LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', owner = ?, started = ? WHERE id = ? AND state = 'pending'",
                       (os.getpid(), time.time(), row["id"]))
            return self._get(db, row["id"])

    def _finish(self, job_id: int, state: str, message: str, result: dict) -> None:
        """Record the outcome, unless the job is no longer ours (shutdown already marked it)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, message = ?, result = ?, finished = ? "
                       "WHERE id = ? AND state = 'running' AND owner = ?",
                       (state, message, json.dumps(result), time.time(), job_id, os.getpid()))

    def _run(self, job: Job) -> None:
        from ..engine import StopRequest, Stopped
        from ..runner import run_job
        stop = StopRequest()
        self._current = (job.id, stop)
        self.progress.begin(job)
        host = self.host
        state, message, result = "failed", "", {}
        bus = EventBus([ConsoleProgress(), self.progress])
        try:
            settings = Settings.from_dict(job.settings)
            if settings.processes > 1:   # N local processes through torchrun, reporting back (trainer/launch.py)
                from ..launch import run_processes
                res = run_processes(settings, settings.processes, lora_dir=Path(host.lora_dir),
                                    log_dir=Path(host.logs_dir), json_dir=Path(host.json_dir),
                                    work=Path(host.logs_dir) / "processes" / f"job{job.id}", events=bus, stop=stop)
            else:
                with host.job_context(settings):
                    got = host.bundle_for(settings, log=lambda m: bus.emit(RunEvent("message", m)))
                    bundle, info = got if got is not None else (None, None)
                    encoder = host.prompt_encoder(bundle) if bundle is not None else None
                    res = run_job(settings, lora_dir=Path(host.lora_dir), bundle=bundle, model_info=info,
                                  events=bus, stop=stop, log_dir=host.logs_dir, json_dir=host.json_dir,
                                  prompt_encoder=encoder)
            state = res.status
            names = ", ".join(Path(p).name for p in res.saved) or "no file"
            message = f"{state} in {res.seconds:.0f}s: {names}"
            result = {"saved": [str(p) for p in res.saved], "csv": str(res.csv) if res.csv else None,
                      "json": str(res.json) if res.json else None, "seconds": round(res.seconds, 2)}
            if res.saved:
                host.after_job(res)
        except Stopped:
            state, message = "stopped", "stopped before training began"
        except UserError as e:
            message = _one_line(e)
        except Exception as e:   # a bug: full traceback in the log, one line for the user
            log.exception("job #%s failed", job.id)
            message = f"internal error: {type(e).__name__}: {_one_line(e)}"
        finally:
            self._current = None
        snap = self.progress.snapshot()
        if snap.csv and not result.get("csv"):
            result["csv"] = snap.csv
        self._finish(job.id, state, message, result)
        self.progress.end(state, message)
        print(f"[shinkansen] job #{job.id} {job.name}: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- one queue per database
_QUEUES: dict[str, JobQueue] = {}
_QUEUES_LOCK = threading.Lock()


def queue_for(host, *, start: bool = True) -> JobQueue:
    """The process-wide queue of ``host.queue_db`` (the tab, the API and the WebUI share it)."""
    key = str(Path(host.queue_db).resolve())
    with _QUEUES_LOCK:
        q = _QUEUES.get(key)
        if q is None:
            q = _QUEUES[key] = JobQueue(host)
        if start:
            q.start()
        return q
