"""Access to the golden data in ``../shared/reference`` (never copied into the repo).

The golden models store their weights as a *rule* (seeded normal draws) rather than
tensors; :func:`golden_state_dict` regenerates them and checks every tensor against
the recorded sum and first values before a test may use it, so a wrong regeneration
fails here and not as a confusing numeric mismatch later.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(os.environ.get("SHINKANSEN_REFERENCE",
                                Path(__file__).resolve().parents[1].parent / "shared" / "reference"))


def reference_dir() -> Path:
    """The reference folder; a missing one is an error, never a silent skip."""
    if not (REFERENCE / "README.md").is_file():
        raise FileNotFoundError(
            f"reference data not found at {REFERENCE}: the tests need ../shared/reference "
            "beside the checkout (or SHINKANSEN_REFERENCE pointing at it)")
    return REFERENCE


def load_json(rel: str) -> dict:
    with open(reference_dir() / rel, encoding="utf-8") as f:
        return json.load(f)


def load_tensors(rel: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(reference_dir() / rel))


def _rule_tensor(key: str, spec: dict) -> torch.Tensor:
    if "values" in spec:
        return torch.tensor(spec["values"], dtype=getattr(torch, spec["dtype"])).reshape(spec["shape"])
    shape = spec["shape"]
    numel = int(np.prod(shape)) if shape else 1
    seed = spec.get("seed", zlib.crc32(key.encode("utf-8")))
    z = np.random.RandomState(seed).standard_normal(numel)
    value = (spec["mean"] + spec["std"] * z).astype(np.float32).reshape(shape)
    t = torch.from_numpy(value)
    if abs(float(value.astype(np.float64).sum()) - spec["sum"]) > 1e-6 * max(1.0, abs(spec["sum"])) or \
            not np.array_equal(value.reshape(-1)[:3], np.asarray(spec["first"], dtype=np.float32)):
        raise AssertionError(f"regenerated golden weight {key} does not match its recorded checksum")
    return t


def golden_state_dict(weights: dict) -> dict[str, torch.Tensor]:
    """Rebuild a golden model's state dict from its ``weights`` table."""
    return {k: _rule_tensor(k, spec) for k, spec in weights.items()}
