"""Pretraining the embedded tiny model on the procedural shapes world (``trainer.world.toy``).

Two phases, as SD itself was built: first the VAE (pixel L1 + L2 and a tiny KL), then it
is frozen, a fixed set of world images is encoded once, and the UNet and the text encoder
are trained together on those latents with the SD noise schedule (ε-prediction, min-SNR
weighting, EMA of the weights). The result is written as a genuine SD1 checkpoint with its
YAML and tokenizer (``trainer/assets/tiny-sd``).

Deterministic for a seed on a given machine and thread count: every random draw comes from
generators whose states are saved in each checkpoint, so ``--resume`` continues to exactly
the result of an uninterrupted run. Run it in the background; it logs progress and ETA.

    python -m trainer.world.pretrain --work runs/pretrain --out trainer/assets/tiny-sd [--resume]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..atomic import atomic_path
from . import toy
from ..models.bundle import ModelBundle
from ..models.schedule import NoiseSchedule
from ..models.text_encoders import build_text_encoder
from ..models.tiny import tiny_config, tokenizer_vocab, write_model_files
from ..models.tokenizer import ClipTokenizer
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL


@dataclass
class PretrainConfig:
    seed: int = 0
    image_size: int = 64
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    n_latents: int = 120_000
    unet_steps: int = 12_000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup: int = 300
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.9995
    grad_clip: float = 1.0
    drop_p: float = 0.3
    empty_p: float = 0.1
    checkpoint_every: int = 200
    log_every: int = 50


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one (CPU since 2.4): the step costs a quarter."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kw)


def build_models(cfg: PretrainConfig):
    vocab, merges = tokenizer_vocab(toy.tokenizer_words())
    tok = ClipTokenizer(vocab, merges)
    model_cfg = tiny_config(len(vocab), tok.bos_id, tok.eos_id)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**model_cfg.vae.kwargs())
    unet = UNetModel(model_cfg.unet)
    te = build_text_encoder("sd1", model_cfg.text_encoders[0].config)
    return tok, model_cfg, vae, unet, te


def random_caption(attrs: dict, rng: np.random.Generator, drop_p: float, empty_p: float) -> str:
    """The world's caption rule (``toy.sample_world``) applied afresh to stored attributes."""
    drops = rng.random(4) < drop_p
    if rng.random() < empty_p:
        return ""
    if drops.all():
        drops[2] = False
    kept = [None if d else attrs[k] for d, k in zip(drops, ("size", "color", "shape", "background"))]
    return toy.compose_caption(shape=kept[2], color=kept[1], size=kept[0], background=kept[3])


