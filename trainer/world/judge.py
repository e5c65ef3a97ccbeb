"""Measure toy-world images: which colour, shape and size is drawn, and how much area it covers.

Tests of training modes ask "did 'a small blue triangle' give a small blue triangle?", so
the judge must be right on clean renders *and* on the soft, slightly noisy images a small
diffusion model produces. Pipeline per image:

1. background = median border colour (estimated, never assumed: generated backgrounds drift);
2. foreground = the largest 4-connected component of pixels far (RGB distance > 40) from it;
3. object colour = median of the component's most contrasted pixels (its interior, so the
   anti-aliased rim does not pull it toward the background) → nearest ``toy.COLORS``
   prototype;
4. per-pixel coverage = projection of (pixel - background) onto (object - background),
   clipped to [0, 1], summed around the component → ``area`` (continuous, for sliders);
5. ``size`` from the object's extent (larger side of the half-coverage bounding box):
   small objects span ≤ 20 px, large ones ≥ 34 px at 64 px (triangles: height ≥ 29.4 px),
   so the threshold is their geometric midpoint ``EXTENT_THRESHOLD`` = 26 px (scaled with the
   image size). The extent ratio between classes (1.7) is far safer than the area ratio
   (largest small object 0.098 of the image, smallest large one 0.122: midpoint
   ``SIZE_AREA_THRESHOLD`` = 0.110), and it does not depend on the shape being right;
6. ``shape`` from a tiny CNN on the coverage map cropped around the object and resized to
   32×32, so it ignores colour, position and scale. Its weights (~17 KB) ship in
   ``assets/judge``; ``python -m trainer.world.judge --train`` rebuilds them bit for bit.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ..atomic import atomic_path
from . import toy

try:  # optional: fast labelling; the numpy fallback gives identical components
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - depends on the environment
    _ndimage = None

WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "assets" / "judge" / "shape_classifier.safetensors"
FG_THRESHOLD = 40.0           # RGB distance: noise ±10 gives ≤ 17; weakest object/background (purple/gray) 116
MIN_FG_FRACTION = 16 / 4096   # fewer foreground pixels than this is "nothing drawn" (smallest object ≈ 85)
EXTENT_THRESHOLD = 26.0       # px at 64 px: ≈ sqrt(20 × 34), see the module docstring
SIZE_AREA_THRESHOLD = 0.110   # area-fraction midpoint between the classes (documentation / fallback)
CROP = 32                     # classifier input side
CROP_MARGIN = 1.2             # crop side = margin × extent + 2 px, so the outline is never cut
TRAIN_SEED = 1234
TRAIN_IMAGES = 6000
TRAIN_STEPS = 1200


# ----------------------------------------------------------------------------- components

def _largest_component_numpy(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component by min-label propagation with pointer jumping.

    Labels are flat indices of pixels in the same component, so ``lab[lab]`` only ever
    moves a label to a smaller index of its own component; ties go to the component whose
    first pixel (raster order) comes first, as with scipy's labelling.
    """
    h, w = mask.shape
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[new], big)
        if np.array_equal(new, lab):
            break
        lab = new
    counts = np.bincount(lab[mask], minlength=big)
    return lab == int(np.argmax(counts))


def _largest_component_scipy(mask: np.ndarray) -> np.ndarray:
    lab, n = _ndimage.label(mask)  # default structure: 4-connectivity in 2-D
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component of ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    if _ndimage is not None:
        return _largest_component_scipy(mask)
    return _largest_component_numpy(mask)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        m = out.copy()
        m[1:] |= out[:-1]
        m[:-1] |= out[1:]
        m[:, 1:] |= out[:, :-1]
        m[:, :-1] |= out[:, 1:]
        out = m
    return out


# ----------------------------------------------------------------------------- inputs

def _as_float_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32)
    return np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0  # float images are in [0, 1]


def to_arrays(images: Any) -> list[np.ndarray]:
    """PIL images, uint8 arrays (HWC / NHWC), float arrays or tensors in [0, 1] (also CHW /
    NCHW), or lists of them → list of float32 HxWx3 arrays in 0..255."""
    if isinstance(images, Image.Image):
        return [np.asarray(images.convert("RGB"), dtype=np.float32)]
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [_as_float_rgb(a) for a in images]
        return [_as_float_rgb(images)]
    out: list[np.ndarray] = []
    for item in images:
        out.extend(to_arrays(item))
    return out


# ----------------------------------------------------------------------------- measuring

@dataclass
class Measure:
    """Everything the judge computes before the shape classifier."""
    background_rgb: np.ndarray
    fg_found: bool
    color_rgb: np.ndarray | None = None
    coverage: np.ndarray | None = None      # HxW in [0, 1], zero outside the object's region
    area: float = 0.0
    extent: float = 0.0
    bbox_center: tuple[float, float] | None = None


