"""Optimizer and learning-rate scheduler registry.

Optimizers from other packages are imported only when chosen, so a missing package is a
clear one-line error naming what to install, not an import failure at start-up; the settings
check finds it (:func:`missing_optimizer_package`) before any model work. The LR schedules are
plain functions of the step (``LambdaLR``), so they need no extra package and resume exactly
from a saved step. torch is imported only where it is used, so the settings check stays light.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Any, Callable, Iterable, Sequence

from .errors import UserError

# name (lower case) → (module, attribute, pip package, default kwargs)
_OPTIMIZERS: dict[str, tuple[str, str, str, dict]] = {
    "adamw": ("torch.optim", "AdamW", "torch", {"weight_decay": 0.01}),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", {"weight_decay": 0.01}),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch", {}),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt", {}),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers",
                  {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
    "dadaptadam": ("dadaptation", "DAdaptAdam", "dadaptation", {}),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree", {}),
    "came": ("came_pytorch", "CAME", "came-pytorch", {"weight_decay": 0.01}),
    "sgd": ("torch.optim", "SGD", "torch", {}),
}
OPTIMIZER_NAMES = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "DAdaptAdam", "AdamWScheduleFree",
                   "CAME", "SGD")
SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                   "piecewise_constant", "cosine_annealing")


def _key(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _needs_package(name: str, package: str) -> str:
    return f"{name} needs the package '{package}', which is not installed: pip install {package}"


def optimizer_package(name: str) -> str:
    """The pip package an optimizer comes from (what install.py must install for a preset using it)."""
    key = _key(name)
    if key not in _OPTIMIZERS:
        raise UserError(f"train_optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    return _OPTIMIZERS[key][2]


def missing_optimizer_package(name: str) -> str | None:
    """Why optimizer ``name`` cannot run here (its package is not installed), else None.

    Only looks the package up (``find_spec`` of its top-level name imports nothing), so the settings
    check can tell before the model load and latent encoding that would otherwise come first.
    """
    entry = _OPTIMIZERS.get(_key(name))
    if entry is None:          # unknown names are the schema's error
        return None
    module, _, package, _ = entry
    return _needs_package(name, package) if importlib.util.find_spec(module.split(".")[0]) is None else None


def optimizer_class(name: str):
    package = optimizer_package(name)
    module, attr, _, _ = _OPTIMIZERS[_key(name)]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise UserError(f"train_optimizer: {_needs_package(name, package)}") from None
    except AttributeError:
        raise UserError(f"train_optimizer {name}: installed '{package}' has no {attr}; upgrade it") from None


def build_optimizer(name: str, param_groups: Sequence[dict], lr: float, extra: dict | None = None):
    """An optimizer over ``param_groups`` (each may carry its own ``lr``); ``extra`` = user ``key=value`` args."""
    cls = optimizer_class(name)
    kwargs = dict(_OPTIMIZERS[_key(name)][3])
    kwargs.update(extra or {})
    if _key(name) == "came" and "betas" not in kwargs:
        kwargs["betas"] = (0.9, 0.999, 0.9999)
    try:
        return cls(list(param_groups), lr=lr, **kwargs)
    except TypeError as e:
        raise UserError(f"train_optimizer_settings: {name} rejected the arguments {sorted(kwargs)} ({e})") from None


def is_schedule_free(optimizer) -> bool:
    """Schedule-free optimizers hold averaged weights that must be swapped in (``eval()``) before saving."""
    return hasattr(optimizer, "eval") and hasattr(optimizer, "train") and "schedulefree" in type(optimizer).__module__


def parse_step_rules(rules: str) -> list[tuple[float, int | None]]:
    """``"1:100,0.5:200,0.1"`` → [(1, 100), (0.5, 200), (0.1, None)]: factor until step, last one forever."""
    out: list[tuple[float, int | None]] = []
    parts = [p.strip() for p in rules.replace(";", ",").split(",") if p.strip()]
    if not parts:
        raise UserError("train_lr_step_rules: piecewise_constant needs rules like '1:100,0.5:200,0.1'")
    for i, part in enumerate(parts):
        try:
            if ":" in part:
                factor, until = part.split(":")
                out.append((float(factor), int(until)))
            elif i == len(parts) - 1:
                out.append((float(part), None))
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"train_lr_step_rules: cannot read {part!r} (expected factor:step, last one factor)") from None
    steps = [s for _, s in out if s is not None]
    if steps != sorted(steps):
        raise UserError("train_lr_step_rules: steps must increase")
    return out


def lr_lambda(name: str, total_steps: int, warmup: int = 0, cycles: int = 1, power: float = 1.0,
              step_rules: str = "", min_factor: float = 0.0) -> Callable[[int], float]:
    """The multiplier of the base LR at optimizer step ``step`` (0-based) for a named schedule.

    ``cosine_annealing`` (TrainTrain's ADDifT presets) is cosine from 1 down to ``min_factor``
    (``eta_min / lr``) over all steps.
    """
    key = name.lower()
    if key not in SCHEDULER_NAMES:
        raise UserError(f"train_lr_scheduler: unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    total = max(1, total_steps)
    rules = parse_step_rules(step_rules) if key == "piecewise_constant" else []

    def warm(step: int) -> float | None:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return None

    def progress(step: int) -> float:
        return min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))

    def f(step: int) -> float:
        w = warm(step) if key != "constant" else None
        if w is not None:
            return w
        if key in ("constant", "constant_with_warmup"):
            return 1.0
        p = progress(step)
        if key == "linear":
            return 1.0 - p
        if key == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if key == "cosine_annealing":
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * p))
        if key == "cosine_with_restarts":
            if p >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((cycles * p) % 1.0)))
        if key == "polynomial":
            return (1.0 - p) ** power
        for factor, until in rules:   # piecewise_constant
            if until is None or step < until:
                return factor
        return rules[-1][0]

    return f


def build_scheduler(optimizer, name: str, total_steps: int, warmup: int = 0, cycles: int = 1, power: float = 1.0,
                    step_rules: str = "", settings: dict | None = None):
    """``settings`` = the user's scheduler ``key=value`` args (``eta_min`` for cosine_annealing)."""
    import torch
    settings = dict(settings or {})
    eta_min = float(settings.pop("eta_min", 0.0))
    if settings:
        raise UserError(f"train_lr_scheduler_settings: {name} takes no {', '.join(sorted(settings))}")
    lambdas = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"]) or 1.0
        lambdas.append(lr_lambda(name, total_steps, warmup, cycles, power, step_rules, min_factor=eta_min / base))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
