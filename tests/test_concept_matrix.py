"""Issue 20: concept modes beyond the calibrated case (red → blue, object size).

- iLECO moves other colour pairs with one fixed recipe (the full ordered-pair matrix is ``slow``;
  ``python -m pytest -m slow tests/test_concept_matrix.py -k matrix`` or ``python -m trainer.world.matrix``);
- the sliders (Difference, ADDifT, Multi-ADDifT) work on a second attribute of the world, background
  brightness, in both directions and monotonically in the weight; each check fails on a broken variant
  (flipped sign: the pair swapped).
Figures are printed (``pytest -s``).
"""
from __future__ import annotations

import json

import pytest
import torch

from trainer.events import EventBus
from trainer.models.loader import DEFAULT_MODEL, load_model
from trainer.runner import run_job
from trainer.settings import Settings
from trainer.world import toy

from concept_eval import background_brightness, brightness_slider_check, colour_rate, judged_many

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"embedded model not built: {DEFAULT_MODEL}")

# No background word: the base draws white, gray or black backgrounds, so a slider can move them either way.
HELD_OUT = ["a green square", "a yellow circle", "a purple triangle"]
COMMON = dict(image_size=(64, 64), train_seed=3, train_optimizer="AdamW", train_lr_scheduler="cosine",
              save_precision="fp32", save_overwrite=True, logging_save_csv=False, save_as_json=False)


