"""One objective per mode; each module has ``prepare(settings)`` (model-free checks) and ``run(run)``.

A new mode is one file here plus its fields in the settings schema.
"""
from __future__ import annotations

import importlib

MODULES = {"LoRA": "lora", "iLECO": "ileco", "Difference": "difference", "ADDifT": "addift",
           "Multi-ADDifT": "addift"}


def mode_module(name: str):
    if name not in MODULES:
        from ..errors import UserError
        raise UserError(f"mode: {name} is not available yet (available: {', '.join(MODULES)})")
    return importlib.import_module(f".{MODULES[name]}", __name__)