def measure(img: np.ndarray) -> Measure:
    """Background, foreground colour, coverage, area and extent of one float RGB image."""
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    comp = largest_component(dist > FG_THRESHOLD)
    if comp.sum() < MIN_FG_FRACTION * h * w:
        return Measure(background_rgb=bg, fg_found=False)
    d_in = dist[comp]
    core = comp & (dist >= 0.8 * np.percentile(d_in, 90))
    fg = np.median(img[core], axis=0)
    v = fg - bg
    cov = np.clip(((img - bg) @ v) / max(float(v @ v), 1e-6), 0.0, 1.0)
    cov = np.where(_dilate(comp, 2), cov, 0.0).astype(np.float32)
    half = cov > 0.5
    if not half.any():
        half = comp
    ys, xs = np.nonzero(half)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return Measure(background_rgb=bg, fg_found=True, color_rgb=fg, coverage=cov,
                   area=float(cov.sum(dtype=np.float64)) / (h * w),
                   extent=float(max(x1 - x0, y1 - y0)) * 64 / w,
                   bbox_center=((x0 + x1) / 2, (y0 + y1) / 2))


def _nearest(rgb: np.ndarray, table: Mapping[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(table)
    d = np.linalg.norm(np.asarray([table[n] for n in names], np.float32) - rgb, axis=1)
    i = int(np.argmin(d))
    return names[i], float(d[i])


def crop_theta(center: tuple[float, float], extent_px: float, size: tuple[int, int],
               angle: float = 0.0, zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
               ) -> np.ndarray:
    """2×3 affine_grid matrix for a square crop around the object (optionally rotated)."""
    h, w = size
    side = (CROP_MARGIN * extent_px + 2.0) * zoom
    cx, cy = center[0] + shift[0], center[1] + shift[1]
    c, s = math.cos(angle), math.sin(angle)
    sx, sy = side / w, side / h
    return np.array([[c * sx, -s * sx, 2 * cx / w - 1], [s * sy, c * sy, 2 * cy / h - 1]], np.float32)


def crops(coverages: Sequence[np.ndarray], thetas: Sequence[np.ndarray]) -> torch.Tensor:
    """Bilinear 32×32 crops (N,1,32,32) of coverage maps, one affine matrix each."""
    if not coverages:
        return torch.zeros(0, 1, CROP, CROP)
    x = torch.from_numpy(np.stack(coverages)[:, None].astype(np.float32))
    theta = torch.from_numpy(np.stack(thetas))
    grid = F.affine_grid(theta, [len(coverages), 1, CROP, CROP], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------- classifier

class ShapeNet(torch.nn.Module):
    """Three conv+pool stages and a linear head: ~4.3 k parameters are plenty for 3 outlines."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, len(toy.SHAPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.fc(x.flatten(1))


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels, seeded RNG; the caller's settings come back after."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def _degrade(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Half the training images are blurred and noised like a small model's samples."""
    if rng.random() < 0.5:
        return np.asarray(image, np.float32)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    noise = rng.uniform(-1, 1, size=(image.height, image.width, 3)) * rng.uniform(0, 15)
    return np.clip(np.rint(np.asarray(image, np.float32) + noise), 0, 255).astype(np.float32)


def training_data(seed: int = TRAIN_SEED, n_images: int = TRAIN_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """World renders → judge measurements → augmented crops (jittered zoom, shift, ±20° turn)."""
    rng = np.random.default_rng(seed)
    covs, thetas, labels = [], [], []
    while len(labels) < n_images:
        s = toy.sample_world(rng, drop_p=0.0, empty_p=0.0)
        img = _degrade(s.image, rng)
        m = measure(img)
        jitter = rng.uniform(-1, 1, size=4)
        if not m.fg_found:
            continue
        covs.append(m.coverage)
        thetas.append(crop_theta(m.bbox_center, m.extent * img.shape[1] / 64, img.shape[:2],
                                 angle=math.radians(20) * jitter[0], zoom=1 + 0.15 * jitter[1],
                                 shift=(jitter[2], jitter[3])))
        labels.append(toy.SHAPES.index(s.shape))
    return crops(covs, thetas), torch.tensor(labels)


def train_classifier(seed: int = TRAIN_SEED, n_images: int = TRAIN_IMAGES, steps: int = TRAIN_STEPS,
                     batch: int = 64) -> dict[str, torch.Tensor]:
    """Train the shape classifier; bit-identical for identical arguments on one machine."""
    x, y = training_data(seed, n_images)
    with _deterministic(seed):
        net = ShapeNet().float()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1))
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(y), generator=gen)
        pos = 0
        for _ in range(steps):
            if pos + batch > len(y):
                order, pos = torch.randperm(len(y), generator=gen), 0
            idx = order[pos:pos + batch]
            pos += batch
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def save_classifier(state: Mapping[str, torch.Tensor], path: Path = WEIGHTS_PATH, **meta: Any) -> None:
    """Write float32 safetensors with a sorted header, so a rebuild is byte-identical
    (the safetensors writer orders metadata by hash, which differs run to run)."""
    header: dict[str, Any] = {"__metadata__": {k: str(v) for k, v in sorted(meta.items())}}
    blobs, offset = [], 0
    for name in sorted(state):
        data = state[name].detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(state[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_path(path) as tmp:
        tmp.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@functools.lru_cache(maxsize=4)
def load_classifier(path: str | None = None) -> ShapeNet:
    """The shipped classifier (cached: loaded once per process)."""
    from safetensors.torch import load_file
    p = Path(path) if path else WEIGHTS_PATH
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing; run `python -m trainer.world.judge --train`")
    net = ShapeNet().float()
    net.load_state_dict(load_file(str(p)))
    return net.eval()


# ----------------------------------------------------------------------------- judging

@dataclass
class Judgement:
    """What one image shows. color/shape/size are None when nothing is drawn."""
    fg_found: bool
    color: str | None
    shape: str | None
    size: str | None
    area: float                      # foreground fraction of the image (soft coverage sum)
    extent: float                    # larger bounding-box side in px at 64 px
    background: str                  # nearest of toy.BACKGROUNDS
    background_rgb: tuple[float, float, float]
    color_rgb: tuple[float, float, float] | None = None
    color_distance: float | None = None    # RGB distance to the chosen prototype (lower = surer)
    shape_probs: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def judge(images: Any, classifier: ShapeNet | None = None) -> list[Judgement]:
    """Judge one image or a batch (see ``to_arrays`` for accepted inputs)."""
    arrays = to_arrays(images)
    measures = [measure(a) for a in arrays]
    found = [i for i, m in enumerate(measures) if m.fg_found]
    probs = np.zeros((len(arrays), len(toy.SHAPES)), np.float32)
    if found:
        net = classifier or load_classifier()
        x = crops([measures[i].coverage for i in found],
                  [crop_theta(measures[i].bbox_center, measures[i].extent * arrays[i].shape[1] / 64,
                              arrays[i].shape[:2]) for i in found])
        with torch.no_grad():
            probs[found] = torch.softmax(net(x), dim=1).numpy()
    out = []
    for i, m in enumerate(measures):
        bg_name, _ = _nearest(m.background_rgb, toy.BACKGROUNDS)
        bg_rgb = tuple(float(c) for c in m.background_rgb)
        if not m.fg_found:
            out.append(Judgement(False, None, None, None, 0.0, 0.0, bg_name, bg_rgb))
            continue
        color, dist = _nearest(m.color_rgb, toy.COLORS)
        out.append(Judgement(
            fg_found=True, color=color, shape=toy.SHAPES[int(np.argmax(probs[i]))],
            size="large" if m.extent >= EXTENT_THRESHOLD else "small", area=m.area, extent=m.extent,
            background=bg_name, background_rgb=bg_rgb, color_rgb=tuple(float(c) for c in m.color_rgb),
            color_distance=dist, shape_probs={s: float(p) for s, p in zip(toy.SHAPES, probs[i])}))
    return out


def accuracy(judgements: Sequence[Judgement], expected: Mapping[str, Any]) -> dict[str, float]:
    """Fraction of judgements matching ``expected[attr]`` (one value for all, or one per image)."""
    result = {}
    for attr, want in expected.items():
        wants = [want] * len(judgements) if isinstance(want, str) or want is None else list(want)
        if len(wants) != len(judgements):
            raise ValueError(f"{attr}: {len(wants)} expected values for {len(judgements)} judgements")
        hits = sum(getattr(j, attr) == w for j, w in zip(judgements, wants))
        result[attr] = hits / len(judgements) if judgements else 0.0
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.world.judge IMG...`` prints judgements; ``--train`` rebuilds the weights."""
    p = argparse.ArgumentParser(prog="python -m trainer.world.judge", description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="*", help="image files to judge")
    p.add_argument("--train", action="store_true", help="retrain the shape classifier")
    p.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights file for --train")
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--steps", type=int, default=TRAIN_STEPS)
    p.add_argument("--n-images", type=int, default=TRAIN_IMAGES)
    a = p.parse_args(argv)
    if not a.train and not a.images:
        p.error("give image files or --train")
    if a.train:
        import time
        t = time.perf_counter()
        state = train_classifier(a.seed, a.n_images, a.steps)
        save_classifier(state, a.out, seed=a.seed, n_images=a.n_images, steps=a.steps)
        n = sum(v.numel() for v in state.values())
        print(f"wrote {a.out} ({n} parameters, {time.perf_counter() - t:.1f} s)")
    for path in a.images:
        with Image.open(path) as im:
            j = judge(im.convert("RGB"))[0]
        if j.fg_found:
            print(f"{path}: {j.size} {j.color} {j.shape} on {j.background} "
                  f"(area {j.area:.4f}, extent {j.extent:.1f} px, p(shape) {j.shape_probs[j.shape]:.3f})")
        else:
            print(f"{path}: nothing drawn (background {j.background})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
