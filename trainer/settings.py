"""Every training parameter, once: the schema the UI, presets, CLI ``--set`` and HTTP API derive from.

Why a schema and not positional lists: TrainTrain passed 2×59 values positionally and sliced
them by index, so inserting one argument silently shifted every later value (its queue,
standalone CLI and REST API all broke that way). Here each parameter is one :class:`Field`
with a name, kind, default, choices, modes, help text and validation; a run is a
:class:`Settings` object addressed by name only.

Parsing is strict: a value that does not fit raises :class:`SettingsError` naming the field
and the fix (TrainTrain silently fell back to the default). Values may be given as TrainTrain
writes them (numbers as strings, ``""`` for "unset"), so its preset and run JSON files load
unchanged, including the keys ``image_size(height, width)``, ``network_blocks(BASE =
TextEncoder)``, ``train_fixed_timsteps_in_batch``, ``save_per_steps``, ``model``, ``vae``,
``original prompt``/``target prompt`` and the nested ``"2nd pass"`` dict.

TrainTrain keys that are read and dropped (:data:`IGNORED_KEYS`; a warning only when set):

* ``network_train_text_encoder`` -- shown in TrainTrain's iLECO UI but read nowhere; the text
  encoder is trained when ``BASE`` is in ``network_blocks``.
* ``te`` -- the Z-Image text-encoder file; Z-Image is not supported.
* ``negative prompt`` -- never used in training (TrainTrain's iLECO preview only).
* declared in TrainTrain but never used (never written by it either): ``logging_use_wandb``,
  ``logging_use_tensorboard``, ``logging_dir``, ``train_repeat``, ``train_use_bucket``,
  ``train_optimizer_args``, ``gen_noise_scheduler``, ``lora_train_targets``,
  ``diff_use_fixed_noise``, ``image_use_transparent_background_ajust``.
  (``gradient_accumulation_steps`` was one of them; here it is a real setting.)

Choices TrainTrain offered that are refused with a suggestion rather than mapped silently
(a silent substitution would change the training): the optimizers outside SPEC §7 (e.g.
``PagedAdamW8bit`` → use ``AdamW8bit``), the schedulers ``cosine_annealing_with_restarts``,
``exponential``, ``step``, ``multi_step``, ``reduce_on_plateau``, ``cyclic``, ``one_cycle``,
and ``int8`` model precision. ``cosine_annealing`` (torch's ``CosineAnnealingLR``: cosine
from the LR to ``eta_min`` over all iterations) is *kept* as a scheduler of its own, because
four of TrainTrain's eight shipped presets (all ADDifT ones) use it with ``eta_min``.
Precision ``auto`` (our default; fp32 on CPU) is the one value TrainTrain cannot read: a file
going back to TrainTrain needs fp16/bf16 there.

The second pass of Difference mode: ``Settings.second_pass`` holds overrides for fields with
``second_pass=True`` only, and only values that differ from the first pass (an override equal
to the 1st-pass value is dropped), so equality and JSON round trips are exact. Under our key
``second_pass`` any other field is an error; under TrainTrain's ``"2nd pass"`` key the other
fields are skipped, because TrainTrain writes a full copy of every field there and ignores
those itself. TrainTrain's ``use_2nd_pass_settings`` checkbox is the one *inside* its "2nd pass"
copy (the top-level key is a hidden dummy in its current UI, the switch in its older files), so
the switch is on when either is true; both are written.
"""
from __future__ import annotations

import ast
import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .atomic import atomic_path
from .errors import UserError
from .optim import missing_optimizer_package

SETTINGS_VERSION = 1

MODES = ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")
ALL = MODES
_L, _I, _D, _A, _M = MODES   # short names for the FIELDS table

BLOCKS_SD = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS_SDXL = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
#: Names accepted in ``network_blocks``: the family is known only at run time, so the schema
#: accepts the union and the network code checks the names against the loaded family.
BLOCK_NAMES = BLOCKS_SD + tuple(b for b in BLOCKS_SDXL if b not in BLOCKS_SD)   # SDXL's are a subset

NETWORK_TYPES = ("lierla", "c3lier", "loha", "lokr")
NETWORK_ELEMENTS = ("Full", "CrossAttention", "SelfAttention")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "DAdaptAdam", "AdamWScheduleFree",
              "CAME", "SGD")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "piecewise_constant", "cosine_annealing")
