"""iLECO over a matrix of concepts on the embedded tiny model: one fixed recipe, every ordered colour pair.

A recipe tuned on one pair (red → blue) proves little: users bring their own concepts. This trains one
move LoRA per ordered pair of ``--colors`` (plus a shape move, circle → square, and optional erases),
judges 16 seeds per prompt at CFG 5 by pixels, and writes ``matrix.json`` and ``matrix.md``:

* target rate: share of seeds of the moved prompts that come out in the target colour (or shape);
* kept drift: for every other colour's prompt, its own-colour rate with the LoRA minus the base rate
  (negative = the LoRA dragged it away).

Resumable: cells already in ``matrix.json`` under the same recipe are skipped, so a killed run goes on
where it stopped. ``python -m trainer.world.matrix --out output/matrix`` runs the whole table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_path

COLORS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle")
STEPS, CFG = 20, 5.0
# Evaluation prompts, no size or background words (the base draws each in its own colour in 16/16 seeds, so
# drift is measured from a clean reference): two for the moved colour, one for each kept colour (a 2-core CPU
# judges about one image a second; 16 seeds × 6 prompts keeps a cell to minutes).
MOVED = ("circle", "square")
KEPT = ("triangle",)

# The one recipe for every move, shipped as presets/iLECO_TinySD.json (README, "iLECO beyond red → blue"):
# target_guidance aims past the target so the move survives CFG 5; timesteps 500-999 because the input is
# pure noise; preserve_unconditional keeps CFG's reference point; cross-attention only at lr 2e-3 (issue 20
# measured 0/8 with the full-size preset's lr 5e-4 on all layers).
MOVE_RECIPE = dict(mode="iLECO", network_rank=4, network_alpha=8, network_element="CrossAttention",
                   train_learning_rate=2e-3, train_iterations=300, train_batch_size=2, train_snr_gamma=5,
                   target_guidance=1.0, preserve_unconditional=True, train_min_timesteps=500)
# Erasing is the same recipe with an empty target: the iLECO_Erase preset's objective at the tiny model's strength.
ERASE_RECIPE = dict(MOVE_RECIPE)
COMMON = dict(image_size=(64, 64), train_seed=3, train_optimizer="AdamW", train_lr_scheduler="cosine",
              save_precision="fp32", save_overwrite=True, logging_save_csv=False, save_as_json=False)


def judged(bundle, prompts: Sequence[str], seeds: Sequence[int]) -> dict:
    from ..generate import generate
    from .judge import judge
    flat = [p for p in prompts for _ in seeds]
    js = judge(generate(bundle, flat, list(seeds) * len(prompts), steps=STEPS, cfg=CFG, batch_size=48))
    n = len(seeds)
    return {p: js[i * n:(i + 1) * n] for i, p in enumerate(prompts)}


def rate(js, attr: str, value: str) -> float:
    return sum(getattr(j, attr) == value for j in js) / len(js)


def train(bundle, workdir: Path, name: str, settings: dict) -> Path:
    from ..events import EventBus
    from ..runner import run_job
    from ..settings import Settings
    s = Settings.from_dict({**COMMON, **settings, "save_lora_name": name})
    result = run_job(s, bundle=bundle, model_info={"name": "tiny-sd"}, lora_dir=workdir, events=EventBus(),
                     log_dir=workdir / "logs", json_dir=workdir / "json")
    return result.saved[-1]


def with_lora(bundle, path, fn):
    from ..generate import apply_loras
    nets = apply_loras(bundle, [(path, 1.0)])
    try:
        return fn()
    finally:
        for n in nets:
            n.remove()


def colour_cell(bundle, lora, base: dict, moved: str, to: str | None, colors: Sequence[str], seeds) -> dict:
    """Rates for one colour move (``to`` None = erase): moved prompts' target/own rate, others' drift."""
    others = [c for c in colors if c != moved]
    mp = [f"a {moved} {s}" for s in MOVED]
    kp = {c: [f"a {c} {s}" for s in KEPT] for c in others}
    res = with_lora(bundle, lora, lambda: judged(bundle, mp + [p for ps in kp.values() for p in ps], seeds))
    own = float(np.mean([rate(res[p], "color", moved) for p in mp]))
    cell = {"own": round(own, 4)}
    if to is not None:
        cell["target"] = round(float(np.mean([rate(res[p], "color", to) for p in mp])), 4)
    drift = {c: round(float(np.mean([rate(res[p], "color", c) for p in kp[c]])) - base[c], 4) for c in others}
    cell["drift"] = drift
    cell["worst_drift"] = min(drift.values())
    return cell


def base_rates(bundle, colors, seeds) -> dict:
    res = judged(bundle, [f"a {c} {s}" for c in colors for s in KEPT], seeds)
    return {c: float(np.mean([rate(res[f"a {c} {s}"], "color", c) for s in KEPT])) for c in colors}


def shape_cell(bundle, lora, seeds, colors) -> dict:
    moved = [f"a {c} circle" for c in colors[:3]]
    kept = [f"a {c} {s}" for c in colors[:3] for s in ("triangle",)]
    res = with_lora(bundle, lora, lambda: judged(bundle, moved + kept, seeds))
    return {"target": round(float(np.mean([rate(res[p], "shape", "square") for p in moved])), 4),
            "own": round(float(np.mean([rate(res[p], "shape", "circle") for p in moved])), 4),
            "kept_triangle": round(float(np.mean([rate(res[p], "shape", "triangle") for p in kept])), 4),
            "kept_colour": round(float(np.mean([rate(res[p], "color", p.split()[1]) for p in moved])), 4)}


def summary(data: dict, min_target=0.60, keep_within=0.10, max_erased=0.25) -> dict:
    moves = [v for k, v in data["cells"].items() if k.startswith("move:")]
    ok = [m for m in moves if m["target"] >= min_target and m["worst_drift"] >= -keep_within]
    erases = [v for k, v in data["cells"].items() if k.startswith("erase:")]
    return {"moves": len(moves), "moves_passing": len(ok),
            "move_pass_rate": round(len(ok) / len(moves), 3) if moves else None,
            "moves_target_ok": sum(m["target"] >= min_target for m in moves),
            "moves_kept_ok": sum(m["worst_drift"] >= -keep_within for m in moves),
            "erases": len(erases),
            "erases_passing": sum(e["own"] <= max_erased and e["worst_drift"] >= -keep_within for e in erases)}


def markdown(data: dict) -> str:
    colors = data["colors"]
    out = [f"Recipe: `{json.dumps(data['recipe'])}`", "",
           f"Base own-colour rate: " + ", ".join(f"{c} {data['base'][c]:.2f}" for c in colors), "",
           "Target-colour rate of the moved prompts (rows: from, columns: to); in brackets the worst drift of "
           "the other colours' own rate vs base, in points:", "",
           "| from \\ to | " + " | ".join(colors) + " |", "|---" * (len(colors) + 1) + "|"]
    for a in colors:
        row = []
        for b in colors:
            cell = data["cells"].get(f"move:{a}->{b}")
            row.append("—" if a == b else ("…" if cell is None else
                                          f"{cell['target'] * 100:.0f} % ({cell['worst_drift'] * 100:+.0f})"))
        out.append(f"| {a} | " + " | ".join(row) + " |")
    shape = data["cells"].get("shape:circle->square")
    if shape:
        out += ["", f"Shape move circle → square: square in {shape['target'] * 100:.0f} % of seeds, circle "
                    f"{shape['own'] * 100:.0f} %, triangles kept {shape['kept_triangle'] * 100:.0f} %, colour kept "
                    f"{shape['kept_colour'] * 100:.0f} %."]
    erases = {k: v for k, v in data["cells"].items() if k.startswith("erase:")}
    if erases:
        out += ["", "| erase | erased colour kept | worst other drift |", "|---|---|---|"]
        out += [f"| {k[6:]} | {v['own'] * 100:.0f} % | {v['worst_drift'] * 100:+.0f} |" for k, v in erases.items()]
    s = summary(data)
    out += ["", f"Moves passing (target ≥ 60 %, others within 10 points): {s['moves_passing']}/{s['moves']}"
                f" (target reached {s['moves_target_ok']}, others kept {s['moves_kept_ok']})."]
    if erases:
        out.append(f"Erases passing (≤ 25 % keep the colour, others within 10 points): "
                   f"{s['erases_passing']}/{s['erases']}.")
    return "\n".join(out) + "\n"


def merged(out: Path, data: dict) -> dict:
    """``data`` with the cells other workers have saved meanwhile under the same recipe (workers share a folder)."""
    path = out / "matrix.json"
    if path.is_file():
        disk = json.loads(path.read_text())
        if all(disk.get(k) == data.get(k) for k in ("recipe", "seeds", "colors")):
            data["cells"] = {**disk.get("cells", {}), **data["cells"]}
            data.setdefault("base", disk.get("base"))
    return data


def claim(out: Path, key: str) -> bool:
    """One worker per cell: a claim file holding the worker's pid; a dead worker's claim is taken over."""
    d = out / ".claims"
    d.mkdir(exist_ok=True)
    f = d / key.replace(":", "_").replace("->", "_to_")
    try:
        with f.open("x") as fh:
            fh.write(str(os.getpid()))
        return True
    except FileExistsError:
        try:
            os.kill(int(f.read_text() or 0), 0)
            return False        # its worker is alive
        except (ProcessLookupError, ValueError):
            f.write_text(str(os.getpid()))
            return True


def save(out: Path, data: dict) -> None:
    data = merged(out, data)
    data["summary"] = summary(data)
    for name, text in (("matrix.json", json.dumps(data, indent=1)), ("matrix.md", markdown(data))):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text)


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.world.matrix", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="output/matrix", help="folder for matrix.json, matrix.md and the LoRAs")
    ap.add_argument("--colors", default=",".join(COLORS))
    ap.add_argument("--pairs", default="", help="only these moves, e.g. red-blue,green-yellow (default: all)")
    ap.add_argument("--erase", default="red,green,blue", help="colours to erase with the erase recipe ('' = none)")
    ap.add_argument("--no-shape", action="store_true", help="skip the circle → square move")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the move recipe")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    import torch
    from ..models.loader import DEFAULT_MODEL, load_model
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    colors = [c.strip() for c in a.colors.split(",") if c.strip()]
    recipe = dict(MOVE_RECIPE)
    for kv in a.set:
        k, _, v = kv.partition("=")
        recipe[k] = parse_value(v)
    seeds = list(range(a.seeds))
    path = out / "matrix.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("recipe") != recipe or data.get("seeds") != a.seeds or data.get("colors") != colors:
        data = {"recipe": recipe, "erase_recipe": ERASE_RECIPE, "seeds": a.seeds, "colors": colors, "cells": {}}
    bundle = load_model(DEFAULT_MODEL, device="cpu")
    if "base" not in data:
        data["base"] = base_rates(bundle, colors, seeds)
        save(out, data)
    base = data["base"]
    pairs = [(x, y) for x in colors for y in colors if x != y]
    if a.pairs:
        pairs = [tuple(p.split("-")) for p in a.pairs.split(",")]
    jobs = [(f"move:{x}->{y}", x, y) for x, y in pairs]
    if not a.no_shape:
        jobs.append(("shape:circle->square", "circle", "square"))
    jobs += [(f"erase:{c}", c, None) for c in a.erase.split(",") if c]
    for key, x, y in jobs:
        data = merged(out, data)
        if key in data["cells"] or not claim(out, key):
            continue
        t0 = time.time()
        name = key.replace(":", "_").replace("->", "_to_")
        if key.startswith("shape:"):
            lora = train(bundle, out, name, {**recipe, "original_prompt": x, "target_prompt": y})
            cell = shape_cell(bundle, lora, seeds, colors)
        elif key.startswith("erase:"):
            lora = train(bundle, out, name, {**ERASE_RECIPE, "original_prompt": x, "target_prompt": ""})
            cell = colour_cell(bundle, lora, base, x, None, colors, seeds)
        else:
            lora = train(bundle, out, name, {**recipe, "original_prompt": x, "target_prompt": y})
            cell = colour_cell(bundle, lora, base, x, y, colors, seeds)
        cell["seconds"] = round(time.time() - t0, 1)
        data["cells"][key] = cell
        save(out, data)
        print(f"{key}: {json.dumps(cell)}", flush=True)
    save(out, data)
    print(markdown(merged(out, data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
