"""The shared training loop every mode runs on.

A mode (``trainer/modes/*.py``) prepares its data and networks and hands the engine a
``loss(step) -> tensor`` closure; the engine owns everything around it: precision, the
optimizer and LR schedule, gradient accumulation and clipping, exactly
``train_iterations`` optimizer steps, the NaN guard, Stop / Stop & Save, periodic saves,
the resumable training state, and the events (console, CSV, UI) — once, for every mode.
"""
from __future__ import annotations

import datetime as _dt
import errno
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .atomic import atomic_path
from .dist import Dist
from . import __version__
from .ema import ema_metadata, make_ema
from .loss_terms import loss_metadata
from .errors import UserError
from .events import CsvLogger, EventBus, RunEvent, StepEvent, peak_memory_mb
from .optim import build_optimizer, build_scheduler, is_schedule_free
from .speed import optimizer_extra
from .settings import Settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(UserError):
    """The run could not finish (NaN loss, disk full …); the message says what was saved."""


class StopRequest:
    """Set from another thread (UI, API, Ctrl-C): ``"stop"`` discards, ``"save"`` saves then stops."""

    def __init__(self):
        self._mode: Optional[str] = None
        self._lock = threading.Lock()

    def request(self, mode: str = "stop") -> None:
        if mode not in ("stop", "save"):
            raise ValueError(mode)
        with self._lock:
            self._mode = mode if self._mode != "stop" else "stop"

    @property
    def mode(self) -> Optional[str]:
        return self._mode


class Stopped(Exception):
    """Raised inside a run when a Stop was requested (``saved`` lists what Stop & Save wrote)."""

    def __init__(self, saved: Optional[list] = None):
        super().__init__("stopped")
        self.saved = saved or []


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU (bf16/fp16 matmuls are emulated there), bf16 on GPUs that have it, else fp16."""
    if name in DTYPES:
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class RunPaths:
    lora_dir: Path
    log_dir: Path = ROOT / "logs"
    json_dir: Path = ROOT / "json"

    def lora(self, name: str, step: Optional[int] = None) -> Path:
        return self.lora_dir / (f"{name}_{step}steps.safetensors" if step else f"{name}.safetensors")


@dataclass
class PassResult:
    steps: int
    final_loss: float
    stopped: bool = False


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _free(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_failed(path: Path, size: int, error: OSError) -> str:
    """One line on why ``path`` (``size`` bytes) could not be written: for a full disk, the folder and the
    space it needs."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        free = _free(path.parent)
        now = f", {_size(free)} free now" if free is not None else ""
        return f"disk full: {path.parent} needs {_size(size)} free for {path.name}{now}"
    return f"could not write {path}: {error.strerror or error}"


def _first_line(e: BaseException) -> str:
    """The informative line of an exception (torch's load_state_dict puts a bare heading first)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines[0] if lines else type(e).__name__)[:200]


def read_training_state(path: str | os.PathLike) -> dict:
    """A state :meth:`Run._save_state` wrote, read before any model work.

    Read up front because the run must take its seed from it (a ``train_seed`` -1 run drew its seed at
    random, and the network, batch order and noise are all built from the seed before training starts),
    and so a missing or foreign file fails in seconds.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"train_resume_state: {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"train_resume_state: {path} is not a training state ({type(e).__name__})") from None
    if not isinstance(data, dict) or not {"seed", "step", "network", "optimizer"} <= data.keys():
        raise UserError(f"train_resume_state: {path} is not a training state (fields missing)")
    return data


