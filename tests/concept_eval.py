"""Measuring what a concept LoRA does on the embedded tiny model: the checks behind the mode tests.

Each ``*_check`` returns ``(failures, figures)``: the list of criteria that failed (empty =
pass) and the measured numbers. The real implementation must pass; the deliberately broken
variants (mutants) must fail the same check, which is what proves the check has teeth.
Generation protocol: DDIM 20 steps, CFG 5, fp32, seeds 0..15, LoRA on both CFG branches.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from trainer.generate import apply_loras, generate
from trainer.world.judge import judge

SEEDS = list(range(16))
STEPS, CFG = 20, 5.0
WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)


@contextlib.contextmanager
def lora_at(bundle, path, weight: float) -> Iterator[None]:
    nets = apply_loras(bundle, [(path, weight)]) if weight != 0 else []
    try:
        yield
    finally:
        for n in nets:
            n.remove()


def judged_many(bundle, prompts: Sequence[str], seeds: Sequence[int] = SEEDS) -> dict:
    """Judgements per prompt; all prompts sampled together (large batches amortise the per-step cost)."""
    flat = [p for p in prompts for _ in seeds]
    js = judge(generate(bundle, flat, list(seeds) * len(prompts), steps=STEPS, cfg=CFG, batch_size=48))
    n = len(seeds)
    return {p: js[i * n:(i + 1) * n] for i, p in enumerate(prompts)}


def colour_rate(js, colour: str) -> float:
    return sum(j.color == colour for j in js) / len(js)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if np.std(ry) > 0 else 0.0


@dataclass
class BaseStats:
    """What the base model does on the evaluation prompts (measured once per session)."""
    colour: dict = field(default_factory=dict)       # prompt -> rate of the prompt's own colour
    area: dict = field(default_factory=dict)         # prompt -> mean object area


def prompt_colour(prompt: str) -> str:
    from trainer.world import toy
    return next(w for w in prompt.split() if w in toy.COLORS)


def base_stats(bundle, prompts: Sequence[str]) -> BaseStats:
    st = BaseStats()
    for p, js in judged_many(bundle, prompts).items():
        st.colour[p] = colour_rate(js, prompt_colour(p))
        st.area[p] = float(np.mean([j.area for j in js]))
    return st


def colour_move_check(bundle, lora, base: BaseStats, moved: Sequence[str], others: Sequence[str],
                      to: str | None, max_rate: float | None = None, min_rate: float | None = None,
                      keep_within: float = 0.10):
    """iLECO: prompts in ``moved`` change colour (to ``to``, or away from their own), ``others`` keep theirs."""
    failures, figures = [], {}
    with lora_at(bundle, lora, 1.0):
        results = judged_many(bundle, list(moved) + list(others))
        for p in moved:
            js = results[p]
            own = colour_rate(js, prompt_colour(p))
            figures[p] = {"base_own": base.colour[p], "own": own}
            if to is not None:
                figures[p]["to"] = colour_rate(js, to)
                if figures[p]["to"] < min_rate:
                    failures.append(f"{p!r}: {to} in {figures[p]['to']:.2f} < {min_rate}")
            if max_rate is not None and own > max_rate:
                failures.append(f"{p!r}: still {prompt_colour(p)} in {own:.2f} > {max_rate}")
        for p in others:
            rate = colour_rate(results[p], prompt_colour(p))
            figures[p] = {"base_own": base.colour[p], "own": rate}
            if rate < base.colour[p] - keep_within:
                failures.append(f"{p!r}: colour accuracy {rate:.2f} vs base {base.colour[p]:.2f}")
    return failures, figures


def slider_check(bundle, lora, base: BaseStats, prompts: Sequence[str], up: float = 1.3, down: float = 0.8,
                 min_spearman: float = 0.9, keep_within: float = 0.10):
    """A size slider: mean area rises monotonically with the weight, colours stay."""
    failures, figures = [], {"weights": list(WEIGHTS)}
    areas, colours = [], {}
    for w in WEIGHTS:
        per_prompt, col = [], {}
        with lora_at(bundle, lora, w):
            results = judged_many(bundle, prompts) if w != 0 else {}
            for p in prompts:
                if w == 0:
                    per_prompt.append(base.area[p])
                    col[p] = base.colour[p]
                    continue
                js = results[p]
                per_prompt.append(float(np.mean([j.area for j in js])))
                col[p] = colour_rate(js, prompt_colour(p))
        areas.append(float(np.mean(per_prompt)))
        colours[w] = col
    rho = round(spearman(WEIGHTS, areas), 9)   # one adjacent swap of five is exactly 0.9, not 0.8999…
    plus, minus = areas[-1] / areas[2], areas[0] / areas[2]
    figures.update(area=[round(a, 4) for a in areas], spearman=round(rho, 3), ratio_plus1=round(plus, 3),
                   ratio_minus1=round(minus, 3), colour={w: {p: round(c, 2) for p, c in col.items()}
                                                       for w, col in colours.items()})
    if rho < min_spearman:
        failures.append(f"Spearman(weight, area) {rho:.2f} < {min_spearman}")
    if plus < up:
        failures.append(f"area at +1 is {plus:.2f}x base < {up}x")
    if minus > down:
        failures.append(f"area at -1 is {minus:.2f}x base > {down}x")
    for w, col in colours.items():
        for p, c in col.items():
            if c < base.colour[p] - keep_within:
                failures.append(f"weight {w}: {p!r} colour accuracy {c:.2f} vs base {base.colour[p]:.2f}")
    return failures, figures


def background_brightness(js) -> float:
    """Mean luminance (0–255) of the judged backgrounds: the second attribute the sliders are proven on."""
    return float(np.mean([0.299 * j.background_rgb[0] + 0.587 * j.background_rgb[1] + 0.114 * j.background_rgb[2]
                          for j in js]))


def brightness_slider_check(bundle, lora, base_brightness: float, prompts: Sequence[str], direction: int,
                            min_change: float = 40.0, min_spearman: float = 0.9):
    """A background-brightness slider: brightness follows ``direction`` × weight monotonically (Spearman
    ≥ ``min_spearman`` over WEIGHTS) and moves by ≥ ``min_change`` luminance units at ±1, both ways."""
    failures, values = [], []
    for w in WEIGHTS:
        if w == 0:
            values.append(base_brightness)
            continue
        with lora_at(bundle, lora, w):
            results = judged_many(bundle, prompts)
        values.append(float(np.mean([background_brightness(results[p]) for p in prompts])))
    rho = round(spearman([direction * w for w in WEIGHTS], values), 9)
    up, down = direction * (values[-1] - values[2]), direction * (values[2] - values[0])
    figures = {"weights": list(WEIGHTS), "brightness": [round(v, 1) for v in values], "spearman": round(rho, 3),
               "change_plus1": round(values[-1] - values[2], 1), "change_minus1": round(values[0] - values[2], 1)}
    if rho < min_spearman:
        failures.append(f"Spearman(weight, brightness) {rho:.2f} < {min_spearman}")
    if up < min_change:
        failures.append(f"at {'+' if direction > 0 else '-'}1 the background moves {up:.0f} < {min_change}")
    if down < min_change:
        failures.append(f"at {'-' if direction > 0 else '+'}1 the background moves {down:.0f} < {min_change}")
    return failures, figures