LOSS_FUNCTIONS = ("MSE", "L1", "Smooth-L1", "Huber", "Smooth-L1-kohya")
#: kohya's ``--loss_type`` spellings. Its ``smooth_l1`` is a pseudo-Huber ("Smooth-L1-kohya" here); the plain
#: spelling "smooth_l1" stays TrainTrain's Smooth-L1 (torch's, beta 1), which its files mean by it.
_LOSS_MAP = {"l2": "MSE", "huber": "Huber", "kohya_smooth_l1": "Smooth-L1-kohya"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GROUPS = ("required", "optional")
#: Optimizers that estimate their own step size and use the learning rate only as a multiplier on it:
#: about 1 is right for them, and the usual 1e-4 leaves a LoRA that learnt nothing.
ADAPTIVE_LR_OPTIMIZERS = ("Prodigy", "DAdaptAdam")
ADAPTIVE_LR_FLOOR = 0.1     # kohya (train_util.get_optimizer) warns at this or below

# Fields that describe the job rather than one pass: never inside TrainTrain's "2nd pass" copy.
_JOB_FIELDS = ("mode", "model_checkpoint", "model_vae", "original_prompt", "target_prompt",
               "original_image", "target_image")

#: Fields holding one image file: the UI offers an upload for them and a queued job keeps its own copy
#: (so the queue never depends on the browser's temporary upload files).
IMAGE_FIELDS = ("original_image", "target_image")

IGNORED_KEYS: dict[str, str] = {
    "network_train_text_encoder": "TrainTrain never read it; the text encoder is trained when BASE is "
                                  "in network_blocks",
    "te": "Z-Image text encoders are not supported",
    "negative prompt": "not used in training",
    "logging_use_wandb": "unused in TrainTrain", "logging_use_tensorboard": "unused in TrainTrain",
    "logging_dir": "unused in TrainTrain", "train_repeat": "unused in TrainTrain",
    "train_use_bucket": "unused in TrainTrain", "train_optimizer_args": "unused in TrainTrain; use "
                                                                        "train_optimizer_settings",
    "gen_noise_scheduler": "unused in TrainTrain", "lora_train_targets": "unused in TrainTrain; use "
                                                                         "network_blocks",
    "diff_use_fixed_noise": "unused in TrainTrain",
    "image_use_transparent_background_ajust": "unused in TrainTrain; see image_alpha_background",
}
_VERSION_KEY = "settings_version"
_PASS2_OURS = "second_pass"
_PASS2_TT = "2nd pass"


class SettingsError(UserError, ValueError):
    """One bad setting: ``str(e)`` is one line starting with the field's name and saying the fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# --------------------------------------------------------------------------- value parsers
def _num_text(v: float | int) -> str:
    """Numbers as TrainTrain's dropdowns spell them: ``8`` not ``8.0``, ``0.0001``, ``5e-05``."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _tuplify(v: Any) -> Any:
    """Lists → tuples (recursively) so values compare equal after a JSON round trip."""
    if isinstance(v, (list, tuple)):
        return tuple(_tuplify(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuplify(x) for k, x in v.items()}
    return v


def _listify(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_listify(x) for x in v]
    if isinstance(v, dict):
        return {k: _listify(x) for k, x in v.items()}
    return v


def _plain(v: Any) -> bool:
    """Whether ``v`` is made of JSON-representable values only."""
    if v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def _split_top(text: str, seps: str) -> list[str]:
    """Split on any of ``seps`` outside quotes and brackets (``betas=(0.9, 0.99); eps=1e-8``)."""
    out, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            cur.append(ch)
        elif ch in "([{":
            depth += 1
            cur.append(ch)
        elif ch in ")]}":
            depth -= 1
            cur.append(ch)
        elif ch in seps and depth <= 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _norm_key(s: str) -> str:
    return re.sub(r"[\s_\-]", "", s).lower()


# --------------------------------------------------------------------------- the field
@dataclass(frozen=True)
class Field:
    """One parameter.

    ``kind`` picks parsing and the UI widget: ``bool`` (checkbox), ``int``/``float`` (number),
    ``optint``/``optfloat`` (number, empty = unset → ``None``), ``str`` (one-line text),
    ``path`` (file or folder), ``text`` (multi-line prompt), ``choice`` (dropdown over
    ``choices``), ``blocks`` (checkbox group over ``choices``), ``size`` ((height, width)),
    ``kwargs`` (``key=value`` lines → dict), ``lines`` (one entry per line → tuple of str).
    ``suggest`` lists typical values for open numeric fields (a dropdown that allows others).
    """
    name: str
    kind: str
    default: Any
    help: str
    modes: tuple[str, ...] = ALL
    group: str = "optional"
    second_pass: bool = False
    choices: tuple = ()
    traintrain: str | None = None
    aliases: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    suggest: tuple = ()
    choice_map: Mapping[str, str] | None = None       # extra spellings → canonical choice
    refused: Mapping[str, str] | None = None          # known-but-unsupported value → advice
    normalize: Callable[[Any], Any] | None = None     # canonical spelling, applied before ``check``
    check: Callable[[Any], str | None] | None = None  # extra rule: returns the problem or None

    @property
    def type(self) -> type:
        """The Python type of a validated value (``None`` also allowed for ``opt*`` kinds)."""
        return {"bool": bool, "int": int, "optint": int, "float": float, "optfloat": float, "size": tuple,
                "blocks": tuple, "lines": tuple, "kwargs": dict}.get(self.kind, str)

    @property
    def label(self) -> str:
        """What the form calls the field. The key (``name``) stays what files, ``--set`` and the API use,
        and TrainTrain users know, so the form shows it beside this label."""
        return LABELS.get(self.name) or _auto_label(self.name)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key this field is read from in a settings dict."""
        return (self.name, *((self.traintrain,) if self.traintrain and self.traintrain != self.name else ()),
                *self.aliases)

    def error(self, message: str) -> SettingsError:
        return SettingsError(self.name, message)

    # -- validation ------------------------------------------------------------------------
    def validate(self, value: Any) -> Any:
        """Coerce ``value`` (native, or a string as TrainTrain/CLI/UI give it) and check it."""
        out = getattr(self, "_parse_" + self.kind)(value)
        if self.normalize is not None and out is not None:
            out = self.normalize(out)
        if self.check is not None and out is not None:
            problem = self.check(out)
            if problem:
                raise self.error(problem)
        return out

    def _bounds(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {_num_text(self.gt)}")
        if self.ge is not None:
            parts.append(f">= {_num_text(self.ge)}")
        if self.le is not None:
            parts.append(f"<= {_num_text(self.le)}")
        return " and ".join(parts)

    def _range(self, v: float | int, raw: Any) -> float | int:
        if ((self.gt is not None and not v > self.gt) or (self.ge is not None and not v >= self.ge)
                or (self.le is not None and not v <= self.le)):
            raise self.error(f"{raw!r} is out of range; enter a number {self._bounds()} (default "
                             f"{self.format(self.default) or 'empty'})")
        return v

    def _parse_bool(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            t = value.strip().lower()
            if t in ("true", "1", "yes", "on"):
                return True
            if t in ("false", "0", "no", "off", ""):    # TrainTrain writes "" for an untouched checkbox
                return False
        raise self.error(f"{value!r} is not true/false; write true or false")

    def _parse_int(self, value: Any) -> int:
        v = value
        if isinstance(v, str):
            v = v.strip()
            try:
                v = int(v)
            except ValueError:
                try:
                    v = float(v)
                except ValueError:
                    raise self.error(f"{value!r} is not a whole number; enter e.g. "
                                     f"{self.format(self.default) or 1}") from None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"{value!r} is not a whole number; enter e.g. {self.format(self.default) or 1}")
        return self._range(v, value)

    def _parse_float(self, value: Any) -> float:
        v = value
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise self.error(f"{value!r} is not a number; enter e.g. {self.format(self.default) or 1}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(f"{value!r} is not a number; enter e.g. {self.format(self.default) or 1}")
        v = float(v)
        if not math.isfinite(v):
            raise self.error(f"{value!r} is not a finite number")
        return self._range(v, value)

    def _parse_optint(self, value: Any) -> int | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return self._parse_int(value)

    def _parse_optfloat(self, value: Any) -> float | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return self._parse_float(value)

    def _text(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(f"{value!r} is not text")
        return value if isinstance(value, str) else _num_text(value)

    def _parse_str(self, value: Any) -> str:
        return self._text(value).strip()

    def _parse_text(self, value: Any) -> str:
        return self._text(value)

    def _parse_path(self, value: Any) -> str:
        # Windows "Copy as path" wraps the path in quotes.
        return self._text(value).strip().strip('"').strip("'").strip()

    def _parse_choice(self, value: Any) -> str:
        raw = self._parse_str(value)
        key = _norm_key(raw)
        for c in self.choices:
            if _norm_key(c) == key:
                return c
        for alias, c in (self.choice_map or {}).items():
            if _norm_key(alias) == key:
                return c
        for bad, advice in (self.refused or {}).items():
            if _norm_key(bad) == key:
                raise self.error(f"{raw!r} is not supported; {advice}")
        raise self.error(f"unknown value {raw!r}; choose one of {', '.join(self.choices)}")

    def _parse_blocks(self, value: Any) -> tuple[str, ...]:
        items = re.split(r"[\s,;]+", value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise self.error(f"{value!r} is not a list of block names; write e.g. BASE,IN01,M00")
        names = {str(x).strip().upper() for x in items if str(x).strip()}
        bad = sorted(names - set(self.choices))
        if bad:
            raise self.error(f"unknown block {', '.join(bad)}; valid names are {', '.join(self.choices)}")
        if not names:
            raise self.error("no block selected; select at least one UNet block (IN, M00 or OUT)")
        return tuple(b for b in self.choices if b in names)     # canonical order: order-independent equality

    def _parse_size(self, value: Any) -> tuple[int, int]:
        parts = value
        if isinstance(value, str):
            parts = [p for p in re.split(r"\s*[,xX×*]\s*", value.strip()) if p]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts = [value]
        if not isinstance(parts, (list, tuple)) or len(parts) not in (1, 2):
            raise self.error(f"{value!r} is not a size; write HEIGHT,WIDTH like 512,768 or one number for a square")
        sides = []
        for p in parts:
            try:
                n = float(p) if not isinstance(p, bool) else None
            except (TypeError, ValueError):
                n = None
            if n is None or not n.is_integer():
                raise self.error(f"{value!r} is not a size; write HEIGHT,WIDTH like 512,768 or one number for "
                                 f"a square")
            sides.append(int(n))
        if len(sides) == 1:
            sides *= 2
        if any(s < 8 or s > 8192 or s % 8 for s in sides):
            raise self.error(f"{value!r}: height and width must be multiples of 8 between 8 and 8192 (e.g. 512)")
        return sides[0], sides[1]

    def _parse_kwargs(self, value: Any) -> dict[str, Any]:
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, str):
            items = []
            for part in _split_top(value, "\n;"):
                part = part.strip()
                if not part:
                    continue
                if "=" not in part:
                    raise self.error(f"{part!r} is not key=value; write e.g. weight_decay=0.01 (one per line "
                                     f"or separated by ;)")
                k, v = part.split("=", 1)
                v = v.strip()
                try:
                    v = ast.literal_eval(v)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    pass                                   # not a Python literal: keep it as a string
                items.append((k.strip(), v))
        elif value is None:
            items = []
        else:
            raise self.error(f"{value!r} is not key=value text; write e.g. weight_decay=0.01")
        out: dict[str, Any] = {}
        for k, v in items:
            if not isinstance(k, str) or not k.isidentifier():
                raise self.error(f"{k!r} is not a valid argument name; use names like weight_decay")
            if not _plain(v):   # must survive JSON (presets, queue) unchanged
                raise self.error(f"{k}={v!r}: use a number, text, True/False, None or a list of them")
            out[k] = _tuplify(v)
        return out

    def _parse_lines(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        items = value.splitlines() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
            raise self.error(f"{value!r} is not a list of lines; write one entry per line")
        return tuple(x.strip() for x in items if x.strip())

    # -- output ------------------------------------------------------------------------------
    def format(self, value: Any) -> str:
        """The value as text that :meth:`validate` reads back (UI text boxes, CLI, TrainTrain files)."""
        if value is None:
            return ""
        if self.kind == "bool":
            return "true" if value else "false"
        if self.kind in ("int", "optint", "float", "optfloat"):
            return _num_text(value)
        if self.kind == "size":
            return str(value[0]) if value[0] == value[1] else f"{value[0]},{value[1]}"
        if self.kind == "blocks":
            return ",".join(value)
        if self.kind == "lines":
            return "\n".join(value)
        if self.kind == "kwargs":
            return "\n".join(f"{k}={v!r}" for k, v in value.items())
        return str(value)

    def to_json(self, value: Any, style: str = "ours") -> Any:
        """JSON value: ours = native types; traintrain = the shape TrainTrain writes for its fields."""
        if style == "traintrain" and self.traintrain:
            if self.kind in ("bool", "blocks", "lines"):
                return list(value) if self.kind != "bool" else value
            return self.format(value)
        return _listify(value)


# --------------------------------------------------------------------------- field rules
def check_plain_name(v: str) -> str | None:
    """Why a name is not a safe plain file name (no folders, no `..`, no Windows-reserved chars), or None."""
    if v in (".", "..") or ".." in v or any(c in v for c in '/\\<>:"|?*') or any(ord(c) < 32 for c in v):
        return f"{v!r} must be a plain file name without / \\ .. or <>:\"|?*; e.g. my_lora"
    if len(v) > 200:
        return "is longer than 200 characters"
    return None


def _norm_lora_name(v: str) -> str:
    v = v.strip()
    if v.lower().endswith(".safetensors"):
        v = v[: -len(".safetensors")]
    return v or "untitled"


def _norm_vae(v: str) -> str:
    """TrainTrain writes "None" and the WebUI "Automatic" for "the checkpoint's own VAE"."""
    return "" if v.lower() in ("none", "automatic") else v


def _check_suffix(v: str) -> str | None:
    if any(c in v for c in "/\\") or ".." in v:
        return f"{v!r} must be a file-name suffix like _closed, without / \\ or .."
    return None


def _check_step_rules(v: str) -> str | None:
    """``factor:step,factor:step,...,factor`` (diffusers' piecewise_constant grammar)."""
    if not v:
        return None
    parts = [p.strip() for p in v.replace(";", ",").split(",") if p.strip()]
    last = -1
    for i, p in enumerate(parts):
        try:
            if ":" in p:
                f, s = p.split(":")
                float(f)
                step = int(s)
                if step <= last:
                    return f"steps must increase (at {p!r}); write e.g. 1:100,0.5:200,0.1"
                last = step
            elif i == len(parts) - 1:
                float(p)
            else:
                raise ValueError
        except ValueError:
            return f"cannot read {p!r}; write factor:step pairs then a final factor, e.g. 1:100,0.5:200,0.1"
    return None


_COLORS = {"white", "black", "gray", "grey"}


def _check_color(v: str) -> str | None:
    if v.lower() in _COLORS or re.fullmatch(r"#[0-9a-fA-F]{6}", v):
        return None
    return f"{v!r} is not a colour; write white, black, gray or #rrggbb"


def _blocks_text(v: str) -> str:
    return ",".join(x.strip() for x in v.split(",")) if v.strip() else ""


def _check_blocks(name: str, integer: bool) -> Callable[[str], str | None]:
    """kohya's per-block list syntax (trainer/networks/blocks.py), checked when the value is read."""
    def check(v: str) -> str | None:
        if not v:
            return None
        from .networks.blocks import parse_values
        try:
            parse_values(v, name, integer)
        except UserError as e:
            return str(e).split(": ", 1)[1]
        return None
    return check


def _f(name: str, kind: str, default: Any, help: str, **kw: Any) -> Field:
    return Field(name=name, kind=kind, default=default, help=help, **kw)


_POW2 = tuple(2 ** i for i in range(2, 11))
_ALPHAS = tuple(2.0 ** (i - 5) for i in range(16))

_OPT_ADVICE = {
    "PagedAdamW8bit": "use AdamW8bit (same update, without paging)",
    "PagedAdamW": "use AdamW (same update, without paging)",
    "PagedAdamW32bit": "use AdamW (same update, without paging)",
    "Adam": "use AdamW with train_optimizer_settings weight_decay=0",
    "Adam8bit": "use AdamW8bit with train_optimizer_settings weight_decay=0",
    "Lion8bit": "use Lion", "PagedLion8bit": "use Lion",
    "DadaptLion": "use DAdaptAdam or Prodigy", "DAdaptAdaGrad": "use DAdaptAdam or Prodigy",
    "DAdaptAdan": "use DAdaptAdam or Prodigy", "DAdaptSGD": "use DAdaptAdam or Prodigy",
    "RAdamScheduleFree": "use AdamWScheduleFree", "SGDScheduleFree": "use AdamWScheduleFree",
    "SGDNesterov": "use SGD with train_optimizer_settings momentum=0.9; nesterov=True",
    "SGDNesterov8bit": "use SGD with train_optimizer_settings momentum=0.9; nesterov=True",
    "Tiger": "use Lion", "AdamMini": "use AdamW",
}
_OPT_ADVICE = {k: f"{v}. Supported: {', '.join(OPTIMIZERS)}" for k, v in _OPT_ADVICE.items()}
_SCHED_ADVICE = {
    "cosine_annealing_with_restarts": "use cosine_with_restarts with train_lr_scheduler_num_cycles",
    "exponential": "use piecewise_constant with train_lr_step_rules, or polynomial",
    "step": "use piecewise_constant with train_lr_step_rules",
    "multi_step": "use piecewise_constant with train_lr_step_rules",
    "reduce_on_plateau": "it needs a validation metric this trainer does not have; use constant or cosine",
    "cyclic": "use cosine_with_restarts", "one_cycle": "use cosine with train_lr_warmup_steps",
}
_SCHED_ADVICE = {k: f"{v}. Supported: {', '.join(SCHEDULERS)}" for k, v in _SCHED_ADVICE.items()}
_PREC_MAP = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
_INT8 = {"int8": "int8 weight quantisation is not supported; use auto, fp16 or bf16"}
_NET_MAP = {"lora": "lierla", "locon": "c3lier", "lycoris_loha": "loha", "lycoris_lokr": "lokr"}


# --------------------------------------------------------------------------- labels
#: Human labels where spelling out the key (:func:`_auto_label`) does not read well.
LABELS: dict[str, str] = {
    "model_checkpoint": "Model", "model_vae": "VAE", "lora_data_directory": "Training images folder",
    "lora_reg_directory": "Regularisation images folder", "train_epochs": "Epochs (instead of iterations)",
    "save_lora_name": "LoRA file name", "network_rank": "Rank (dim)", "image_num_multiply": "Image repeats",
    "sub_image_num": "Sub-images per image", "image_use_filename_as_tag": "Use file name as tag",
    "image_disable_upscale": "Don't upscale small images", "use_gradient_checkpointing": "Gradient checkpointing",
    "multires_noise_iterations": "Multi-resolution noise iterations",
    "multires_noise_discount": "Multi-resolution noise discount", "model_v_pred": "v-prediction model",
    "logging_save_csv": "Save loss CSV", "logging_verbose": "Verbose log", "save_overwrite": "Overwrite existing file",
    "save_as_json": "Save settings as JSON", "diff_use_diff_mask": "Difference mask",
    "huber_c": "Huber c", "debiased_estimation": "Debiased estimation loss",
    "ip_noise_gamma": "Input-perturbation noise",
    "ip_noise_gamma_random_strength": "Random IP-noise strength",
    "noise_offset_random_strength": "Random noise-offset strength", "ema_decay": "EMA decay of the LoRA weights",
    "ema_warmup": "EMA warm-up", "block_dims": "Rank per block",
    "block_alphas": "Alpha per block", "block_lr_weight": "LR weight per block",
}
_LABEL_WORDS = {"lr": "LR", "lora": "LoRA", "vae": "VAE", "snr": "SNR", "dora": "DoRA", "csv": "CSV",
                "json": "JSON", "textencoder": "text encoder", "num": "number of", "n": "N", "diff": "difference"}


def _auto_label(name: str) -> str:
    """``train_lr_scheduler_settings`` → "LR scheduler settings": TrainTrain's ``train_`` prefix dropped,
    abbreviations spelled as users write them."""
    parts = name.split("_")
    if parts[0] == "train" and len(parts) > 1:
        parts = parts[1:]
    text = " ".join(_LABEL_WORDS.get(p.lower(), p) for p in parts)
    return text[:1].upper() + text[1:]


#: The schema, in UI order (required group first). Names are ours; ``traintrain`` is
#: TrainTrain's JSON key where it has the parameter.
FIELDS: tuple[Field, ...] = (
    # ---- the job: mode, model and the mode's inputs
    _f("mode", "choice", "LoRA", "What to train: a LoRA from images, iLECO from two prompts, or a slider from "
       "an image pair (Difference, ADDifT, Multi-ADDifT).", choices=MODES, group="required", traintrain="mode"),
    _f("model_checkpoint", "str", "", "Checkpoint to train on; empty uses the one loaded in the WebUI (or the "
       "embedded tiny model standalone).", group="required", traintrain="model"),
    _f("model_vae", "str", "", "VAE replacing the checkpoint's own; empty keeps the checkpoint's VAE.",
       group="required", traintrain="vae", normalize=_norm_vae),
    _f("lora_data_directory", "path", "", "Folder of training images (searched recursively) with optional "
       ".txt/.caption captions.", modes=(_L, _M), group="required", traintrain="lora_data_directory"),
    _f("diff_target_name", "str", "", "Suffix that names the target of each pair: NAME.png pairs with "
       "NAME{suffix}.png.", modes=(_M,), group="required", traintrain="diff_target_name", check=_check_suffix),
    _f("lora_trigger_word", "str", "", "Word put before every caption (LoRA, Multi-ADDifT) or used as the "
       "prompt of the image pair (Difference, ADDifT); empty for none.", modes=(_L, _D, _A, _M), group="required",
       traintrain="lora_trigger_word"),
    _f("original_prompt", "text", "", "Prompt whose meaning the LoRA changes (e.g. 'red').", modes=(_I,),
       group="required", traintrain="original prompt"),
    _f("target_prompt", "text", "", "What the original prompt should produce instead; empty erases the "
       "concept.", modes=(_I,), group="required", traintrain="target prompt"),
    _f("preserve_prompts", "lines", (), "Prompts whose results must not change, one per line (e.g. neighbouring "
       "concepts such as 'orange' when moving 'red'): each step one of them is also trained to keep the "
       "frozen model's prediction with the LoRA on. Empty = none (TrainTrain's iLECO).", modes=(_I,)),
    _f("preserve_unconditional", "bool", False, "Also keep the empty prompt's prediction unchanged with the LoRA "
       "on. Generation uses it as CFG's unconditional half, so a LoRA that moves it shifts every image and blunts "
       "an erase; recommended when erasing.", modes=(_I,)),
    _f("target_guidance", "float", 0.0, "How far past the target the original prompt is pushed: the frozen "
       "target is ε(target) + g·(ε(target) − ε(original)). 0 = TrainTrain's iLECO; about 1 with an empty target "
       "is ESD's erase objective, whose effect survives the CFG used when generating.", modes=(_I,), ge=0, le=10),
    _f("original_image", "path", "", "Image without the change (the 'before' of the slider).", modes=(_D, _A),
       group="required", traintrain="original image"),
    _f("target_image", "path", "", "Image with the change, same size as the original.", modes=(_D, _A),
       group="required", traintrain="target image"),
    # ---- required parameters
    _f("network_type", "choice", "lierla", "LoRA kind: lierla (plain LoRA), c3lier (LoCon, also conv layers), "
       "loha or lokr.", choices=NETWORK_TYPES, group="required", second_pass=True, traintrain="network_type",
       choice_map=_NET_MAP),
    _f("network_rank", "int", 16, "Size of the LoRA (dim); larger learns more detail and makes bigger files.",
       group="required", second_pass=True, traintrain="network_rank", gt=0, le=4096, suggest=_POW2),
    _f("network_alpha", "float", 8.0, "Scale of the LoRA's update: the effective strength is alpha/rank.",
       group="required", second_pass=True, traintrain="network_alpha", gt=0, suggest=_ALPHAS),
    _f("image_size", "size", (512, 512), "Training resolution as HEIGHT,WIDTH (one number for a square); the "
       "largest bucket for image folders.", modes=(_L, _I, _M), group="required",
       traintrain="image_size(height, width)"),
    _f("train_iterations", "int", 1000, "Number of optimizer steps.", group="required", second_pass=True,
       traintrain="train_iterations", ge=1),
    _f("train_batch_size", "int", 2, "Images (or image pairs) per step; larger needs more memory.", group="required", second_pass=True,
       traintrain="train_batch_size", ge=1),
    _f("train_learning_rate", "float", 1e-4, "Learning rate of the UNet LoRA (typical 1e-4 to 1e-3).",
       group="required", second_pass=True, traintrain="train_learning_rate", gt=0),
    _f("train_optimizer", "choice", "AdamW", "Optimizer; the 8-bit, Lion, Prodigy, D-Adaptation, schedule-free "
       "and CAME ones need their package installed.", choices=OPTIMIZERS, group="required", second_pass=True,
       traintrain="train_optimizer", refused=_OPT_ADVICE),
    _f("train_optimizer_settings", "kwargs", {}, "Extra optimizer arguments, key=value per line or separated "
       "by ; (e.g. weight_decay=0.01).", group="required", second_pass=True,
       traintrain="train_optimizer_settings"),
    _f("train_lr_scheduler", "choice", "cosine", "How the learning rate changes over the run.",
       choices=SCHEDULERS, group="required", second_pass=True, traintrain="train_lr_scheduler",
       refused=_SCHED_ADVICE),
    _f("train_lr_scheduler_settings", "kwargs", {}, "Extra scheduler arguments, key=value (e.g. eta_min=1e-5 "
       "for cosine_annealing).", group="required", second_pass=True, traintrain="train_lr_scheduler_settings"),
    _f("save_lora_name", "str", "untitled", "File name of the LoRA, without folder or extension.",
       group="required", traintrain="save_lora_name", normalize=_norm_lora_name, check=check_plain_name),
    _f("use_gradient_checkpointing", "bool", False, "Recompute activations in the backward pass: much less "
       "memory, about 30% slower.", group="required", second_pass=True, traintrain="use_gradient_checkpointing"),
    _f("network_blocks", "blocks", BLOCKS_SD, "UNet blocks that get LoRA layers; BASE adds the text encoder "
       "(SDXL has IN00-IN08 and OUT00-OUT08 only).", choices=BLOCK_NAMES, group="required", second_pass=True,
       traintrain="network_blocks(BASE = TextEncoder)"),
    # ---- network options
    _f("network_resume", "path", "", "LoRA file to continue training from; empty starts fresh.",
       modes=(_L, _I, _A, _M), traintrain="network_resume"),
    _f("network_strength", "float", 1.0, "Strength baked into the saved file (the LoRA at weight 1 acts like "
       "this weight).", second_pass=True, traintrain="network_strength", gt=0),
    _f("network_conv_rank", "int", 0, "Rank of 3x3 conv layers for c3lier/loha/lokr; 0 uses network_rank.",
       second_pass=True, traintrain="network_conv_rank", ge=0, le=4096, suggest=(0, *_POW2)),
    _f("network_conv_alpha", "float", 0.0, "Alpha of 3x3 conv layers; 0 uses network_alpha.", second_pass=True,
       traintrain="network_conv_alpha", ge=0, suggest=(0.0, *_ALPHAS)),
    _f("network_element", "choice", "Full", "Which layers inside the blocks: all, cross-attention only (what "
       "text changes) or self-attention only.", choices=NETWORK_ELEMENTS, second_pass=True,
       traintrain="network_element"),
    _f("network_dora", "bool", False, "Use DoRA (weight-decomposed LoRA), which often learns more faithfully "
       "at the same rank.", second_pass=True),
    _f("block_dims", "str", "", "Rank per UNet block in kohya's syntax: 25 comma-separated values for SD1/SD2 "
       "(IN00-IN11, MID, OUT00-OUT11) or 23 for SDXL; 0 = no module in that block. Empty uses network_rank.",
       second_pass=True, normalize=_blocks_text, check=_check_blocks("block_dims", True)),
    _f("block_alphas", "str", "", "Alpha per UNet block, same syntax as block_dims. Empty uses network_alpha.",
       second_pass=True, normalize=_blocks_text, check=_check_blocks("block_alphas", False)),
    _f("block_lr_weight", "str", "", "Learning-rate multiplier per UNet block, same syntax as block_dims "
       "(kohya's down/mid/up_lr_weight in one list); 0 freezes the block. Empty = 1 everywhere.",
       second_pass=True, normalize=_blocks_text, check=_check_blocks("block_lr_weight", False)),
    # ---- dataset
    _f("image_buckets_step", "int", 256, "Step in pixels between bucket sizes for images of other aspect "
       "ratios.", modes=(_L, _M), traintrain="image_buckets_step", gt=0,
       check=lambda v: None if v % 8 == 0 else f"{v} must be a multiple of 8 (e.g. 64)",
       suggest=tuple(64 * i for i in range(1, 10))),
    _f("image_num_multiply", "optint", None, "Repeat every image this many times; empty uses N from folder "
       "names like 10_cat (else 1).", modes=(_L, _M), traintrain="image_num_multiply", ge=1),
    _f("image_min_length", "int", 512, "Shortest side a bucket may have.", modes=(_L, _M),
       traintrain="image_min_length", ge=8),
    _f("image_max_ratio", "float", 2.0, "Largest long-side/short-side ratio of a bucket.", modes=(_L, _M),
       traintrain="image_max_ratio", ge=1),
    _f("sub_image_num", "int", 0, "Extra downscaled copies of each image in smaller buckets.", modes=(_L, _M),
       traintrain="sub_image_num", ge=0),
    _f("image_mirroring", "bool", False, "Also train on horizontally flipped copies.", modes=(_L, _M),
       traintrain="image_mirroring"),
    _f("image_use_filename_as_tag", "bool", False, "Use the file name (up to _id_, with _ as commas) as the "
       "caption.", modes=(_L, _M), traintrain="image_use_filename_as_tag"),
    _f("image_disable_upscale", "bool", False, "Skip images smaller than their bucket instead of enlarging "
       "them.", modes=(_L, _M), traintrain="image_disable_upscale"),
    _f("image_alpha_background", "str", "white", "Colour that transparent pixels are composited on (white, "
       "black, gray or #rrggbb).", modes=(_L, _D, _A, _M), normalize=str.lower, check=_check_color),
    _f("image_masked_loss", "bool", False, "Ignore transparent pixels in the loss (images with an alpha "
       "channel).", modes=(_L, _M)),
    _f("latent_cache_to_disk", "bool", False, "Keep encoded images on disk so the next run with the same "
       "images starts faster.", modes=(_L, _M)),
    # ---- kohya's workflow: regularisation images, caption options, epochs (SPEC §16)
    _f("lora_reg_directory", "path", "", "Folder of regularisation (class) images in N_class folders like "
       "1_circle; each epoch holds as many reg samples as training samples (kohya). Empty = none.", modes=(_L,)),
    _f("prior_loss_weight", "float", 1.0, "Loss weight of the regularisation images relative to the training "
       "images (kohya's prior_loss_weight).", modes=(_L,), ge=0),
    _f("shuffle_caption", "bool", False, "Shuffle the comma-separated tags of each caption every step (the "
       "first keep_tokens tags stay in place).", modes=(_L,)),
    _f("keep_tokens", "int", 0, "Number of leading tags never shuffled nor dropped (1 keeps the trigger word "
       "first).", modes=(_L,), ge=0),
    _f("keep_tokens_separator", "str", "", "Text marking the end of the fixed part of a caption (e.g. |||): "
       "tags before it stay, after it are shuffled; a second one starts a fixed ending.", modes=(_L,)),
    _f("caption_separator", "str", ",", "Separator between the tags of a caption (for shuffle and tag "
       "dropout).", modes=(_L,), check=lambda v: None if v else "must not be empty; the usual one is ,"),
    _f("caption_dropout_rate", "float", 0.0, "Chance that a sample is trained with an empty caption.",
       modes=(_L,), ge=0, le=1),
    _f("caption_dropout_every_n_epochs", "int", 0, "Train every Nth epoch with empty captions; 0 is off.",
       modes=(_L,), ge=0),
    _f("caption_tag_dropout_rate", "float", 0.0, "Chance that each tag (except the kept ones) is left out of "
       "a caption, per step.", modes=(_L,), ge=0, le=1),
    _f("caption_prefix", "str", "", "Text put before every caption (joined with a space, as kohya does).",
       modes=(_L,)),
    _f("caption_suffix", "str", "", "Text put after every caption (joined with a space).", modes=(_L,)),
    _f("train_epochs", "optint", None, "Train this many epochs (passes over all images x repeats) instead of "
       "train_iterations, which is then derived; empty = train_iterations decides.", modes=(_L,), ge=1),
    _f("save_every_n_epochs", "int", 0, "Also save NAME-0000EE.safetensors at the end of every Nth epoch; 0 is "
       "off.", modes=(_L,), ge=0),
    _f("sample_every_n_epochs", "int", 0, "Draw sample images at the end of every Nth epoch; 0 is off.",
       modes=(_L,), ge=0),
    # ---- training
    _f("train_fixed_timesteps_in_batch", "bool", False, "Use one noise level for the whole batch instead of "
       "one per sample.", second_pass=True, traintrain="train_fixed_timsteps_in_batch"),
    _f("train_textencoder_learning_rate", "optfloat", None, "Learning rate of the text-encoder LoRA (BASE); "
       "empty uses train_learning_rate.", modes=(_L,), traintrain="train_textencoder_learning_rate", gt=0),
    _f("train_seed", "int", -1, "Random seed; -1 picks one and records it.", second_pass=True,
       traintrain="train_seed", ge=-1),
    _f("train_min_timesteps", "int", 0, "Lowest noise timestep trained (0-999).", second_pass=True,
       traintrain="train_min_timesteps", ge=0, le=999),
    _f("train_max_timesteps", "int", 1000, "Highest noise timestep trained, exclusive (1-1000).",
       second_pass=True, traintrain="train_max_timesteps", ge=1, le=1000),
    _f("train_loss_function", "choice", "MSE", "Loss between prediction and target. Huber and Smooth-L1-kohya "
       "are kohya's pseudo-Huber losses (threshold from huber_schedule and huber_c: robust to outlier images); "
       "Smooth-L1 is torch's (TrainTrain's).", choices=LOSS_FUNCTIONS, second_pass=True,
       traintrain="train_loss_function", choice_map=_LOSS_MAP),
    _f("train_snr_gamma", "float", 5.0, "Min-SNR weighting gamma (balances noise levels); 0 turns it off.",
       second_pass=True, traintrain="train_snr_gamma", ge=0),
    _f("noise_offset", "float", 0.0, "Noise offset (typical 0.05-0.1) to learn very dark and bright images; "
       "0 is off.", second_pass=True, ge=0, le=1),
    _f("multires_noise_iterations", "int", 0, "Multi-resolution (pyramid) noise levels (typical 6-10); 0 is "
       "off.", second_pass=True, ge=0, le=20),
    _f("multires_noise_discount", "float", 0.3, "Strength falloff of each multi-resolution noise level.",
       second_pass=True, gt=0, le=1),
    # ---- kohya's loss and noise extras, EMA (trainer/loss_terms.py, trainer/ema.py)
    _f("huber_schedule", "choice", "snr", "How the Huber threshold c changes with the noise level (Huber and "
       "Smooth-L1-kohya losses): snr = near L2 on clean, near L1 on noisy steps (kohya's default); exponential; "
       "constant.", choices=("snr", "exponential", "constant"), second_pass=True),
    _f("huber_c", "float", 0.1, "Huber threshold c (kohya's --huber_c): the lowest c of the snr and exponential "
       "schedules, the c of constant.", second_pass=True, gt=0, suggest=(0.05, 0.1, 0.2, 0.5)),
    _f("huber_scale", "float", 1.0, "Multiplies c for the constant and exponential Huber schedules (kohya's "
       "--huber_scale; the snr schedule ignores it, as in kohya).", second_pass=True, gt=0),
    _f("debiased_estimation", "bool", False, "Weight each step's loss by 1/sqrt(SNR) (v-prediction: "
       "1/(SNR+1)) so nearly clean timesteps count less (kohya's --debiased_estimation_loss).",
       second_pass=True),
    _f("ip_noise_gamma", "float", 0.0, "Input-perturbation noise (typical 0.1): the noised input gets extra "
       "noise of this strength, the target does not; 0 is off.", modes=(_L, _D), second_pass=True, ge=0, le=1),
    _f("ip_noise_gamma_random_strength", "bool", False, "Scale ip_noise_gamma by a random 0-1 factor each "
       "step.", modes=(_L, _D), second_pass=True),
    _f("noise_offset_random_strength", "bool", False, "Scale noise_offset by a random 0-1 factor each step.",
       modes=(_L, _D, _A, _M), second_pass=True),
    _f("ema_decay", "float", 0.0, "Keep an exponential moving average of the LoRA weights with this decay "
       "(e.g. 0.999) and save it instead of the last weights; 0 is off.", second_pass=True, ge=0,
       check=lambda v: None if v < 1 else f"{v} must be below 1 (e.g. 0.999), or 0 for off"),
    _f("ema_warmup", "bool", False, "Ramp the EMA decay up as min(ema_decay, (1+n)/(10+n)) after n updates, "
       "so early weights do not dominate a short run.", second_pass=True),
    _f("train_lr_step_rules", "str", "", "For piecewise_constant: factor:step pairs then a final factor, e.g. "
       "1:100,0.5:200,0.1.", second_pass=True, traintrain="train_lr_step_rules", check=_check_step_rules),
    _f("train_lr_warmup_steps", "int", 0, "Steps over which the learning rate rises from 0 at the start.",
       second_pass=True, traintrain="train_lr_warmup_steps", ge=0),
    _f("train_lr_scheduler_num_cycles", "int", 1, "Number of restarts for cosine_with_restarts.",
       second_pass=True, traintrain="train_lr_scheduler_num_cycles", ge=1),
    _f("train_lr_scheduler_power", "float", 1.0, "Power of the polynomial decay.", second_pass=True,
       traintrain="train_lr_scheduler_power", gt=0),
    _f("gradient_accumulation_steps", "int", 1, "Add up gradients over this many batches per step (a larger "
       "effective batch without more memory).", second_pass=True, ge=1),
    _f("gradient_clip_norm", "float", 0.0, "Clip the gradient norm to this value (1.0 is common); 0 is off.",
       second_pass=True, ge=0),
    _f("processes", "int", 1, "Train on this many local processes (one per GPU) through torchrun, data-parallel: "
       "each takes train_batch_size samples, so a step sees processes x train_batch_size (LoRA, iLECO).",
       modes=(_L, _I), ge=1, le=64),
    _f("train_model_precision", "choice", "auto", "Precision of the frozen model: auto = fp32 on CPU, bf16 on "
       "GPUs that support it, else fp16; model = as stored.", choices=(*PRECISIONS, "model"), second_pass=True,
       traintrain="train_model_precision", choice_map=_PREC_MAP, refused=_INT8),
    _f("train_lora_precision", "choice", "fp32", "Precision of the trained LoRA weights (fp32 keeps small "
       "updates; auto as for the model).", choices=PRECISIONS, second_pass=True,
       traintrain="train_lora_precision", choice_map=_PREC_MAP),
    _f("train_VAE_precision", "choice", "auto", "Precision of the VAE while encoding images (auto as for the "
       "model).", choices=PRECISIONS, traintrain="train_VAE_precision", choice_map=_PREC_MAP),
    _f("save_precision", "choice", "fp16", "Precision of the saved file; model = the checkpoint's own.",
       choices=("fp16", "bf16", "fp32", "model"), second_pass=True, traintrain="save_precision",
       choice_map=_PREC_MAP),
    _f("clip_skip", "int", 1, "Text-encoder layer: 1 = the model's usual one, 2 = one earlier (the WebUI's Clip "
       "skip).", ge=1, le=12),
    _f("model_v_pred", "bool", False, "Force v-prediction; off = detect it from the WebUI model or a .yaml "
       "beside the checkpoint.", traintrain="model_v_pred"),
    # ---- saving and logging
    _f("save_every_n_steps", "int", 0, "Also save NAME_STEPsteps.safetensors every this many steps; 0 saves "
       "only at the end.", second_pass=True, traintrain="save_per_steps", ge=0),
    _f("save_state", "bool", False, "With every save, also save the training state so an interrupted run can "
       "be resumed exactly."),
    _f("train_resume_state", "path", "", "Training-state file to resume an interrupted run from; empty "
       "starts fresh."),
    _f("save_overwrite", "bool", False, "Replace an existing LoRA file of the same name instead of refusing.",
       traintrain="save_overwrite"),
    _f("save_as_json", "bool", False, "Write this run's settings to json/DATE/NAME-TIME.json.",
       traintrain="save_as_json"),
    _f("logging_save_csv", "bool", True, "Write the loss per step to logs/DATE/NAME-TIME.csv (used by the "
       "Plot tab).", traintrain="logging_save_csv"),
    _f("logging_verbose", "bool", False, "Print detailed progress to the console.", traintrain="logging_verbose"),
    _f("sample_every_n_steps", "int", 0, "Draw sample images every this many steps; 0 is off.", ge=0),
    _f("sample_prompts", "lines", (), "Prompts for the sample images, one per line."),
    # ---- validation loss and TensorBoard (SPEC §16; kohya's names)
    _f("validation_split", "float", 0.0, "Fraction of the training images held out to measure a validation "
       "loss (never trained on; the same images for the same seed); 0 is off.", modes=(_L,), ge=0,
       check=lambda v: None if v < 1 else f"{v!r} holds out every image; enter a fraction below 1 (e.g. 0.1)"),
    _f("validation_directory", "path", "", "Folder of validation images with captions, like the training "
       "folder (instead of validation_split); empty for none.", modes=(_L,)),
    _f("validate_every_n_steps", "int", 0, "Measure the validation loss every this many steps (and after the "
       "last); 0 = after the last step only.", modes=(_L,), ge=0),
    _f("validation_seed", "optint", None, "Seed of the held-out choice and of the validation noise; empty uses "
       "train_seed.", modes=(_L,), ge=0),
    _f("log_with", "choice", "none", "tensorboard: also write TensorBoard event files (loss, validation loss, "
       "learning rates, sample images) to logs/DATE/NAME-TIME/tensorboard (pip install tensorboard).",
       choices=("none", "tensorboard"), refused={"wandb": "Weights & Biases logging is not supported; use "
                                                           "tensorboard", "all": "use tensorboard"}),
    # ---- speed (issue 17; trainer/speed.py): opt-in fast paths, each tested equal to the plain path
    _f("train_fused_optimizer", "bool", False, "Update all LoRA weights in one fused optimizer step (AdamW, "
       "SGD; multi-tensor where fused is unavailable) instead of one small step per tensor: same result, less "
       "overhead. Ignored when train_optimizer_settings sets fused or foreach.", second_pass=True),
    _f("train_channels_last", "bool", False, "Run the UNet's convolutions in channels-last memory layout "
       "(faster on recent GPUs; same result).", second_pass=True),
    _f("train_compile", "bool", False, "Compile the UNet's blocks, LoRA included, with torch.compile: the first "
       "steps are slow (compiling), later ones faster on a GPU; needs a C++ compiler on CPU, Triton on CUDA.",
       second_pass=True),
    # ---- ADDifT / Multi-ADDifT
    _f("diff_multiplier", "float", 0.25, "LoRA weight used while training the difference (the slider is "
       "trained at +/- this value).", modes=(_A, _M), gt=0, le=4),
    _f("diff_alt_ratio", "float", 1.0, "Weight of the reverse (-) steps relative to the forward ones; 1 makes "
       "a symmetric slider.", modes=(_A, _M), traintrain="diff_alt_ratio", ge=0),
    _f("diff_revert_original_target", "bool", False, "Swap the original and target images.", modes=(_A, _M),
       traintrain="diff_revert_original_target"),
    _f("diff_use_diff_mask", "bool", False, "Train only where the two images differ.", modes=(_A, _M),
       traintrain="diff_use_diff_mask"),
    # ---- Difference
    _f("diff_load_1st_pass", "str", "", "Copier LoRA to load instead of training pass 1 (a file in the LoRA "
       "folder).", modes=(_D,), traintrain="diff_load_1st_pass"),
    _f("diff_save_1st_pass", "bool", False, "Also save the pass-1 copier as NAME_copy.safetensors.", modes=(_D,),
       traintrain="diff_save_1st_pass"),
    _f("diff_1st_pass_only", "bool", False, "Stop after pass 1 and save the copier.", modes=(_D,),
       traintrain="diff_1st_pass_only"),
    _f("use_2nd_pass_settings", "bool", False, "Train pass 2 with its own network, optimizer, schedule and "
       "step settings (typical: copier rank 16, pass 2 rank 4).", modes=(_D,), traintrain="use_2nd_pass_settings"),
)

_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
_BY_KEY: dict[str, Field] = {k: f for f in FIELDS for k in f.keys}


def field(name: str) -> Field:
    """The field called ``name`` (ours or TrainTrain's key); unknown names suggest the closest."""
    f = _BY_KEY.get(name)
    if f is None:
        raise SettingsError(name, f"unknown setting{_did_you_mean(name)}")
    return f


def fields_for_mode(mode: str) -> tuple[Field, ...]:
    """Fields the UI shows for ``mode`` (any spelling of a mode name), in schema order."""
    m = _BY_NAME["mode"].validate(mode)
    return tuple(f for f in FIELDS if m in f.modes)


def second_pass_fields() -> tuple[Field, ...]:
    """Fields Difference's 2nd pass may override (SPEC §4)."""
    return tuple(f for f in FIELDS if f.second_pass)


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, list(_BY_KEY), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


# --------------------------------------------------------------------------- settings
class Settings:
    """Validated values for every field, read as attributes (``s.train_learning_rate``).

    Immutable: derive changed copies with :meth:`with_overrides` / :meth:`apply_set_args`.
    ``second_pass`` maps field names to Difference 2nd-pass overrides; ``warnings`` lists keys
    that were ignored while loading (not part of equality).
    """
    __slots__ = ("_values", "second_pass", "warnings")

    def __init__(self, values: Mapping[str, Any] | None = None, *, second_pass: Mapping[str, Any] | None = None,
                 warnings: Iterable[str] = ()):
        """Build from *our* field names; missing fields take their defaults, every value is validated."""
        vals = {f.name: f.default for f in FIELDS}
        for k, v in (values or {}).items():
            if k not in _BY_NAME:
                raise SettingsError(k, f"unknown setting{_did_you_mean(k)}")
            vals[k] = v
        vals = {k: _BY_NAME[k].validate(v) for k, v in vals.items()}
        sp: dict[str, Any] = {}
        for k, v in (second_pass or {}).items():
            f = _BY_NAME.get(k)
            if f is None or not f.second_pass:
                why = "unknown setting" if f is None else "cannot differ in the 2nd pass"
                raise SettingsError(f"{_PASS2_OURS}.{k}", f"{why}; the 2nd pass may override only "
                                    f"{', '.join(x.name for x in second_pass_fields())}")
            try:
                v = f.validate(v)
            except SettingsError as e:
                raise SettingsError(f"{_PASS2_OURS}.{k}", str(e).split(": ", 1)[1]) from None
            if v != vals[k]:
                sp[k] = v
        object.__setattr__(self, "_values", vals)
        object.__setattr__(self, "second_pass", {k: sp[k] for k in _BY_NAME if k in sp})
        object.__setattr__(self, "warnings", tuple(warnings))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Settings has no field {name!r}{_did_you_mean(name)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings is immutable; use with_overrides()")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        return self._values == other._values and self.second_pass == other.second_pass

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):   # pickle/copy: rebuild through the validating constructor
        return (_restore, (self._values, self.second_pass, self.warnings))

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self.non_defaults().items())
        return f"Settings({changed}{', second_pass=' + repr(self.second_pass) if self.second_pass else ''})"

    @property
    def values(self) -> dict[str, Any]:
        """A copy of every value by our field name."""
        return dict(self._values)

    def non_defaults(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if v != _BY_NAME[k].default}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def defaults(cls) -> Settings:
        return cls()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = False) -> Settings:
        """Read our keys and TrainTrain's; unknown keys become ``warnings`` (``strict``: an error)."""
        if not isinstance(d, Mapping):
            raise SettingsError("settings", f"expected a JSON object of settings, got {type(d).__name__}")
        warnings: list[str] = []
        version = d.get(_VERSION_KEY, SETTINGS_VERSION)
        if not isinstance(version, int) or version > SETTINGS_VERSION:
            raise SettingsError(_VERSION_KEY, f"{version!r} is newer than this version of Shinkansen "
                                f"understands ({SETTINGS_VERSION}); update Shinkansen")
        top = {k: v for k, v in d.items() if k not in (_PASS2_OURS, _PASS2_TT, _VERSION_KEY)}
        values = _collect(top, strict, warnings, "")
        pass2: dict[str, Any] = {}
        for key in (_PASS2_OURS, _PASS2_TT):
            nested = d.get(key)
            if nested is None:
                continue
            if not isinstance(nested, Mapping):
                raise SettingsError(key, "must be an object of 2nd-pass settings")
            # TrainTrain writes a full copy of every field under "2nd pass" and ignores the
            # ones the 2nd pass cannot change; under our key such a field is a mistake.
            pass2.update(_collect(nested, strict, warnings, key + ".", only_pass2=(key == _PASS2_OURS),
                                  skip_other=(key == _PASS2_TT)))
            # TrainTrain's visible switch lives in the 2nd-pass copy (the top-level one is a hidden
            # dummy its UI exports as false); its older files set the top-level one instead.
            switch = nested.get("use_2nd_pass_settings") if key == _PASS2_TT else None
            if switch is not None and _BY_NAME["use_2nd_pass_settings"].validate(switch):
                values["use_2nd_pass_settings"] = True
        return cls(values, second_pass=pass2, warnings=warnings)

    @classmethod
    def from_json(cls, path: str | os.PathLike, *, strict: bool = False) -> Settings:
        """Load a settings/preset JSON file (ours or TrainTrain's)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise UserError(f"settings file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read settings file {p}: {e}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{p} is not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(data, strict=strict)

    # -- output -------------------------------------------------------------------------------
    def to_dict(self, aliases: str = "ours") -> dict[str, Any]:
        """JSON-ready dict. ``"ours"``: our names, native types, sparse ``second_pass``.
        ``"traintrain"``: TrainTrain's keys and value shapes for its fields (our extra fields under
        our names, which TrainTrain ignores) and, for Difference, the full ``"2nd pass"`` copy it
        expects -- so the file also loads in TrainTrain."""
        if aliases == "ours":
            out = {f.name: f.to_json(self._values[f.name]) for f in FIELDS}
            out[_PASS2_OURS] = {k: _BY_NAME[k].to_json(v) for k, v in self.second_pass.items()}
            out[_VERSION_KEY] = SETTINGS_VERSION
            return out
        if aliases != "traintrain":
            raise ValueError(f"aliases must be 'ours' or 'traintrain', not {aliases!r}")
        out = {f.traintrain or f.name: f.to_json(self._values[f.name], "traintrain") for f in FIELDS}
        if self.mode == _D or self.second_pass:
            p2 = Settings(self._values | self.second_pass)
            out[_PASS2_TT] = {f.traintrain or f.name: f.to_json(p2._values[f.name], "traintrain")
                              for f in FIELDS if f.name not in _JOB_FIELDS}
        return out

    def to_json(self, path: str | os.PathLike, aliases: str = "ours") -> Path:
        """Write atomically (temp file + rename): a crash never leaves half a file."""
        return write_json_atomic(path, self.to_dict(aliases))

    # -- derived copies ------------------------------------------------------------------------
    def with_overrides(self, **kv: Any) -> Settings:
        """A copy with fields replaced (our names; ``second_pass=`` replaces the 2nd-pass overrides)."""
        pass2 = kv.pop(_PASS2_OURS, None)
        for k in kv:
            if k not in _BY_NAME:
                raise SettingsError(k, f"unknown setting{_did_you_mean(k)}")
        values = self._values | kv
        if pass2 is None:   # keep the effective 2nd-pass values of the overrides we had
            pass2 = self.second_pass
        return Settings(values, second_pass=pass2, warnings=self.warnings)

    def fitted_to(self, native_size: tuple[int, int]) -> Settings:
        """A copy sized for a model that draws at ``native_size``: the image size, and bucket step and
        shortest bucket side no larger than it. The schema's defaults are SD1.5's 512 px; a form starting
        on the 64 px embedded model must not offer values that cannot fit it."""
        side = min(native_size)
        return self.with_overrides(image_size=tuple(native_size),
                                   image_buckets_step=min(self.image_buckets_step, side),
                                   image_min_length=min(self.image_min_length, side))

    def apply_set_args(self, args: Iterable[str]) -> Settings:
        """Apply CLI ``--set key=value`` strings; keys may be ours, TrainTrain's, or
        ``second_pass.KEY`` / ``2nd pass.KEY`` for a 2nd-pass override."""
        values: dict[str, Any] = {}
        pass2 = dict(self.second_pass)
        for arg in args:
            if "=" not in arg:
                raise SettingsError("--set", f"{arg!r} is not key=value; write e.g. train_learning_rate=2e-4")
            key, raw = arg.split("=", 1)
            key = key.strip()
            target, prefix = values, ""
            for p in (_PASS2_OURS + ".", _PASS2_TT + "."):
                if key.startswith(p):
                    key, target, prefix = key[len(p):], pass2, _PASS2_OURS + "."
            f = _BY_KEY.get(key)
            if f is None:
                raise SettingsError(prefix + key, f"unknown setting{_did_you_mean(key)}")
            if prefix and not f.second_pass:
                raise SettingsError(prefix + f.name, "cannot differ in the 2nd pass")
            try:
                target[f.name] = f.validate(raw)
            except SettingsError as e:
                raise SettingsError(prefix + f.name, str(e).split(": ", 1)[1]) from None
        return Settings(self._values | values, second_pass=pass2, warnings=self.warnings)

    def for_second_pass(self) -> Settings:
        """Settings of Difference's pass 2: the overrides applied when ``use_2nd_pass_settings`` is on
        (only 2nd-pass fields can differ); otherwise pass 2 uses the pass-1 settings unchanged."""
        if not self.use_2nd_pass_settings or not self.second_pass:
            return Settings(self._values, warnings=self.warnings)
        return Settings(self._values | self.second_pass, warnings=self.warnings)

    # -- run checks ------------------------------------------------------------------------------
    def problems(self, *, check_files: bool = True) -> list[SettingsError]:
        """Every cross-field problem that stops a run (empty = ready). ``check_files`` also checks
        that the folders/files named exist (off when they belong to another machine)."""
        out = _run_problems(self, "", check_files)
        if self.mode == _D and self.use_2nd_pass_settings:
            first = {str(e).split(": ", 1)[1] for e in out}
            out += [e for e in _run_problems(self.for_second_pass(), _PASS2_OURS + ".", False, pass2_only=True)
                    if str(e).split(": ", 1)[1] not in first]
        return out

    def advice(self) -> list[str]:
        """Settings that run but almost surely not as meant: one line each naming the field and the fix.
        Warnings, not errors (an expert may mean them); shown when a job is added and when it starts."""
        out = _advice(self, "") + _workflow_advice(self)
        if self.mode == _D and self.use_2nd_pass_settings:
            out += [a for a in _advice(self.for_second_pass(), _PASS2_OURS + ".")
                    if a.split(": ", 1)[1] not in {b.split(": ", 1)[1] for b in out}]
        return out

    def validate_for_run(self, *, check_files: bool = True) -> None:
        """Raise the first of :meth:`problems` (each names its field and the fix)."""
        problems = self.problems(check_files=check_files)
        if problems:
            raise problems[0]


def _restore(values: dict, second_pass: dict, warnings: tuple) -> Settings:
    return Settings(values, second_pass=second_pass, warnings=warnings)


def _collect(d: Mapping[str, Any], strict: bool, warnings: list[str], prefix: str, *,
             only_pass2: bool = False, skip_other: bool = False) -> dict[str, Any]:
    """Map keys (ours or TrainTrain's) of one level to our names, validating each value."""
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, raw in d.items():
        f = _BY_KEY.get(key)
        if f is None:
            if key in IGNORED_KEYS:
                if raw not in ("", None, False, "None") and not skip_other:
                    warnings.append(f"{prefix}{key}: ignored ({IGNORED_KEYS[key]})")
                continue
            if strict:
                raise SettingsError(prefix + key, f"unknown setting{_did_you_mean(key)}")
            warnings.append(f"{prefix}{key}: unknown setting, ignored{_did_you_mean(key)}")
            continue
        if not f.second_pass and (only_pass2 or skip_other):
            if skip_other:
                continue
            raise SettingsError(prefix + f.name, "cannot differ in the 2nd pass; the 2nd pass may override only "
                                f"{', '.join(x.name for x in second_pass_fields())}")
        try:
            v = f.validate(raw)
        except SettingsError as e:
            raise SettingsError(prefix + f.name, str(e).split(": ", 1)[1]) from None
        if f.name in out and out[f.name] != v:
            raise SettingsError(prefix + f.name, f"given twice with different values (as {seen[f.name]!r} and "
                                f"{key!r}); keep one")
        out[f.name], seen[f.name] = v, key
    return out


def _run_problems(s: Settings, prefix: str, check_files: bool, pass2_only: bool = False) -> list[SettingsError]:
    errs: list[SettingsError] = []

    def err(name: str, msg: str) -> None:
        if not pass2_only or _BY_NAME[name].second_pass:
            errs.append(SettingsError(prefix + name, msg))

    if s.train_min_timesteps >= s.train_max_timesteps:
        err("train_min_timesteps", f"{s.train_min_timesteps} must be below train_max_timesteps "
            f"({s.train_max_timesteps}); e.g. 0 and 1000")
    if s.train_lr_scheduler == "piecewise_constant" and not s.train_lr_step_rules:
        err("train_lr_step_rules", "piecewise_constant needs rules; write e.g. 1:100,0.5:200,0.1")
    if s.train_lr_warmup_steps >= s.train_iterations and not (s.mode == _L and s.train_epochs):
        err("train_lr_warmup_steps", f"{s.train_lr_warmup_steps} must be below train_iterations "
            f"({s.train_iterations})")
    if not any(b != "BASE" for b in s.network_blocks):
        err("network_blocks", "BASE alone trains no UNet layer; select at least one IN, M00 or OUT block")
    if s.sample_every_n_steps > 0 and not s.sample_prompts:
        err("sample_prompts", "sample_every_n_steps is on but there is no prompt; add one per line or set "
            "sample_every_n_steps to 0")
    given = {n: len(getattr(s, n).split(",")) for n in ("block_dims", "block_alphas", "block_lr_weight")
             if getattr(s, n)}
    if len(set(given.values())) > 1:
        err("block_alphas" if "block_alphas" in given else "block_lr_weight", "per-block lists differ in length ("
            + ", ".join(f"{n} {k}" for n, k in given.items()) + "); use 25 values for SD1/SD2 or 23 for SDXL in all")
    if s.block_lr_weight and not any(float(x) for x in s.block_lr_weight.split(",")) and "BASE" not in s.network_blocks:
        err("block_lr_weight", "every block is frozen (all 0), so nothing would be trained")
    if s.mode == _L and s.sample_every_n_epochs > 0 and not s.sample_prompts:
        err("sample_prompts", "sample_every_n_epochs is on but there is no prompt; add one per line or set "
            "sample_every_n_epochs to 0")
    missing = missing_optimizer_package(s.train_optimizer)
    if missing:
        err("train_optimizer", missing)
    if s.mode == _L and s.validation_split > 0 and s.validation_directory:
        err("validation_split", "set validation_split or validation_directory, not both")
    if s.mode == _L and s.validate_every_n_steps > 0 and not (s.validation_split > 0 or s.validation_directory):
        err("validate_every_n_steps", "there are no validation images; set validation_split (e.g. 0.1) or "
            "validation_directory, or set validate_every_n_steps to 0")
    if check_files and s.mode == _L and s.validation_directory and not Path(s.validation_directory).is_dir():
        err("validation_directory", f"folder not found: {s.validation_directory}")
    if s.log_with == "tensorboard":
        from .tblog import missing_tensorboard
        if missing_tensorboard():
            err("log_with", missing_tensorboard())
    if pass2_only:
        return errs
    mode = s.mode
    if mode in (_L, _M) and not s.lora_data_directory:
        err("lora_data_directory", f"{mode} needs a folder of images; enter its path")
    if mode == _M and not s.diff_target_name:
        err("diff_target_name", "Multi-ADDifT needs the suffix naming each pair's target, e.g. _after")
    if mode == _I and not s.original_prompt.strip():
        err("original_prompt", "iLECO needs the prompt to change; enter it (the target may stay empty)")
    if mode in (_D, _A):
        needs_original = not (mode == _D and s.diff_load_1st_pass)
        if needs_original and not s.original_image:
            err("original_image", f"{mode} needs the original image; enter its path")
        if not s.target_image and not (mode == _D and s.diff_1st_pass_only):
            err("target_image", f"{mode} needs the target image; enter its path")
    if mode == _D and s.diff_1st_pass_only and s.diff_load_1st_pass:
        err("diff_1st_pass_only", "with diff_load_1st_pass set there is no pass 1 to train; turn one of them off")
    if check_files:
        used = {f.name for f in fields_for_mode(mode)}
        for name, is_dir in (("lora_data_directory", True), ("lora_reg_directory", True),
                             ("original_image", False), ("target_image", False),
                             ("network_resume", False), ("train_resume_state", False)):
            path = getattr(s, name)
            if name in used or name == "train_resume_state":
                if path and not (Path(path).is_dir() if is_dir else Path(path).is_file()):
                    err(name, f"{'folder' if is_dir else 'file'} not found: {path}")
    return errs


def _advice(s: Settings, prefix: str) -> list[str]:
    """Adaptive optimizers at an ordinary learning rate (the one case kohya warns about the same way)."""
    if s.train_optimizer not in ADAPTIVE_LR_OPTIMIZERS:
        return []
    rates = [("train_learning_rate", s.train_learning_rate)]
    if s.mode == _L and "BASE" in s.network_blocks and s.train_textencoder_learning_rate is not None:
        rates.append(("train_textencoder_learning_rate", s.train_textencoder_learning_rate))
    return [f"{prefix}{name}: {_num_text(lr)} is too low for {s.train_optimizer}, which sets its own step size "
            f"and uses the learning rate as a multiplier on it; set {name}=1 (kohya's advice)"
            for name, lr in rates if lr <= ADAPTIVE_LR_FLOOR]


def _workflow_advice(s: Settings) -> list[str]:
    """Epochs deciding over a changed train_iterations; a trigger word that caption options can move or drop."""
    if s.mode != _L:
        return []
    out = []
    if s.train_epochs and s.train_iterations != _BY_NAME["train_iterations"].default:
        out.append(f"train_iterations: {s.train_iterations} is not used because train_epochs={s.train_epochs} "
                   "decides the run's length (the steps are derived from the images and printed when the run "
                   "starts); empty train_epochs to count in iterations")
    if (s.lora_trigger_word and (s.shuffle_caption or s.caption_tag_dropout_rate > 0) and s.keep_tokens < 1
            and not s.keep_tokens_separator):
        out.append(f"keep_tokens: 0 lets shuffle_caption/caption_tag_dropout_rate move or drop the trigger word "
                   f"{s.lora_trigger_word!r} (the first tag); set keep_tokens=1 to keep it first, as kohya users do")
    return out


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON via a temp file in the same folder and an atomic rename."""
    p = Path(path)
    with atomic_path(p) as tmp, open(tmp, "x", encoding="utf-8") as fh:
        json.dump(data, fh, indent=4, ensure_ascii=False)
        fh.write("\n")
    return p
