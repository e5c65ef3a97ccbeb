"""Every mode runs end to end on a random tiny model (wiring only; behaviour is tested on the embedded model)."""
import pytest
import torch
from PIL import Image

from trainer.world import toy
from trainer.events import EventBus, StepEvent
from trainer.models.loader import random_tiny_bundle
from trainer.networks import load_lora
from trainer.runner import run_job
from trainer.settings import Settings

COMMON = dict(image_size=(64, 64), train_iterations=4, train_batch_size=2, network_rank=4, network_alpha=4,
              train_seed=5, train_learning_rate=1e-3, train_lr_scheduler="constant")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    a, b = toy.make_pair("circle", "red", "white", 32, 32, 8, 20)
    a.save(folder / "a.png")
    b.save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def _run(tmp_path, **kw):
    steps = []
    s = Settings.from_dict({**COMMON, **kw})
    result = run_job(s, lora_dir=tmp_path / "out", bundle=random_tiny_bundle(seed=0, device="cpu"),
                     events=EventBus([lambda e: steps.append(e) if isinstance(e, StepEvent) else None]),
                     log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    return result, steps


def test_ileco_first_loss_is_the_analytic_gap(tmp_path):
    result, steps = _run(tmp_path, mode="iLECO", original_prompt="red", target_prompt="blue",
                         train_snr_gamma=0, network_blocks=["IN01", "OUT11"])
    assert result.status == "done" and len(steps) == 4
    tensors, meta = load_lora(result.saved[0])
    assert meta["shinkansen_mode"] == "iLECO" and not any(k.startswith("lora_te") for k in tensors)
    # step 1: zero-initialised LoRA, so the loss is the frozen model's own red/blue gap (> 0)
    assert steps[0].loss > 0


def test_ileco_preserve_prompts_join_the_batch(tmp_path):
    """A preserved prompt is its own frozen target: zero gap at step 1, so the first loss halves."""
    kw = dict(mode="iLECO", original_prompt="red", target_prompt="blue", train_snr_gamma=0,
              train_iterations=1)
    _, plain = _run(tmp_path / "plain", **kw)
    result, kept = _run(tmp_path / "kept", **kw, preserve_prompts="orange\nyellow")
    assert kept[0].loss == pytest.approx(plain[0].loss / 2, rel=1e-5)
    _, meta = load_lora(result.saved[0])
    assert meta["shinkansen_preserve_prompts"] == "orange\nyellow"


def test_ileco_target_guidance_scales_the_gap(tmp_path):
    """target = ε(t) + g·(ε(t) − ε(o)): at step 1 (LoRA a no-op) the gap is (1+g)·(ε(t) − ε(o)), loss ×(1+g)²;
    a preserved prompt stays its own target (its half of the batch still has zero gap)."""
    kw = dict(mode="iLECO", original_prompt="red", target_prompt="", train_snr_gamma=0, train_iterations=1)
    _, plain = _run(tmp_path / "plain", **kw)
    result, pushed = _run(tmp_path / "pushed", **kw, target_guidance=1.0)
    assert pushed[0].loss == pytest.approx(4 * plain[0].loss, rel=1e-4)
    _, both = _run(tmp_path / "both", **kw, target_guidance=1.0, preserve_prompts="orange")
    assert both[0].loss == pytest.approx(2 * plain[0].loss, rel=1e-4)
    _, meta = load_lora(result.saved[0])
    assert meta["shinkansen_target_guidance"] == "1.0"


def test_ileco_preserve_unconditional_joins_the_batch(tmp_path):
    """The empty prompt is preserved like any other: zero gap at step 1 (first loss halves), first in the cycle."""
    kw = dict(mode="iLECO", original_prompt="red", target_prompt="blue", train_snr_gamma=0, train_iterations=1)
    _, plain = _run(tmp_path / "plain", **kw)
    result, kept = _run(tmp_path / "kept", **kw, preserve_unconditional=True)
    assert kept[0].loss == pytest.approx(plain[0].loss / 2, rel=1e-5)
    _, meta = load_lora(result.saved[0])
    assert meta["shinkansen_preserve_unconditional"] == "true" and "shinkansen_preserve_prompts" not in meta


def test_ileco_long_prompts_share_a_batch(tmp_path):
    """Prompts longer than one 75-token chunk are padded to a common length, not refused by torch.cat."""
    long_prompt = ", ".join(["a large red circle on a white background"] * 12)
    result, steps = _run(tmp_path, mode="iLECO", original_prompt=long_prompt, target_prompt="",
                         preserve_prompts="orange", target_guidance=1.0, train_iterations=2)
    assert result.status == "done" and len(steps) == 2


def test_ileco_empty_target_erases(tmp_path):
    result, _ = _run(tmp_path, mode="iLECO", original_prompt="red", target_prompt="")
    assert result.saved


def test_difference_two_passes_and_second_pass_settings(tmp_path, pair):
    a, b = pair
    result, steps = _run(tmp_path, mode="Difference", original_image=str(a), target_image=str(b),
                         diff_save_1st_pass=True, use_2nd_pass_settings=True,
                         second_pass={"network_rank": 2, "network_alpha": 1, "train_iterations": 3})
    names = [p.name for p in result.saved]
    assert names == ["untitled_copy.safetensors", "untitled.safetensors"]
    assert [e.phase for e in steps] == ["pass 1"] * 4 + ["pass 2"] * 3
    copy_meta, meta = load_lora(result.saved[0])[1], load_lora(result.saved[1])[1]
    assert copy_meta["ss_network_dim"] == "4" and meta["ss_network_dim"] == "2" and meta["ss_steps"] == "3"


def test_difference_first_pass_only_and_loaded_copier(tmp_path, pair):
    a, b = pair
    only, _ = _run(tmp_path / "1", mode="Difference", original_image=str(a), target_image=str(b),
                   diff_1st_pass_only=True)
    assert [p.name for p in only.saved] == ["untitled_copy.safetensors"]
    loaded, steps = _run(tmp_path / "2", mode="Difference", original_image=str(a), target_image=str(b),
                         diff_load_1st_pass=str(only.saved[0]))
    assert [e.phase for e in steps] == ["pass 2"] * 4 and [p.name for p in loaded.saved] == ["untitled.safetensors"]


def test_difference_refuses_different_sizes(tmp_path, pair):
    a, _ = pair
    other = tmp_path / "big.png"
    Image.new("RGB", (96, 64), "white").save(other)
    from trainer.errors import UserError
    with pytest.raises(UserError, match="same size"):
        _run(tmp_path, mode="Difference", original_image=str(a), target_image=str(other))


def test_addift_alternates_multiplier_and_shares_noise(tmp_path, pair, monkeypatch):
    a, b = pair
    import trainer.modes.addift as addift
    seen = []
    real = addift._step_loss

    def spy(run, s, network, A, B, cond, t, noise, step, mask=None):
        out = real(run, s, network, A, B, cond, t, noise, step, mask)
        seen.append(network.multiplier)
        return out

    monkeypatch.setattr(addift, "_step_loss", spy)
    result, steps = _run(tmp_path, mode="ADDifT", original_image=str(a), target_image=str(b),
                         train_min_timesteps=500, train_max_timesteps=1000)
    assert seen == [0.25, -0.25, 0.25, -0.25] and result.saved


def test_multi_addift_pairs_with_captions(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, color in enumerate(["red", "blue", "green", "yellow"]):
        a, b = toy.make_pair("square", color, "white", 32, 32, 8, 20)
        a.save(folder / f"p{i}.png")
        b.save(folder / f"p{i}_big.png")
        (folder / f"p{i}.txt").write_text(f"a {color} square")
    result, steps = _run(tmp_path, mode="Multi-ADDifT", lora_data_directory=str(folder), diff_target_name="_big",
                         image_buckets_step=64, image_min_length=64)
    assert result.saved and len(steps) == 4


def test_loaded_copier_gives_the_same_second_pass_as_a_trained_one(tmp_path, pair):
    """diff_load_1st_pass: the copier saved by one run, loaded by another, yields the same pass-2 LoRA."""
    a, b = pair
    common = dict(mode="Difference", original_image=str(a), target_image=str(b), save_precision="fp32")
    trained, _ = _run(tmp_path / "trained", diff_save_1st_pass=True, **common)
    copier, product = trained.saved
    loaded, steps = _run(tmp_path / "loaded", diff_load_1st_pass=str(copier), **common)
    assert [e.phase for e in steps] == ["pass 2"] * 4
    want, got = load_lora(product)[0], load_lora(loaded.saved[0])[0]
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    # and the copier matters: pass 2 without it (a fresh model) gives a different LoRA
    fresh, _ = _run(tmp_path / "fresh", diff_load_1st_pass="", diff_1st_pass_only=False,
                    **{**common, "original_image": str(b)})
    assert any(not torch.equal(load_lora(fresh.saved[0])[0][k], want[k]) for k in want)
