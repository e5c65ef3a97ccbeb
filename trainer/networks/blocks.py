"""Per-block ranks, alphas and learning-rate weights in kohya's syntax (``block_dims``, ``block_alphas``,
``block_lr_weight``).

kohya-ss/sd-scripts ``networks/lora.py`` (read at commit 48d368f) numbers the UNet in *slots*, one value
each, comma-separated:

- SD1/SD2: 25 slots = IN00–IN11 (0–11), MID (12), OUT00–OUT11 (13–24). Slot 0 (IN00) holds only
  ``conv_in``, which never gets a module, but its value must still be written.
- SDXL: 23 slots = 0 (time/label embedding: never a module), IN00–IN08 (1–9), the three parts of the
  middle block (10–12: res block, transformer, res block), OUT00–OUT08 (13–21), 22 (``out``: never a module).

In words, what each list does (kohya's semantics):

- ``block_dims``: the rank of every Linear and 1×1-conv module in that slot; 0 = no module there. 3×3
  convs (c3lier/LoHa/LoKr) keep ``network_conv_rank`` (kohya's separate ``conv_block_dims`` is not offered).
- ``block_alphas``: the alpha of those modules (0 = the rank, i.e. scale 1, as kohya's modules do).
- ``block_lr_weight``: the UNet learning rate of the slot's modules is multiplied by it. kohya builds the
  same 25/23-long list from ``down_lr_weight`` (IN slots), ``mid_lr_weight`` and ``up_lr_weight`` (OUT slots),
  padding SDXL's two module-less slots with 1. Here a weight of 0 *freezes* the slot (kept, not trained: a
  ``network_resume`` LoRA keeps its weights there); kohya instead drops such modules, which
  ``block_dims`` 0 does here. kohya's LoRA+ (``loraplus_lr_ratio``) would multiply the ``lora_up`` part of
  each group once more; it composes with these weights and is not part of this module.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import UserError

#: Values per list: kohya's SD1/SD2 form and its SDXL form.
COUNT_SD, COUNT_SDXL = 25, 23
COUNTS = (COUNT_SD, COUNT_SDXL)


def parse_values(text: str, name: str, integer: bool = False) -> Optional[tuple]:
    """``"4,4,0,…"`` → a tuple of numbers (None for empty); a problem → :class:`UserError` naming ``name``.

    Only the syntax kohya accepts: numbers separated by commas (spaces ignored), none negative, 25 or 23 of
    them. Which of the two counts fits is known once the model is (see :func:`slot_values`)."""
    text = (text or "").strip()
    if not text:
        return None
    items = [x.strip() for x in text.split(",")]
    out = []
    for i, item in enumerate(items):
        try:
            v = float(item)
            if integer and not v.is_integer():
                raise ValueError
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise UserError(f"{name}: value {i + 1} ({item!r}) is not {kind}; write {COUNT_SD} (SD1/SD2) or "
                            f"{COUNT_SDXL} (SDXL) comma-separated values like 4,4,8,…") from None
        if v < 0:
            raise UserError(f"{name}: value {i + 1} is negative ({item}); use 0 or more")
        out.append(int(v) if integer else v)
    if len(out) not in COUNTS:
        raise UserError(f"{name}: {len(out)} values; kohya's syntax has {COUNT_SD} for SD1/SD2 (IN00-IN11, MID, "
                        f"OUT00-OUT11) or {COUNT_SDXL} for SDXL (embedding, IN00-IN08, 3 mid, OUT00-OUT08, out)")
    return tuple(out)


def canonical(text: str) -> str:
    """The comma list without spaces (so equal settings compare equal)."""
    return ",".join(x.strip() for x in (text or "").split(",")) if (text or "").strip() else ""


def slot_count(family: str, unet) -> int:
    """Slots of this UNet in kohya's numbering (25 for SD1/SD2, 23 for SDXL; smaller UNets alike)."""
    n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
    return (1 + n_in + 3 + n_out + 1) if family == "sdxl" else (n_in + 1 + n_out)


def slot_of(path: str, family: str, unet) -> int:
    """kohya's slot index of a UNet module path (ours, ldm-style), as ``get_block_index``."""
    head = path.split(".")
    n_in = len(unet.input_blocks)
    sdxl = family == "sdxl"
    if head[0] == "input_blocks":
        return int(head[1]) + (1 if sdxl else 0)
    if head[0] == "middle_block":
        return 1 + n_in + int(head[1]) if sdxl else n_in
    if head[0] == "output_blocks":
        return int(head[1]) + (1 + n_in + 3 if sdxl else n_in + 1)
    raise ValueError(f"{path}: not inside a UNet block")


def slot_names(family: str, unet) -> list[str]:
    """A name per slot (for messages, optimizer groups and metadata)."""
    ins = [f"IN{i:02d}" for i in range(len(unet.input_blocks))]
    outs = [f"OUT{i:02d}" for i in range(len(unet.output_blocks))]
    if family == "sdxl":
        return ["EMB", *ins, "M00", "M01", "M02", *outs, "OUT"]
    return [*ins, "MID", *outs]


def check_count(values: Optional[Sequence], name: str, family: str, unet) -> None:
    """The list's length against this model: the one-line error when an SDXL list meets an SD1 model."""
    if values is None:
        return
    want = slot_count(family, unet)
    if len(values) != want:
        form = "SDXL" if family == "sdxl" else "SD1/SD2"
        raise UserError(f"{name}: {len(values)} values, but this {family} model needs {want} ({form} form: "
                        f"{', '.join(slot_names(family, unet)[:2])}, … {slot_names(family, unet)[-1]})")


def kohya_lr_weight_args(weights: Sequence[float], family: str, unet) -> dict[str, str]:
    """kohya's ``down_lr_weight``/``mid_lr_weight``/``up_lr_weight`` network args for a slot list."""
    n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
    first = 1 if family == "sdxl" else 0
    mid = 3 if family == "sdxl" else 1
    text = lambda xs: ",".join(f"{x:g}" for x in xs)   # noqa: E731
    return {"down_lr_weight": text(weights[first:first + n_in]),
            "mid_lr_weight": text(weights[first + n_in:first + n_in + mid]),
            "up_lr_weight": text(weights[first + n_in + mid:first + n_in + mid + n_out])}