@pytest.fixture(scope="module")
def bundle():
    return load_model(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def base_brightness(bundle):
    res = judged_many(bundle, HELD_OUT)
    return float(sum(background_brightness(res[p]) for p in HELD_OUT) / len(HELD_OUT))


@pytest.fixture(scope="module")
def dark_light(tmp_path_factory):
    """The same red circle on black and on white: the pair differs only in background brightness."""
    folder = tmp_path_factory.mktemp("bg")
    for bg in ("black", "white"):
        toy.render("circle", "red", "small", bg, 32, 32, radius=14).save(folder / f"{bg}.png")
    return str(folder / "black.png"), str(folder / "white.png")


def train(tmp_path, bundle, **kw):
    s = Settings.from_dict({**COMMON, "save_lora_name": kw["mode"].lower(), **kw})
    result = run_job(s, bundle=bundle, model_info={"name": "tiny-sd"}, lora_dir=tmp_path, events=EventBus(),
                     log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    return result.saved[-1]


def report(name, failures, figures):
    print(f"\n[{name}] failures={failures}\n{json.dumps(figures, indent=1, default=str)}")


# ----------------------------------------------------------------------------- iLECO beyond red → blue

@pytest.mark.slow   # meant for CI's fast subset, but not yet run to the end on the shared CPU: slow until it has passed
def test_tiny_preset_moves_a_pair_it_was_not_tuned_on(tmp_path, bundle):
    """A new user: the shipped iLECO_TinySD preset on the default model, a pair other than red → blue."""
    from trainer.presets import load_preset
    s = load_preset("iLECO_TinySD").with_overrides(original_prompt="yellow", target_prompt="purple", train_seed=3,
                                                   save_precision="fp32", logging_save_csv=False)
    lora = run_job(s, bundle=bundle, model_info={"name": "tiny-sd"}, lora_dir=tmp_path, events=EventBus(),
                   log_dir=tmp_path / "logs", json_dir=tmp_path / "json").saved[-1]
    from concept_eval import lora_at
    with lora_at(bundle, lora, 1.0):
        res = judged_many(bundle, ["a yellow circle", "a red triangle", "a green triangle"])
    figures = {p: {c: colour_rate(js, c) for c in ("yellow", "purple", p.split()[1])} for p, js in res.items()}
    print("\n[iLECO_TinySD yellow -> purple]", json.dumps(figures))
    assert figures["a yellow circle"]["purple"] >= 0.60
    assert figures["a red triangle"]["red"] >= 0.90 and figures["a green triangle"]["green"] >= 0.90


@pytest.mark.slow
def test_ileco_matrix(tmp_path):
    """Every ordered pair of five colours, circle → square and three erases, one recipe: the issue's acceptance.
    Hours on a shared CPU; ``SHINKANSEN_MATRIX_OUT=DIR`` keeps (and resumes) the table there."""
    import os
    from trainer.world import matrix
    out = os.environ.get("SHINKANSEN_MATRIX_OUT") or str(tmp_path)
    assert matrix.main(["--out", out]) == 0
    data = json.loads((tmp_path.__class__(out) / "matrix.json").read_text())
    s = data["summary"]
    print(json.dumps(s))
    assert s["moves"] >= 20 and s["moves_passing"] >= 0.8 * s["moves"]
    assert data["cells"]["shape:circle->square"]["target"] >= 0.60
    assert s["erases"] >= 3 and s["erases_passing"] == s["erases"]


# ----------------------------------------------------------------------------- sliders on background brightness

ADDIFT = dict(mode="ADDifT", network_rank=4, network_alpha=4, train_learning_rate=2e-3, train_iterations=100,
              train_batch_size=2, train_snr_gamma=5, diff_multiplier=0.25, lora_trigger_word="",
              train_min_timesteps=200, train_max_timesteps=1000)
DIFF = dict(mode="Difference", network_rank=8, network_alpha=8, train_learning_rate=5e-4, train_iterations=300,
            train_batch_size=2, train_snr_gamma=5, lora_trigger_word="", use_2nd_pass_settings=True,
            second_pass={"network_rank": 4, "network_alpha": 4, "train_learning_rate": 3e-3})
MULTI = dict(ADDIFT, mode="Multi-ADDifT", train_learning_rate=3e-3, diff_target_name="_light",
             image_buckets_step=64, image_min_length=64)


def pair_folder(tmp_path, swap=False):
    folder = tmp_path / "pairs"
    folder.mkdir()
    combos = [("circle", "red"), ("square", "green"), ("triangle", "blue"), ("circle", "yellow"),
              ("square", "purple")]
    names = ("white", "black") if swap else ("black", "white")
    for i, (shape, color) in enumerate(combos):
        for bg, suffix in zip(names, ("", "_light")):
            toy.render(shape, color, "small", bg, 32, 32, radius=12).save(folder / f"p{i}{suffix}.png")
        (folder / f"p{i}.txt").write_text(f"a {color} {shape}")
    return folder


def slider(mode, tmp_path, bundle, base_brightness, pair, swap=False, direction=1):
    a, b = pair[::-1] if swap else pair
    if mode == "Multi-ADDifT":
        lora = train(tmp_path, bundle, **MULTI, lora_data_directory=str(pair_folder(tmp_path, swap)))
    else:
        lora = train(tmp_path, bundle, **(ADDIFT if mode == "ADDifT" else DIFF), original_image=a, target_image=b)
    return brightness_slider_check(bundle, lora, base_brightness, HELD_OUT, direction)


@pytest.mark.slow   # meant for CI's fast subset, but not yet run to the end on the shared CPU: slow until it has passed
@pytest.mark.parametrize("mode", ["ADDifT"])
def test_brightness_slider_fast(mode, tmp_path, bundle, base_brightness, dark_light):
    failures, figures = slider(mode, tmp_path, bundle, base_brightness, dark_light)
    report(f"{mode} brightness", failures, figures)
    assert not failures


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["Difference", "Multi-ADDifT"])
@pytest.mark.parametrize("direction", [1, -1])
def test_brightness_slider(mode, direction, tmp_path, bundle, base_brightness, dark_light):
    """Trained on black → white (direction 1) and on white → black (−1): each makes its own way brighter."""
    failures, figures = slider(mode, tmp_path, bundle, base_brightness, dark_light, swap=direction < 0,
                               direction=direction)
    report(f"{mode} brightness {direction:+d}", failures, figures)
    assert not failures


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ADDifT", "Difference", "Multi-ADDifT"])
def test_brightness_check_fails_on_flipped_sign(mode, tmp_path, bundle, base_brightness, dark_light):
    """Broken variant: the pair swapped (the slider trained the wrong way round) must fail the check."""
    failures, figures = slider(mode, tmp_path, bundle, base_brightness, dark_light, swap=True, direction=1)
    report(f"mutant {mode} flipped", failures, figures)
    assert failures, "the check passed on the swapped pair: it has no teeth"
