"""Run one job end to end: validate → check inputs → load the model → run the mode → write logs.

Everything a user can get wrong is checked before the model is loaded, so a typo costs
seconds, not a model load; the queue, the CLI and the API all call :func:`run_job`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .dist import Dist, check_mode
from .engine import (ROOT, Run, RunPaths, StopRequest, Stopped, TrainingError, read_training_state,
                     resolve_precision)
from .errors import UserError
from .events import ConsoleProgress, EventBus, RunEvent
from .modes import mode_module
from .settings import Settings

log = logging.getLogger(__name__)
DEFAULT_LORA_DIR = ROOT / "output"


@dataclass
class JobResult:
    status: str                       # "done" | "stopped"
    saved: list = field(default_factory=list)
    csv: Optional[Path] = None
    json: Optional[Path] = None
    seconds: float = 0.0


def _file_sha256(path: Path, limit: int = 512 * 2**20) -> str:
    """SHA-256 of a model file (as A1111 shows it), skipped for very large files to keep start-up fast."""
    if not path.is_file() or path.stat().st_size > limit:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_output(settings: Settings, lora_dir: Path) -> None:
    target = lora_dir / f"{settings.save_lora_name}.safetensors"
    if target.exists() and not settings.save_overwrite:
        raise UserError(f"save_lora_name: {target} already exists; pick another name or enable save_overwrite")
    if lora_dir.exists() and not lora_dir.is_dir():
        raise UserError(f"lora_dir: {lora_dir} is not a folder")


def load_bundle(settings: Settings, device=None, log_fn: Optional[Callable[[str], None]] = None):
    from .models.loader import DEFAULT_MODEL, load_model, resolve_device
    device = resolve_device(device)
    dtype = resolve_precision(settings.train_model_precision, device)
    path = Path(settings.model_checkpoint) if settings.model_checkpoint else DEFAULT_MODEL
    if not settings.model_checkpoint and not path.is_file():
        from .models.loader import random_tiny_bundle
        if log_fn:
            log_fn("note: the embedded tiny model is not built yet; using a RANDOM-INITIALISED tiny SD1 model")
        return random_tiny_bundle(device=device), {"name": "random-tiny"}
    if not path.is_file():
        raise UserError(f"model_checkpoint: {path} does not exist")
    vae = settings.model_vae if settings.model_vae and settings.model_vae.lower() != "none" else None
    bundle = load_model(path, vae=vae, prediction_type="v_prediction" if settings.model_v_pred else None,
                        device=device, dtype=dtype, log=log_fn)
    vae_dtype = resolve_precision(settings.train_VAE_precision, device)
    bundle.vae.to(dtype=vae_dtype)
    info = {"name": path.stem, "sha256": _file_sha256(path), "vae": Path(vae).name if vae else ""}
    info["hash"] = info["sha256"][:10]
    return bundle, info


def write_run_json(settings: Settings, run: Run, json_dir: Path) -> Path:
    from .settings import write_json_atomic
    day = run.started.strftime("%Y%m%d")
    path = json_dir / day / f"{settings.save_lora_name}-{run.stamp}.json"
    data = settings.to_dict("ours")
    data["_run"] = {"seed": run.seed, "model": run.model_info, "started": run.started.isoformat(),
                    "saved": [str(p) for p in run.saved], "csv": str(run.csv_path) if run.csv_path else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return path


def run_job(settings: Settings, *, lora_dir: Optional[Path] = None, bundle=None, model_info: Optional[dict] = None,
            events: Optional[EventBus] = None, stop: Optional[StopRequest] = None,
            log_dir: Optional[Path] = None, json_dir: Optional[Path] = None, device=None,
            prompt_encoder: Optional[Callable[..., dict]] = None) -> JobResult:
    """Run ``settings`` to the end (or a stop); ``bundle`` given = train on it instead of loading a file.

    ``prompt_encoder`` replaces ``bundle.encode_prompts`` (the WebUI passes its prompt parser).
    """
    t0 = time.time()
    lora_dir = Path(lora_dir or DEFAULT_LORA_DIR)
    events = events or EventBus([ConsoleProgress()])
    settings.validate_for_run(check_files=True)
    check_mode(settings.mode)
    check_output(settings, lora_dir)
    for advice in settings.advice():
        log.warning(advice)
        events.emit(RunEvent("message", f"warning: {advice}"))
    if bundle is None:                          # a device this machine lacks: one line, before any work
        from .models.loader import resolve_device
        device = resolve_device(device)
    mode = mode_module(settings.mode)
    prepared = mode.prepare(settings)           # model-free input checks (folders, images, pairs)
    resume_state = read_training_state(settings.train_resume_state) if settings.train_resume_state else None
    dist = Dist.from_env(device if bundle is None else bundle.device)   # torchrun's group; alone: no-op
    try:
        return _run(settings, mode, prepared, resume_state, dist, lora_dir, bundle, model_info, events, stop,
                    log_dir, json_dir, device, prompt_encoder, t0)
    finally:
        dist.close()


def _run(settings, mode, prepared, resume_state, dist, lora_dir, bundle, model_info, events, stop, log_dir,
         json_dir, device, prompt_encoder, t0) -> JobResult:
    saved_world = int((resume_state or {}).get("world_size") or 1)
    if resume_state is not None and saved_world != dist.world_size:
        raise UserError(f"train_resume_state: {settings.train_resume_state} was saved by {saved_world} "
                        f"process(es); resume it with {saved_world} (processes / torchrun --nproc_per_node)")
    if not dist.is_main:   # rank 0 alone reports (console, UI, CSV)
        events = EventBus()
    if bundle is None:
        device = dist.device(device)
        bundle, model_info = load_bundle(settings, device, log_fn=lambda m: events.emit(RunEvent("message", m)))
    lora_dir.mkdir(parents=True, exist_ok=True)
    paths = RunPaths(lora_dir, Path(log_dir or ROOT / "logs"), Path(json_dir or ROOT / "json"))
    run = Run(settings, bundle, paths, events, stop, model_info, resume_state=resume_state)
    run.dist = dist
    if dist.active and settings.train_seed < 0 and resume_state is None:   # one random seed for every rank
        run.seed = int(dist.gather(run.seed)[0])
    if prompt_encoder is not None:
        run.prompt_encoder = prompt_encoder
    status = "done"
    try:
        mode.run(run, prepared)
    except Stopped:
        status = "stopped"
    finally:
        if run.csv is not None:
            run.csv.close()
        if run.tensorboard is not None:
            run.tensorboard.close()
    json_path = None
    if settings.save_as_json and dist.is_main:
        try:
            json_path = write_run_json(settings, run, paths.json_dir)
        except OSError as e:   # the LoRA is written; the run's settings are in its metadata too
            events.emit(RunEvent("message", f"run JSON not written: {paths.json_dir}: {e.strerror or e}"))
    events.emit(RunEvent(status, f"{status}: {len(run.saved)} file(s) written in {time.time() - t0:.0f}s"))
    return JobResult(status, list(run.saved), run.csv_path, json_path, time.time() - t0)
