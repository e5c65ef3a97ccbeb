"""The concept modes do what users train them for, measured on the embedded tiny model by the judge.

Each check runs twice: against the real trainer (must pass) and against a deliberately broken
variant (must fail), so a check that cannot fail is caught here rather than by a user:
- iLECO move   ↔ target computed with the LoRA on;
- iLECO erase  ↔ flipped sign (the LoRA trained at multiplier −1);  and target computed with the LoRA on;
- Difference   ↔ copier left out of pass 2;  and flipped sign (images swapped);
- ADDifT       ↔ noise not shared between the pair;  and flipped sign;
- Multi-ADDifT ↔ flipped sign.
The figures are printed (``pytest -s``) and quoted in the issue notes.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from trainer.world import toy
from trainer.events import EventBus
from trainer.models.loader import DEFAULT_MODEL, load_model
from trainer.runner import run_job
from trainer.settings import Settings

from concept_eval import base_stats, colour_move_check, slider_check

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"embedded model not built: {DEFAULT_MODEL}")

RED = ["a red circle", "a large red square on a white background", "a small red triangle on a black background"]
OTHERS = ["a blue square", "a green circle", "a yellow triangle", "a purple square", "an orange circle"]
# Slider prompts: other colours and shapes than the pair's red circle, with no size word, on which the base model
# draws either size about half the time (7–8 large of 16). Where the base already draws 75 % large (e.g. "a blue
# square"), even a slider that makes every object large cannot reach 1.3x the mean area, and an explicit
# "small"/"large" in the prompt outweighs the slider.
SLIDER_HELD_OUT = ["a green square", "a yellow circle", "a purple triangle"]
# Erase prompts: red prompts whose colourless variant the base model draws red in at most 25 % of seeds
# (checked below). On white backgrounds the base draws a colourless object red in 31–56 % of seeds ("a large
# square on a white background": 44 %), so there a perfect erase ("as if red were never said") cannot reach 25 %.
ERASED = ["a red circle", "a large red square on a gray background", "a small red triangle on a black background"]
ALL = list(dict.fromkeys(RED + ERASED + OTHERS + SLIDER_HELD_OUT))
PAIR_RADII = (8, 19)   # pixels: the world's small and large ranges are 7–10 and 17–22

COMMON = dict(image_size=(64, 64), train_seed=3, train_optimizer="AdamW", train_lr_scheduler="cosine",
              save_precision="fp32", save_overwrite=True, logging_save_csv=False, save_as_json=False)


@pytest.fixture(scope="module")
def bundle():
    return load_model(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def base(bundle):
    torch.manual_seed(0)
    return base_stats(bundle, ALL)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Small vs large red circle, same centre, on white: they differ only in size."""
    folder = tmp_path_factory.mktemp("pair")
    a, b = toy.make_pair("circle", "red", "white", 32, 32, *PAIR_RADII)
    a.save(folder / "small.png")
    b.save(folder / "large.png")
    return str(folder / "small.png"), str(folder / "large.png")