def _images(samples) -> torch.Tensor:
    arr = np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Pretrainer:
    """Owns models, optimisers, generators and the work folder; ``run()`` resumes where it stopped."""

    def __init__(self, work: Path, cfg: PretrainConfig, log: Callable[[str], None] = print, device: str = "cpu"):
        self.work, self.cfg, self.log, self.device = Path(work), cfg, log, torch.device(device)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tok, self.model_cfg, self.vae, self.unet, self.te = build_models(cfg)
        for m in (self.vae, self.unet, self.te):
            m.to(self.device)
        self.schedule = NoiseSchedule().to(self.device)
        self.phase, self.step = "vae", 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.np_rng = np.random.default_rng(cfg.seed)
        self.vae_opt = _adamw(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.ema_unet: Optional[UNetModel] = None
        self.ema_te = None
        self.opt: Optional[torch.optim.Optimizer] = None
        self.latents: Optional[dict] = None
        self.scale_factor = 1.0
        self.history: list = []

    # ---------------------------------------------------------------- state
    @property
    def state_path(self) -> Path:
        return self.work / "state.pt"

    def save_state(self) -> None:
        state = {"config": asdict(self.cfg), "phase": self.phase, "step": self.step,
                 "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                 "unet": self.unet.state_dict(), "te": self.te.state_dict(),
                 "gen": self.gen.get_state(), "np_rng": json.dumps(self.np_rng.bit_generator.state),
                 "scale_factor": self.scale_factor, "history": json.dumps(self.history)}
        if self.opt is not None:
            state.update(opt=self.opt.state_dict(), ema_unet=self.ema_unet.state_dict(), ema_te=self.ema_te.state_dict())
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)

    def load_state(self, extend: bool = False) -> None:
        """Restore a checkpoint. ``extend`` lets a finished or running UNet phase continue to a larger
        ``unet_steps`` (the cosine schedule is recomputed for the new length); nothing else may change."""
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        saved = PretrainConfig(**state["config"])
        longer = extend and saved.unet_steps < self.cfg.unet_steps
        if longer and replace(saved, unet_steps=self.cfg.unet_steps) == self.cfg:
            self.log(f"extending the UNet phase from {saved.unet_steps} to {self.cfg.unet_steps} steps")
            if state["phase"] == "done":
                state["phase"], state["step"] = "unet", saved.unet_steps
        elif saved != self.cfg:
            raise SystemExit(f"{self.state_path}: saved with different settings {saved}; use the same ones to resume"
                             + (" (--extend only raises --unet-steps)" if extend else ""))
        self.phase, self.step = state["phase"], state["step"]
        self.vae.load_state_dict(state["vae"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet.load_state_dict(state["unet"])
        self.te.load_state_dict(state["te"])
        self.gen.set_state(state["gen"])
        self.np_rng.bit_generator.state = json.loads(state["np_rng"])
        self.scale_factor = state["scale_factor"]
        self.history = json.loads(state["history"])
        if "opt" in state:
            self._start_unet_phase()
            self.opt.load_state_dict(state["opt"])
            self.ema_unet.load_state_dict(state["ema_unet"])
            self.ema_te.load_state_dict(state["ema_te"])
        self.log(f"resumed at phase {self.phase}, step {self.step}")

    # ---------------------------------------------------------------- VAE
    def vae_step(self) -> float:
        cfg = self.cfg
        for group in self.vae_opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(self.step, cfg.vae_steps, cfg.warmup)
        x = _images([toy.sample_world(self.np_rng, cfg.image_size) for _ in range(cfg.vae_batch)]).to(self.device)
        post = self.vae.encode(x)
        rec = self.vae.decode(post.sample(self.gen) if self.device.type == "cpu" else post.mean)
        kl = 0.5 * (post.mean.square() + post.var - 1.0 - post.logvar).sum(dim=(1, 2, 3)).mean()
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + cfg.kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
        self.vae_opt.step()
        return loss.item()

    # ---------------------------------------------------------------- encode once
    @torch.no_grad()
    def encode_dataset(self) -> dict:
        """The UNet's training set: world images encoded once (posterior mean and std) plus labels."""
        path = self.work / "latents.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed + 1)
        self.vae.eval()
        means, stds, labels = [], [], {k: [] for k in ("shape", "color", "size", "background")}
        t0 = time.time()
        for start in range(0, cfg.n_latents, 256):
            samples = [toy.sample_world(rng, cfg.image_size) for _ in range(min(256, cfg.n_latents - start))]
            post = self.vae.encode(_images(samples).to(self.device))
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
            for k in labels:
                labels[k] += [getattr(s, k) for s in samples]
            if start % (256 * 40) == 0:
                self.log(f"encode {start}/{cfg.n_latents} ({time.time() - t0:.0f}s)")
        mean = torch.cat(means)
        data = {"mean": mean, "std": torch.cat(stds),
                "labels": {k: torch.tensor([toy.ATTRIBUTES[k].index(v) for v in vs]) for k, vs in labels.items()},
                "scale_factor": torch.tensor(1.0 / float(mean.std()))}
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        self.vae.train()
        return data

    # ---------------------------------------------------------------- UNet + text encoder
    def _start_unet_phase(self) -> None:
        cfg = self.cfg
        self.vae.requires_grad_(False).eval()
        params = list(self.unet.parameters()) + list(self.te.parameters())
        self.opt = _adamw(params, lr=cfg.unet_lr, weight_decay=0.01)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.ema_te = copy.deepcopy(self.te).requires_grad_(False).eval()

    def _captions(self, idx: torch.Tensor) -> list[str]:
        labels = self.latents["labels"]
        out = []
        for i in idx.tolist():
            attrs = {k: toy.ATTRIBUTES[k][int(labels[k][i])] for k in labels}
            out.append(random_caption(attrs, self.np_rng, self.cfg.drop_p, self.cfg.empty_p))
        return out

    def unet_step(self) -> float:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.unet_lr * _lr_factor(self.step, cfg.unet_steps, cfg.warmup)
        n = self.latents["mean"].shape[0]
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=self.gen)
        z = self.latents["mean"][idx] + self.latents["std"][idx] * torch.randn(
            (cfg.unet_batch, *self.latents["mean"].shape[1:]), generator=self.gen)
        x0 = (z * self.scale_factor).to(self.device)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=self.gen).to(self.device)
        ids = torch.tensor([self.tok.tokenize_sd1(c) for c in self._captions(idx)], device=self.device)
        pred = self.unet(self.schedule.add_noise(x0, noise, t), t, self.te(ids).hidden)
        w = self.schedule.min_snr_weight(t, cfg.min_snr_gamma, "epsilon")
        loss = ((pred - noise).square().mean(dim=(1, 2, 3)) * w).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():   # one fused update over every tensor (hundreds of small lerps cost ~5 % a step)
            for ema, live in ((self.ema_unet, self.unet), (self.ema_te, self.te)):
                torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in live.parameters()], 1 - decay)
        return loss.item()

    # ---------------------------------------------------------------- driver
    def _loop(self, total: int, step_fn: Callable[[], float], name: str, stop_at: Optional[tuple]) -> bool:
        t0, s0, ema_loss = time.time(), self.step, None
        while self.step < total:
            if stop_at is not None and stop_at == (name, self.step):
                self.save_state()
                return False
            loss = step_fn()
            if not math.isfinite(loss):
                raise RuntimeError(f"{name} loss is {loss} at step {self.step}; resume from the last checkpoint")
            self.step += 1
            ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
            if self.step % self.cfg.log_every == 0 or self.step == total:
                rate = (self.step - s0) / max(1e-9, time.time() - t0)
                eta = (total - self.step) / max(rate, 1e-9)
                self.history.append([name, self.step, round(ema_loss, 5)])
                self.log(f"{name} step {self.step}/{total} loss {loss:.4f} (ema {ema_loss:.4f}) "
                         f"{rate:.2f} it/s, ETA {eta / 60:.1f} min")
            if self.step % self.cfg.checkpoint_every == 0:
                self.save_state()
        return True

    def run(self, stop_at: Optional[tuple] = None) -> bool:
        """Train until done (True), or until ``stop_at`` = (phase, step) is reached (False; state saved)."""
        if self.phase == "vae":
            if not self._loop(self.cfg.vae_steps, self.vae_step, "vae", stop_at):
                return False
            self.phase, self.step = "unet", 0
            self.save_state()
        if self.phase == "unet":
            self.latents = self.encode_dataset()
            self.scale_factor = float(self.latents["scale_factor"])
            if self.opt is None:
                self._start_unet_phase()
            if not self._loop(self.cfg.unet_steps, self.unet_step, "unet", stop_at):
                return False
            self.phase = "done"
            self.save_state()
        return True

    def bundle(self, ema: bool = True) -> ModelBundle:
        """The trained model as a ModelBundle (EMA weights by default)."""
        cfg = copy.deepcopy(self.model_cfg)
        cfg.scale_factor = self.scale_factor
        unet, te = (self.ema_unet, self.ema_te) if (ema and self.ema_unet is not None) else (self.unet, self.te)
        b = ModelBundle(cfg, copy.deepcopy(unet), copy.deepcopy(self.vae), [copy.deepcopy(te)], self.tok,
                        NoiseSchedule(), name="tiny-sd")
        return b.requires_grad_(False).eval()


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.world.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/pretrain", help="folder for checkpoints, cached latents and the log")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny-sd"))
    p.add_argument("--resume", action="store_true", help="continue from WORK/state.pt")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: continue the UNet phase to a larger --unet-steps than it was started with")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    for f in fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    work = Path(args.work)
    log_file = open(work.mkdir(parents=True, exist_ok=True) or work / "pretrain.log", "a", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    trainer = Pretrainer(work, cfg, log, args.device)
    if args.resume and trainer.state_path.is_file():
        trainer.load_state(extend=args.extend)
    elif trainer.state_path.is_file():
        raise SystemExit(f"{trainer.state_path} exists: pass --resume to continue it, or use another --work")
    t0 = time.time()
    trainer.run()
    path = write_model_files(trainer.bundle(), Path(args.out), "tiny-sd", dtype=torch.float16)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {(time.time() - t0) / 60:.1f} min of this run; "
        f"scale factor {trainer.scale_factor:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