class Run:
    """One job: settings, bundle, paths, events, stop flag, RNG; modes call :meth:`train` and :meth:`save`."""

    def __init__(self, settings: Settings, bundle, paths: RunPaths, events: Optional[EventBus] = None,
                 stop: Optional[StopRequest] = None, model_info: Optional[dict] = None,
                 resume_state: Optional[dict] = None):
        self.settings, self.bundle, self.paths = settings, bundle, paths
        self.events = events or EventBus()
        self.stop = stop or StopRequest()
        self.device = bundle.device
        self.model_info = model_info or {}
        if resume_state is None and settings.train_resume_state:
            resume_state = read_training_state(settings.train_resume_state)
        self.resume_state = resume_state
        self.seed = self._resolve_seed()
        self.started = _dt.datetime.now()
        self.stamp = self.started.strftime("%Y%m%d_%H%M%S")
        self.saved: list[Path] = []
        self.extra_metadata: dict = {}
        self.csv: Optional[CsvLogger] = None
        self.csv_path: Optional[Path] = None
        self.tensorboard = None                             # TensorBoardLogger when log_with is tensorboard
        self.generators: dict[str, torch.Generator] = {}   # saved with the training state
        self.done_phases: list[str] = []                    # passes trained to the end (saved with the state)
        self._ema = None                                    # the pass's WeightEMA while it trains (ema_decay)
        self.epoch_steps: Optional[int] = None              # optimizer steps per epoch, for modes that have epochs
        self._pass_t0 = time.perf_counter()
        # The one place prompts become conditioning; the WebUI adapter swaps in the WebUI's prompt parser.
        self.prompt_encoder: Callable[..., dict] = bundle.encode_prompts
        self.dist = Dist()                                  # the runner joins torchrun's group (trainer/dist.py)

    def _resolve_seed(self) -> int:
        """The resumed run's seed is the state's; otherwise ``train_seed``, or a random one for -1."""
        wanted = self.settings.train_seed
        if self.resume_state is not None:
            seed = int(self.resume_state["seed"])
            if 0 <= wanted != seed:
                self.message(f"train_seed {wanted} ignored: the resumed run continues with its seed {seed}")
            return seed
        return wanted if wanted >= 0 else int.from_bytes(os.urandom(4), "little") >> 1

    # ------------------------------------------------------------------ helpers for modes
    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def precision(self, which: str, settings: Optional[Settings] = None) -> torch.dtype:
        return resolve_precision(getattr(settings or self.settings, which), self.device)

    def encode_prompts(self, prompts, size=None) -> dict:
        return self.prompt_encoder(list(prompts), size=size, clip_skip=self.settings.clip_skip)

    def message(self, text: str) -> None:
        log.info(text)
        self.events.emit(RunEvent("message", text))

    def check_stop(self) -> None:
        if self.stop.mode == "stop":
            raise Stopped()

    def output_path(self, name: Optional[str] = None, step: Optional[int] = None) -> Path:
        return self.paths.lora(name or self.settings.save_lora_name, step)

    def open_csv(self, with_te_lr: bool, with_val: bool = False) -> None:
        """A new loss CSV for a new run; a resumed run continues the CSV its state names (one series)."""
        if not self.settings.logging_save_csv or self.csv is not None or not self.dist.is_main:
            return
        resumed = Path(self.resume_state["csv"]) if (self.resume_state or {}).get("csv") else None
        if resumed is not None and resumed.is_file():
            self.csv_path = resumed
            self.csv = CsvLogger(resumed, with_te_lr, keep_rows=int(self.resume_state.get("csv_rows") or 0),
                                 with_val=with_val)
            self.events.subscribe(self.csv)
            self.message(f"continuing the loss CSV {resumed}")
            return
        day = self.started.strftime("%Y%m%d")
        folder, stem = self.paths.log_dir / day, f"{self.settings.save_lora_name}-{self.stamp}"
        self.csv_path, n = folder / f"{stem}.csv", 1
        while self.csv_path.exists():   # two runs of one name in the same second (a quick stop and resume)
            n += 1
            self.csv_path = folder / f"{stem}-{n}.csv"
        self.csv = CsvLogger(self.csv_path, with_te_lr, with_val=with_val)
        self.events.subscribe(self.csv)

    def open_tensorboard(self, start_step: int = 0) -> None:
        """``log_with tensorboard``: event files in ``logs/DATE/NAME-TIME/tensorboard`` (the CSV's name without
        ``.csv``; a resumed run continues its folder, dropping what was logged after its state)."""
        if self.settings.log_with != "tensorboard" or self.tensorboard is not None or not self.dist.is_main:
            return
        from .tblog import TensorBoardLogger
        stem = self.csv_path.with_suffix("") if self.csv_path is not None else \
            self.paths.log_dir / self.started.strftime("%Y%m%d") / f"{self.settings.save_lora_name}-{self.stamp}"
        self.tensorboard = TensorBoardLogger(stem / "tensorboard", purge_step=start_step + 1 if start_step else None)
        self.events.subscribe(self.tensorboard)
        self.message(f"TensorBoard event files: {self.tensorboard.folder}")

    # ------------------------------------------------------------------ metadata and saving
    def metadata(self, settings: Settings, network, steps: int, extra: Optional[dict] = None) -> dict:
        info = {
            "ss_output_name": settings.save_lora_name,
            "ss_training_started_at": self.started.timestamp(),
            "ss_training_finished_at": time.time(),
            "ss_steps": steps,
            "ss_max_train_steps": settings.train_iterations,
            "ss_learning_rate": settings.train_learning_rate,
            "ss_text_encoder_lr": settings.train_textencoder_learning_rate or settings.train_learning_rate,
            "ss_unet_lr": settings.train_learning_rate,
            "ss_optimizer": settings.train_optimizer,
            "ss_lr_scheduler": settings.train_lr_scheduler,
            "ss_lr_warmup_steps": settings.train_lr_warmup_steps,
            "ss_seed": self.seed,
            "ss_min_snr_gamma": settings.train_snr_gamma,
            "ss_noise_offset": settings.noise_offset,
            "ss_multires_noise_iterations": settings.multires_noise_iterations,
            "ss_multires_noise_discount": settings.multires_noise_discount,
            "ss_batch_size_per_device": settings.train_batch_size,
            "ss_gradient_accumulation_steps": settings.gradient_accumulation_steps,
            # kohya's effective batch (per-device batch × processes × accumulation); ours for the world size
            "ss_total_batch_size": settings.train_batch_size * self.dist.world_size
            * max(1, settings.gradient_accumulation_steps),
            "shinkansen_world_size": self.dist.world_size,
            "ss_max_grad_norm": settings.gradient_clip_norm,
            "ss_mixed_precision": str(self.precision("train_model_precision", settings)).replace("torch.", ""),
            "ss_full_fp16": False,
            "ss_clip_skip": settings.clip_skip,
            "ss_sd_model_name": self.model_info.get("name", self.bundle.name),
            "ss_sd_model_hash": self.model_info.get("hash", ""),
            "ss_new_sd_model_hash": self.model_info.get("sha256", ""),
            "ss_vae_name": self.model_info.get("vae", ""),
            "modelspec.resolution": "{}x{}".format(*settings.image_size),
            "modelspec.prediction_type": "v" if self.bundle.prediction_type == "v_prediction" else "epsilon",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "shinkansen_version": __version__,
            "shinkansen_mode": settings.mode,
            "shinkansen_settings": json.dumps(settings.to_dict("ours"), default=str),
        }
        info.update(loss_metadata(settings))
        info.update(ema_metadata(settings))
        if self.epoch_steps:   # kohya's ss_epoch: the epoch this file was saved in (the last one at the end)
            info["ss_epoch"] = math.ceil(steps / self.epoch_steps) if steps > 0 else 0
        info.update(self.extra_metadata)
        info.update(extra or {})
        return info

    def save(self, network, settings: Optional[Settings] = None, *, steps: int, name: Optional[str] = None,
             step_suffix: Optional[int] = None, extra: Optional[dict] = None) -> Path:
        """Write ``network`` as a kohya LoRA (atomic) and announce it; schedule-free weights swapped in first.

        A failed write (full disk) ends the run with one line that says where the weights were kept instead.
        """
        from .networks import lora_file_bytes, write_file_atomic
        settings = settings or self.settings
        path = self.output_path(name, step_suffix)
        if not self.dist.is_main:   # rank 0 alone writes
            return path
        dtype = resolve_precision(settings.save_precision, self.device) if settings.save_precision != "model" \
            else self.bundle.dtype
        data = lora_file_bytes(network, self.metadata(settings, network, steps, extra), dtype=dtype,
                               strength=settings.network_strength)
        try:
            out = write_file_atomic(path, data)
        except OSError as e:
            raise TrainingError(f"{write_failed(path, len(data), e)}; {self._keep_elsewhere(path, data)}") from None
        self.saved.append(out)
        self.events.emit(RunEvent("saved", f"saved: {out}", path=str(out)))
        return out

    def _keep_elsewhere(self, path: Path, data: bytes) -> str:
        """Put a LoRA that could not be written to ``path`` in the states folder, else the system's temporary
        folder (often another disk), so a full disk loses no training; says where."""
        from .networks import write_file_atomic
        for folder in (self.paths.log_dir / "states", Path(tempfile.gettempdir())):
            if folder.resolve() == path.parent.resolve():
                continue
            try:
                kept = write_file_atomic(folder / path.name, data)
            except OSError:
                continue
            return f"the trained weights are kept in {kept}"
        return "the trained weights could not be kept anywhere either"

    # ------------------------------------------------------------------ the loop
    def train(self, loss_fn: Callable[[int], torch.Tensor], network, settings: Optional[Settings] = None, *,
              phase: str = "", state: Any = None, on_save: Optional[Callable[[int], None]] = None,
              validate: Optional[Callable[[], float]] = None) -> PassResult:
        """Run ``train_iterations`` optimizer steps of ``loss_fn`` on ``network``'s parameters.

        ``state`` is an object with ``state_dict``/``load_state_dict`` (e.g. the batch sampler) that joins
        the resumable training state. ``on_save(step)`` is called for periodic saves (default: save the LoRA).
        ``validate()`` returns the validation loss; it runs every ``validate_every_n_steps`` and after the last
        step, and its value joins that step's event (CSV, UI, TensorBoard).
        """
        s = settings or self.settings
        te_lr = s.train_textencoder_learning_rate
        groups = network.trainable_parameters(unet_lr=s.train_learning_rate, te_lr=te_lr or s.train_learning_rate)
        if not groups:
            raise UserError("network_blocks: the network has no trainable parameters")
        optimizer = build_optimizer(s.train_optimizer, groups, s.train_learning_rate, optimizer_extra(
            s.train_optimizer, dict(s.train_optimizer_settings), self.device, s.train_fused_optimizer))
        scheduler = build_scheduler(optimizer, s.train_lr_scheduler, s.train_iterations, s.train_lr_warmup_steps,
                                    s.train_lr_scheduler_num_cycles, s.train_lr_scheduler_power,
                                    s.train_lr_step_rules, dict(s.train_lr_scheduler_settings))
        params = [p for g in groups for p in g["params"]]
        ema = self._ema = make_ema(s, params)
        has_te = any(g.get("name") == "text_encoder" for g in groups)
        self.open_csv(with_te_lr=has_te, with_val=validate is not None)
        model_dtype = self.precision("train_model_precision", s)
        autocast = (torch.autocast(self.device.type, dtype=model_dtype)
                    if self.device.type == "cuda" and model_dtype != torch.float32 else None)
        scaler = torch.amp.GradScaler("cuda") if autocast is not None and model_dtype == torch.float16 else None

        start_step, loss_ema, elapsed = 0, None, 0.0
        dist = self.dist
        dist.seed_rank(self.seed)
        resume_path = Path(s.train_resume_state) if s.train_resume_state else None
        if resume_path is not None:
            start_step, loss_ema, elapsed = self._load_state(resume_path, network, optimizer, scheduler, state,
                                                             phase)
        self.open_tensorboard(start_step)
        if is_schedule_free(optimizer):
            optimizer.train()
        if self.csv is not None:   # a pass the resumed state had finished re-runs; its rows are in the CSV
            self.csv.muted = phase in (self.resume_state or {}).get("done_phases", ())

        total, accum = s.train_iterations, max(1, s.gradient_accumulation_steps)
        t0, step_times = time.perf_counter() - elapsed, []
        self._pass_t0 = t0
        last = time.perf_counter()
        step = start_step
        self.events.emit(RunEvent("start", f"training {phase or s.mode}: {total} steps", data={"phase": phase}))
        while step < total:
            stop_mode = dist.agree_stop(self.stop.mode)   # every rank stops at the same step
            if stop_mode is not None:
                if stop_mode != self.stop.mode:
                    self.stop.request(stop_mode)
                return self._stop(network, s, step, optimizer, scheduler, state, phase, loss_ema)
            loss_value, code, bad, error = 0.0, 0, None, None
            for micro in range(accum):
                try:
                    if autocast is not None:
                        with autocast:
                            loss = loss_fn(step)
                    else:
                        loss = loss_fn(step)
                    weight = dist.take_weight()         # this rank's share of the global batch (1 alone)
                    if dist.active and micro == 0:
                        loss = self._inject_fault(step + 1, loss)
                    if not torch.isfinite(loss.detach()):
                        if not dist.active:
                            self._nan(network, s, step, optimizer, loss)
                        code, bad = 1, loss
                        break
                    if dist.active:
                        loss_value += float(loss.detach()) * weight / dist.world_size / accum
                        scaled = loss * (weight / accum)
                    else:
                        loss_value += float(loss.detach()) / accum
                        scaled = loss / accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                except Exception as e:
                    if not dist.active:
                        raise
                    log.exception("rank %d failed at step %d", dist.rank, step + 1)
                    code, error = 2, e
                    break
            if dist.active:
                codes, loss_value = dist.agree_step(code, loss_value)
                if any(codes):
                    self._rank_failed(codes, bad, error, network, s, step, optimizer)
                dist.all_reduce_grads(params)
            if scaler:
                scaler.unscale_(optimizer)
            if s.gradient_clip_norm and s.gradient_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, s.gradient_clip_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            step += 1
            loss_ema = loss_value if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_value
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            window = step_times[-20:]
            rate = len(window) / max(1e-9, sum(window))
            lrs = [g["lr"] for g in optimizer.param_groups]
            names = [g.get("name") for g in optimizer.param_groups]
            lr_te = lrs[names.index("text_encoder")] if "text_encoder" in names else None
            lr_unet = lrs[names.index("unet")] if "unet" in names else lrs[0]
            val_loss = None
            if validate is not None and dist.is_main and (step == total or (s.validate_every_n_steps
                                                            and step % s.validate_every_n_steps == 0)):
                val_loss = self._validate(validate, optimizer, step, phase, autocast)
            self.events.emit(StepEvent(step, total, loss_value, loss_ema, lr_unet, lr_te, rate,
                                       (total - step) / max(rate, 1e-9), now - t0,
                                       peak_memory_mb(self.device), phase, val_loss=val_loss))
            if s.sample_every_n_steps and step % s.sample_every_n_steps == 0:
                self._swap_eval(optimizer, lambda: self.sample(network, step, phase))
            if s.save_every_n_steps and step % s.save_every_n_steps == 0 and step < total:
                self._swap_eval(optimizer, lambda: (on_save or (lambda k: self.save(network, s, steps=k,
                                                                                     step_suffix=k)))(step))
                if s.save_state:
                    self._save_state(network, s, step, optimizer, scheduler, state, phase, loss_ema)
            if self.epoch_steps and step % self.epoch_steps == 0:
                self._epoch_end(network, s, step // self.epoch_steps, step, total, optimizer, scheduler, state,
                                phase, loss_ema)
        if is_schedule_free(optimizer):
            optimizer.eval()   # the averaged weights are the ones to keep
        self.done_phases.append(phase)
        if self.csv is not None:
            self.csv.muted = False
        if s.save_state:
            self._save_state(network, s, step, optimizer, scheduler, state, phase, loss_ema)
        if ema is not None:   # the average is the pass's product: the mode saves it, a later pass uses it
            ema.copy_to()
            self._ema = None
        return PassResult(step, loss_ema if loss_ema is not None else float("nan"))

    def _epoch_end(self, network, s, epoch: int, step: int, total: int, optimizer, scheduler, state, phase,
                   loss_ema) -> None:
        """``sample_every_n_epochs`` / ``save_every_n_epochs`` at the end of epoch ``epoch`` (1-based); the last
        epoch's file is the run's final save, named like kohya's ``NAME-EEEEEE.safetensors`` otherwise."""
        n_sample, n_save = getattr(s, "sample_every_n_epochs", 0), getattr(s, "save_every_n_epochs", 0)
        if n_sample and epoch % n_sample == 0:
            self._swap_eval(optimizer, lambda: self.sample(network, step, phase))
        if n_save and epoch % n_save == 0 and step < total:
            self._swap_eval(optimizer, lambda: self.save(network, s, steps=step,
                                                         name=f"{s.save_lora_name}-{epoch:06d}"))
            if s.save_state:
                self._save_state(network, s, step, optimizer, scheduler, state, phase, loss_ema)

    def sample(self, network, step: int, phase: str = "") -> list[Path]:
        """Preview images of ``sample_prompts`` with the network at weight 1 (fixed seeds: comparable over steps)."""
        from .generate import generate
        prompts = [p for p in self.settings.sample_prompts if p.strip()]
        if not prompts or not self.dist.is_main:
            return []
        folder = self.paths.log_dir / "samples" / f"{self.settings.save_lora_name}-{self.stamp}"
        folder.mkdir(parents=True, exist_ok=True)
        modules = [self.bundle.unet, *self.bundle.text_encoders]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with network.at(1.0):
                images = generate(self.bundle, prompts, [self.seed] * len(prompts), steps=20, cfg=5.0,
                                  size=tuple(self.settings.image_size))
        finally:
            for m, was in zip(modules, modes):
                m.train(was)
        paths = []
        tag = f"{phase.replace(' ', '')}_" if phase else ""
        for i, image in enumerate(images):
            path = folder / f"{tag}step{step:06d}_{i}.png"
            image.save(path)
            paths.append(path)
            self.events.emit(RunEvent("sample", prompts[i], path=str(path), data={"step": step}))
        return paths

    def _swap_eval(self, optimizer, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a save or a sample) on the weights that are the product: schedule-free's averaged
        ones, and the EMA when ``ema_decay`` is on."""
        if self._ema is not None:
            fn = self._ema.wrap(fn)
        if is_schedule_free(optimizer):
            optimizer.eval()
            try:
                return fn()
            finally:
                optimizer.train()
        else:
            return fn()

    def _validate(self, validate: Callable[[], float], optimizer, step: int, phase: str, autocast=None) -> float:
        """The validation loss at ``step`` (schedule-free: of the averaged weights, the ones that get saved),
        under the training's autocast."""
        def measure() -> float:
            if autocast is None:
                return float(validate())
            with autocast:
                return float(validate())
        value = self._swap_eval(optimizer, measure)
        where = f"{phase} " if phase else ""
        self.events.emit(RunEvent("validation", f"{where}step {step}: validation loss {value:.4f}",
                                  data={"step": step, "val_loss": value, "phase": phase}))
        return value

    def _stop(self, network, s, step, optimizer, scheduler, state, phase, loss_ema) -> PassResult:
        if self.stop.mode == "save":
            self._swap_eval(optimizer, lambda: self.save(network, s, steps=step))
            if s.save_state:
                self._save_state(network, s, step, optimizer, scheduler, state, phase, loss_ema)
            raise Stopped(saved=list(self.saved))
        if s.save_state:
            self._save_state(network, s, step, optimizer, scheduler, state, phase, loss_ema)
        raise Stopped()

    def _inject_fault(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Test-only faults on one rank (``SHINKANSEN_TEST_FAULT``, see trainer/dist.py)."""
        fault = self.dist.fault(step)
        if fault == "nan":
            return loss * float("nan")
        if fault == "error":
            raise RuntimeError(f"injected test fault on rank {self.dist.rank}")
        if fault == "exit":
            os._exit(17)
        return loss

    def _rank_failed(self, codes: list, bad, error, network, s, step, optimizer) -> None:
        """A NaN loss or an exception on some rank: every rank ends here, with the same one-line message."""
        mine = f"{type(error).__name__}: {_first_line(error)}" if error is not None else \
            (str(float(bad.detach())) if bad is not None else None)
        messages = self.dist.gather(mine)
        if 2 in codes:
            optimizer.zero_grad(set_to_none=True)
            r = codes.index(2)
            raise TrainingError(f"rank {r} of {len(codes)} failed at step {step + 1}: {messages[r]}")
        r = codes.index(1)
        loss = torch.tensor(float(messages[r]))
        self._nan(network, s, step, optimizer, loss, where=f" on rank {r} of {len(codes)}")

    def _nan(self, network, s, step, optimizer, loss, where: str = "") -> None:
        """The weights are still those of the last good step: save them, then stop with a clear message."""
        optimizer.zero_grad(set_to_none=True)
        path = self.output_path(f"{s.save_lora_name}_nan_at_{step}")
        saved = ""
        if step > 0:
            self._swap_eval(optimizer, lambda: self.save(network, s, steps=step, name=path.stem))
            saved = f"; the last good weights (step {step}) are in {path}"
        raise TrainingError(f"loss became {float(loss.detach())} at step {step + 1}{where}{saved}. "
                            "Lower train_learning_rate or use fp32 (train_model_precision)")

    # ------------------------------------------------------------------ resumable state
    def state_path(self, phase: str = "") -> Path:
        suffix = f"-{phase.replace(' ', '')}" if phase else ""
        return self.paths.log_dir / "states" / f"{self.settings.save_lora_name}{suffix}.state.pt"

    def _save_state(self, network, s, step, optimizer, scheduler, state, phase, loss_ema) -> Path:
        rng_ranks = self.dist.gather(self._rng_states()) if self.dist.active else None   # every rank joins
        if not self.dist.is_main:
            return self.state_path(phase)
        data = {"version": 1, "phase": phase, "step": step, "loss_ema": loss_ema, "seed": self.seed,
                "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": self._rng_states(),
                "extra": state.state_dict() if state is not None else None,
                "ema": self._ema.state_dict() if self._ema is not None else None,
                "settings": json.dumps(s.to_dict("ours"), default=str),
                # the loss CSV goes on where this state was saved: one run, one series in the plot
                "csv": str(self.csv_path) if self.csv is not None else None,
                "csv_rows": self.csv.rows if self.csv is not None else None,
                "done_phases": list(self.done_phases), "elapsed_s": time.perf_counter() - self._pass_t0}
        if rng_ranks is not None:   # the ranks' own generators; the rest is the same on every rank
            data.update(world_size=self.dist.world_size, rng_ranks=rng_ranks)
        from .networks import write_file_atomic
        path, buffer = self.state_path(phase), io.BytesIO()
        torch.save(data, buffer)
        try:
            write_file_atomic(path, buffer.getvalue())
        except OSError as e:   # the state is a convenience: training goes on, and the LoRA save says the rest
            self.message(f"training state not saved: {write_failed(path, buffer.tell(), e)}")
            return path
        self.events.emit(RunEvent("message", f"training state saved: {path}", path=str(path)))
        return path

    def _load_state(self, path: Path, network, optimizer, scheduler, state,
                    phase) -> tuple[int, Optional[float], float]:
        """Restore a pass from the state: (steps done, loss EMA, seconds trained) -- (0, None, 0) for another pass."""
        data = self.resume_state if self.resume_state is not None else read_training_state(path)
        if data.get("phase", "") != phase:
            # e.g. a Difference state saved in pass 2: pass 1 reruns from its seed (deterministic), pass 2 resumes
            self.message(f"train_resume_state is for {data.get('phase') or 'the run'}; {phase or 'this pass'} "
                         "runs from the start")
            return 0, None, 0.0
        try:
            network.load_state_dict(data["network"])
            optimizer.load_state_dict(data["optimizer"])
            scheduler.load_state_dict(data["scheduler"])
            if state is not None and data.get("extra") is not None:
                state.load_state_dict(data["extra"])
            if self._ema is not None:
                self._ema.load_state_dict(data.get("ema"))
            elif data.get("ema") is not None:
                raise KeyError("the state holds an EMA of the weights; set ema_decay as when it was saved")
        except (RuntimeError, ValueError, KeyError) as e:   # another rank, dataset, batch size, optimizer …
            raise UserError(f"train_resume_state: {path} was saved by a run with other settings "
                            f"({_first_line(e)}); resume with that run's settings") from None
        self._set_rng_states(data["rng_ranks"][self.dist.rank] if data.get("rng_ranks") else data["rng"])
        self.message(f"resumed from {path} at step {data['step']}")
        return int(data["step"]), data.get("loss_ema"), float(data.get("elapsed_s") or 0.0)

    def _rng_states(self) -> dict:
        out = {"torch": torch.get_rng_state()}   # modes draw only from registered generators
        for name, gen in self.generators.items():
            out[f"gen:{name}"] = gen.get_state()
        return out

    def _set_rng_states(self, states: dict) -> None:
        torch.set_rng_state(states["torch"])
        for name, gen in self.generators.items():
            key = f"gen:{name}"
            if key in states:
                gen.set_state(states[key])

    def register_generator(self, name: str, generator: torch.Generator) -> torch.Generator:
        """A mode's generator whose state must join the resumable training state."""
        self.generators[name] = generator
        return generator
