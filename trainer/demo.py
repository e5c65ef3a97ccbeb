"""``python -m trainer demo``: the whole LoRA workflow on the embedded tiny model, in minutes on a CPU.

Writes a small dataset of one shape in one colour captioned only with the trigger "zq",
trains a LoRA on it with a live progress bar, and saves the LoRA, its loss plot and a
before/after grid of what "zq" draws without and with the LoRA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .world import toy
from .errors import UserError


def demo_settings(dataset: Path, steps: int, name: str, seed: int):
    from .settings import Settings
    return Settings.from_dict({
        "mode": "LoRA", "lora_data_directory": str(dataset), "image_size": "64", "image_buckets_step": 64,
        "image_min_length": 64, "train_iterations": steps, "train_batch_size": 4, "train_learning_rate": 1e-3,
        "train_lr_scheduler": "cosine", "network_rank": 4, "network_alpha": 4, "train_seed": seed,
        "save_lora_name": name, "save_overwrite": True, "logging_save_csv": True,
    })


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/demo", help="folder for the dataset, LoRA, plot and grid")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shape", default="square", choices=toy.SHAPES)
    p.add_argument("--color", default="purple", choices=list(toy.COLORS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from .generate import apply_loras, generate, grid
    from .models.loader import DEFAULT_MODEL, load_model_or_default
    from .app.plot import plot_files
    from .runner import run_job

    out = Path(args.out)
    dataset = out / "dataset"
    if dataset.exists() and any(dataset.iterdir()):
        for f in dataset.iterdir():
            f.unlink()
    toy.make_dataset(dataset, 12, seed=args.seed, caption="zq", shape=args.shape, color=args.color)
    print(f"dataset: 12 images of a {args.color} {args.shape} captioned 'zq' in {dataset}")
    if not DEFAULT_MODEL.is_file():
        print("note: the embedded tiny model is not built yet; training on a random-initialised model", file=sys.stderr)
    result = run_job(demo_settings(dataset, args.steps, "demo-zq", args.seed), lora_dir=out,
                     log_dir=out / "logs", json_dir=out / "json")
    lora = result.saved[-1]
    plot = plot_files([result.csv], out / "loss.png", title="demo LoRA: trigger 'zq'")
    bundle = load_model_or_default(None, device="cpu")
    seeds = list(range(8))
    before = generate(bundle, ["zq"] * 8, seeds, steps=20, cfg=5.0)
    nets = apply_loras(bundle, [(lora, 1.0)])
    after = generate(bundle, ["zq"] * 8, seeds, steps=20, cfg=5.0)
    for n in nets:
        n.remove()
    grid(before + after, cols=8, row_labels=["zq: without the LoRA", f"zq: with {Path(lora).name}"],
         col_labels=[f"seed {s}" for s in seeds]).save(out / "before_after.png")
    print(f"saved: {lora}\nsaved: {plot}\nsaved: {out / 'before_after.png'} (top: without the LoRA, bottom: with it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
