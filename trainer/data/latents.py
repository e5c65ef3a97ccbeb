"""Encode planned placements to latents once, optionally through a disk cache.

Decision: we keep the VAE posterior's **mean and std** (scaled by the model's scale factor)
rather than one frozen sample. kohya and TrainTrain cache a single ``latent_dist.sample()``,
which fixes one draw of the posterior noise for the whole run; keeping ``(mean, std)`` costs
one more tensor of the same small size and lets every step draw a fresh
``mean + std * eps`` exactly as un-cached SD training does (or use the mean, deterministic,
e.g. for ADDifT pairs). See :meth:`LatentSample.latent`.

The disk cache is one ``.safetensors`` file per (image bytes, bucket, flip, background,
mask, VAE) -- the image is identified by the sha256 of its file bytes, so renaming a file
keeps its cache and editing it invalidates it. Files are written to a temporary name and
``os.replace``-d, so a crash never leaves a half-written entry.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from .buckets import Size
from .discover import Placement, file_sha256, load_pixels

log = logging.getLogger(__name__)

CACHE_VERSION = "shinkansen-latents-1"   # bump when pixels or the stored layout change
Progress = Callable[[int, int], None]     # (done, total) placements


@dataclass
class LatentSample:
    """One encoded training sample (CPU float32 tensors, latent size ``bucket / 8``)."""
    mean: torch.Tensor                 # [C, h, w], scaled like the model's latents
    std: Optional[torch.Tensor]        # [C, h, w] or None (only the mean is known)
    caption: str
    mask: Optional[torch.Tensor]       # [1, h, w] in [0, 1] (alpha coverage) or None
    bucket: Size
    path: Path
    flip: bool = False
    repeats: int = 1
    sub: bool = False

    def latent(self, generator: Optional[torch.Generator] = None, sample: bool = True) -> torch.Tensor:
        """A posterior draw ``mean + std * eps`` (noise from ``generator``), or the mean."""
        if not sample or self.std is None:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * eps


def vae_identity(bundle) -> str:
    """sha256 of the VAE's weights (names, dtypes, shapes and bytes): the cache's model key."""
    vae = getattr(bundle, "vae", None)
    if vae is None:
        raise ValueError("this bundle has no .vae to hash: pass vae_id= to name its encoder")
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _encode(bundle, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled posterior (mean, std) from the bundle's VAE; mean only for bundles without one."""
    vae = getattr(bundle, "vae", None)
    if vae is not None and hasattr(vae, "encode") and hasattr(bundle, "scale_factor"):
        w = next(vae.parameters())
        post = vae.encode(x.to(w.device, w.dtype))
        s = float(bundle.scale_factor)
        return post.mean * s, post.std * s
    return bundle.encode_images(x, sample=False), None


def _cache_name(file_hash: str, p: Placement, vae_id: str) -> str:
    key = "|".join([CACHE_VERSION, file_hash, f"{p.bucket[0]}x{p.bucket[1]}", str(int(p.flip)),
                    ",".join(map(str, p.background)), str(int(p.alpha_mask and p.record.has_alpha)), vae_id])
    return hashlib.sha256(key.encode()).hexdigest()[:40] + ".safetensors"


def _load_cached(path: Path, p: Placement) -> Optional[tuple]:
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        mean = t["mean"]
        if tuple(mean.shape[-2:]) != (p.bucket[0] // 8, p.bucket[1] // 8):
            raise ValueError(f"latent shape {tuple(mean.shape)} does not fit bucket {p.bucket}")
        return mean, t.get("std"), t.get("mask")
    except Exception as e:  # a damaged entry is re-encoded and overwritten
        log.warning("ignoring unreadable latent cache entry %s: %s", path, e)
        return None


def _save_cached(path: Path, p: Placement, file_hash: str, vae_id: str, mean: torch.Tensor,
                 std: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> None:
    tensors = {"mean": mean.contiguous()}
    if std is not None:
        tensors["std"] = std.contiguous()
    if mask is not None:
        tensors["mask"] = mask.contiguous()
    meta = {"format": CACHE_VERSION, "source": p.record.rel, "file_sha256": file_hash,
            "bucket": f"{p.bucket[0]}x{p.bucket[1]}", "flip": str(int(p.flip)), "vae": vae_id}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _placement_key(p: Placement) -> tuple:
    return (str(p.record.path), p.bucket, p.flip, tuple(p.background), p.alpha_mask and p.record.has_alpha)


def encode_dataset(samples: Sequence[Placement], bundle, batch_size: int = 4,
                   cache_dir: Optional[os.PathLike | str] = None, progress: Optional[Progress] = None,
                   *, vae_id: Optional[str] = None) -> list[LatentSample]:
    """Encode every distinct (image, bucket, flip) once, in same-bucket batches.

    Runs under ``torch.no_grad()`` on whatever device and dtype the bundle's VAE has; moving
    the VAE off the device afterwards is the engine's job. Results are CPU float32 and come
    back in the order of ``samples``. With ``cache_dir`` each placement is loaded from disk
    when its key matches (``vae_id`` names the VAE; by default the hash of its weights).
    """
    batch_size = max(1, int(batch_size))
    unique: dict[tuple, Placement] = {}
    for p in samples:
        unique.setdefault(_placement_key(p), p)
    total, done = len(unique), 0
    results: dict[tuple, tuple] = {}
    cache = Path(cache_dir) if cache_dir is not None else None
    hashes: dict[str, str] = {}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        vae_id = vae_id or vae_identity(bundle)
        for k, p in unique.items():
            fh = hashes.setdefault(str(p.record.path), file_sha256(p.record.path))
            hit = _load_cached(cache / _cache_name(fh, p, vae_id), p)
            if hit is not None:
                results[k] = hit
        done = len(results)
        if progress and done:
            progress(done, total)
    groups: dict[Size, list[tuple]] = {}
    for k, p in unique.items():
        if k not in results:
            groups.setdefault(p.bucket, []).append(k)
    if groups:
        log.info("encoding %d latent(s) in %d bucket(s)%s", total - done, len(groups),
                 f" ({done} from cache)" if done else "")
    with torch.no_grad():
        for keys in groups.values():
            for start in range(0, len(keys), batch_size):
                chunk = keys[start:start + batch_size]
                loaded = [load_pixels(unique[k]) for k in chunk]
                x = torch.from_numpy(np.stack([px for px, _ in loaded]))
                mean, std = _encode(bundle, x)
                mean = mean.detach().float().cpu()
                std = std.detach().float().cpu() if std is not None else None
                for i, k in enumerate(chunk):
                    m = loaded[i][1]
                    mask = torch.from_numpy(m) if m is not None else None
                    entry = (mean[i].clone(), std[i].clone() if std is not None else None, mask)
                    results[k] = entry
                    if cache is not None:
                        p = unique[k]
                        fh = hashes[str(p.record.path)]
                        _save_cached(cache / _cache_name(fh, p, vae_id), p, fh, vae_id, *entry)
                done += len(chunk)
                if progress:
                    progress(done, total)
    out = []
    for p in samples:
        mean, std, mask = results[_placement_key(p)]
        out.append(LatentSample(mean, std, p.record.caption, mask, p.bucket, p.record.path,
                                p.flip, p.record.repeats, p.sub))
    return out