def train(tmp_path, bundle, **kw):
    s = Settings.from_dict({**COMMON, "save_lora_name": kw.get("mode", "x").lower(), **kw})
    result = run_job(s, bundle=bundle, model_info={"name": "tiny-sd"}, lora_dir=tmp_path, events=EventBus(),
                     log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    return result.saved[-1]


def report(name, failures, figures):
    print(f"\n[{name}] failures={failures}\n{json.dumps(figures, indent=1, default=str)}")


# ----------------------------------------------------------------------------- iLECO

ILECO = dict(mode="iLECO", network_rank=4, network_alpha=8, train_learning_rate=5e-4, train_iterations=300,
             train_batch_size=2, train_snr_gamma=5)


# Moving "red" also drags its neighbours in the text embedding: without preserve_prompts, at a strength that
# turns red fully blue, "an orange circle" kept its colour in only 56 % of seeds. Naming the neighbours
# (orange, purple) holds them; blue, green and yellow are not named and must hold by themselves.
MOVE = dict(ILECO, train_learning_rate=2e-3, network_element="CrossAttention", preserve_prompts="orange\npurple")


def ileco_move(tmp_path, bundle, base, pair=None):
    lora = train(tmp_path, bundle, **MOVE, original_prompt="red", target_prompt="blue")
    return colour_move_check(bundle, lora, base, RED, OTHERS, to="blue", min_rate=0.60)


# Erasing with TrainTrain's objective (target_guidance 0) works at CFG 1 but not at the CFG 5 the check samples
# with (README, "Why erasing needs more"); the iLECO_Erase preset's options fix that: target_guidance 1,
# preserve_unconditional, and timesteps 500–999 (pure-noise inputs are realistic only there; over 0–999 "a large
# red square" stayed red in 69–75 % for two of three training seeds). Erasing "red" also pulls its neighbours
# orange and yellow (and purple) along, so those are named as preserved; blue and green must hold alone.
ERASE = dict(ILECO, train_learning_rate=2e-3, network_element="CrossAttention", target_guidance=1.0,
             preserve_unconditional=True, preserve_prompts="orange\nyellow\npurple", train_min_timesteps=500)


def ileco_erase(tmp_path, bundle, base, pair=None):
    lora = train(tmp_path, bundle, **ERASE, original_prompt="red", target_prompt="")
    return colour_move_check(bundle, lora, base, ERASED, OTHERS, to=None, max_rate=0.25)


def test_base_model_draws_red(base):
    for p in RED + ERASED:
        assert base.colour[p] >= 0.90, (p, base.colour[p])


def test_erase_prompts_are_not_red_without_the_word(bundle):
    """The premise of the erase check: with "red" left out, the base draws these objects red in ≤ 25 % of seeds."""
    from concept_eval import colour_rate, judged_many
    colourless = [p.replace("red ", "") for p in ERASED]
    rates = {p: colour_rate(js, "red") for p, js in judged_many(bundle, colourless).items()}
    print("\n[colourless prior, red rate]", rates)
    assert all(r <= 0.25 for r in rates.values()), rates


def test_ileco_moves_red_to_blue(tmp_path, bundle, base):
    failures, figures = ileco_move(tmp_path, bundle, base)
    report("iLECO move", failures, figures)
    assert not failures


def test_ileco_erases_red(tmp_path, bundle, base):
    failures, figures = ileco_erase(tmp_path, bundle, base)
    report("iLECO erase", failures, figures)
    assert not failures


# ----------------------------------------------------------------------------- Difference

DIFF = dict(mode="Difference", network_rank=8, network_alpha=8, train_learning_rate=5e-4, train_iterations=300,
            train_batch_size=2, train_snr_gamma=5, lora_trigger_word="", use_2nd_pass_settings=True,
            second_pass={"network_rank": 4, "network_alpha": 4, "train_learning_rate": 3e-3})


def difference(tmp_path, bundle, base, pair, swap=False):
    a, b = pair[::-1] if swap else pair
    lora = train(tmp_path, bundle, **DIFF, original_image=a, target_image=b)
    return slider_check(bundle, lora, base, SLIDER_HELD_OUT)


def test_difference_slider(tmp_path, bundle, base, pair):
    failures, figures = difference(tmp_path, bundle, base, pair)
    report("Difference", failures, figures)
    assert not failures


# ----------------------------------------------------------------------------- ADDifT

ADDIFT = dict(mode="ADDifT", network_rank=4, network_alpha=4, train_learning_rate=2e-3, train_iterations=100,
              train_batch_size=2, train_snr_gamma=5, diff_multiplier=0.25, lora_trigger_word="",
              train_min_timesteps=200, train_max_timesteps=1000)


def addift(tmp_path, bundle, base, pair, swap=False):
    a, b = pair[::-1] if swap else pair
    lora = train(tmp_path, bundle, **ADDIFT, original_image=a, target_image=b)
    return slider_check(bundle, lora, base, SLIDER_HELD_OUT)


def test_addift_slider_within_100_steps(tmp_path, bundle, base, pair, monkeypatch):
    import trainer.modes.addift as mode
    seen = []
    real = mode.sample_timesteps
    monkeypatch.setattr(mode, "sample_timesteps", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    failures, figures = addift(tmp_path, bundle, base, pair)
    t = torch.cat(seen)
    figures["timesteps"] = {"min": int(t.min()), "max": int(t.max()), "distinct": int(t.unique().numel())}
    report("ADDifT", failures, figures)
    assert not failures
    # drawn over the whole configured band, not TrainTrain's five-value cycle
    assert t.min() < 300 and t.max() > 900 and t.unique().numel() > 50


def pair_folder(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    combos = [("circle", "red"), ("square", "green"), ("triangle", "blue"), ("circle", "yellow"),
              ("square", "purple")]
    for i, (shape, color) in enumerate(combos):
        a, b = toy.make_pair(shape, color, "white", 32, 32, *PAIR_RADII)
        a.save(folder / f"p{i}.png")
        b.save(folder / f"p{i}_large.png")
        (folder / f"p{i}.txt").write_text(f"a {color} {shape}")
    return folder


MULTI = dict(ADDIFT, mode="Multi-ADDifT", train_learning_rate=3e-3, diff_target_name="_large", image_buckets_step=64,
             image_min_length=64)


def multi_addift(tmp_path, bundle, base, pair=None):
    lora = train(tmp_path, bundle, **MULTI, lora_data_directory=str(pair_folder(tmp_path)))
    return slider_check(bundle, lora, base, SLIDER_HELD_OUT)


def test_multi_addift_slider(tmp_path, bundle, base):
    failures, figures = multi_addift(tmp_path, bundle, base)
    report("Multi-ADDifT", failures, figures)
    assert not failures


# ----------------------------------------------------------------------------- the checks have teeth

@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _lora_on_in_target():
    """Mutant: iLECO's frozen target computed with the LoRA on (TrainTrain's multiplier leak)."""
    import trainer.modes.ileco as mode
    return patched(mode, "networks_off", contextlib.nullcontext)


def _trained_at_minus_one():
    """Mutant: the LoRA trained at multiplier −1 (a flipped sign), used at +1."""
    import trainer.modes.ileco as mode
    real = mode.new_network

    def flipped(*a, **k):
        net = real(*a, **k)
        net.multiplier = -1.0
        return net
    return patched(mode, "new_network", flipped)


def _copier_left_out():
    """Mutant: Difference pass 2 trained without the copier applied."""
    import trainer.modes.difference as mode
    made = []
    real_new, real_pass = mode.new_network, mode._denoise_pass

    def new(*a, **k):
        made.append(real_new(*a, **k))
        return made[-1]

    def denoise(run, s, network, latent, cond, phase, gen_name):
        if phase == "pass 2":
            made[0].multiplier = 0.0
        return real_pass(run, s, network, latent, cond, phase, gen_name)
    stack = contextlib.ExitStack()
    stack.enter_context(patched(mode, "new_network", new))
    stack.enter_context(patched(mode, "_denoise_pass", denoise))
    return stack


def _unshared_noise():
    """Mutant: ADDifT noises the two images of a pair with independent noise."""
    import trainer.modes.addift as mode
    real = mode._step_loss

    def step_loss(run, s, network, a, b, cond, t, noise, step, mask=None):
        schedule = run.bundle.schedule
        add = schedule.add_noise
        schedule.add_noise = lambda x, n, tt: add(x, torch.randn_like(n), tt)
        try:
            return real(run, s, network, a, b, cond, t, noise, step, mask)
        finally:
            del schedule.add_noise
    return patched(mode, "_step_loss", step_loss)


def _addift_flipped_sign():
    """Mutant: ADDifT's difference taken the wrong way round (trains the reverse slider)."""
    import trainer.modes.addift as mode
    real = mode._step_loss

    def step_loss(run, s, network, a, b, *rest, **k):
        return real(run, s, network, b, a, *rest, **k)
    return patched(mode, "_step_loss", step_loss)


MUTANTS = {
    "ileco-move/lora-on-in-target": (ileco_move, _lora_on_in_target),
    "ileco-erase/flipped-sign": (ileco_erase, _trained_at_minus_one),
    "ileco-erase/lora-on-in-target": (ileco_erase, _lora_on_in_target),
    "difference/copier-left-out": (difference, _copier_left_out),
    "difference/flipped-sign": (lambda *a: difference(*a, swap=True), contextlib.nullcontext),
    "addift/unshared-noise": (addift, _unshared_noise),
    "addift/flipped-sign": (addift, _addift_flipped_sign),
    "multi-addift/flipped-sign": (multi_addift, _addift_flipped_sign),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_check_fails_on_broken_variant(name, tmp_path, bundle, base, pair):
    check, mutant = MUTANTS[name]
    with mutant():
        failures, figures = check(tmp_path, bundle, base, pair)
    report(f"mutant {name}", failures, figures)
    assert failures, f"the check passed on the broken variant {name}: it has no teeth"
