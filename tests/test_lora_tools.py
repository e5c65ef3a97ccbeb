"""LoRA tools (resize, merge, extract) against their definitions, on the embedded tiny model.

- resize: each module's ΔW error equals the optimal truncated-SVD error (Eckart–Young) for a trained LoRA and
  a LoCon with 3×3 conv modules; each dynamic rule keeps the rank its definition gives; a LoRA resized to a
  rank keeping ≥ 95 % of every module's norm draws the same colours as the original (judge, 16 seeds).
- merge: a checkpoint with a LoRA baked in draws what base + LoRA draws; merged LoRAs have the weighted sum
  of the inputs' ΔW (exact by concatenation, optimal truncation with --rank, per-block weights honoured).
- extract: from a base and a merged checkpoint, full rank gives back ΔW, rank r its optimal truncation.
Figures are printed (``pytest -s``).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainer.cli import main as cli
from trainer.errors import UserError
from trainer.models.checkpoint_io import load_state_dict, read_header, save_safetensors_atomic
from trainer.models.loader import DEFAULT_MODEL, load_model
from trainer.networks.file import file_model_hash, read_metadata, save_lora
from trainer.networks.network import NetworkSpec, create_network, network_from_state_dict
from trainer.tools import lora_delta as D
from trainer.tools.extract import extract
from trainer.tools.inspect_lora import inspect
from trainer.tools.merge import copy_model_config, merge_into_checkpoint, merge_loras, parse_source
from trainer.tools.resize import resize

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"embedded model not built: {DEFAULT_MODEL}")
SEEDS = list(range(16))


@pytest.fixture(scope="module")
def bundle():
    return load_model(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(scope="module")
def locon(bundle, work):
    """A LoCon (rank 4, alpha 2; 3×3 convs rank 3, alpha 1.5) with random non-zero up weights, fp32."""
    net = create_network(bundle, NetworkSpec(network_type="c3lier", rank=4, alpha=2, conv_rank=3, conv_alpha=1.5,
                                             seed=0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in net.adapters.values():
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=gen) * 0.05)
    path = save_lora(net, work / "locon.safetensors", {"ss_output_name": "locon", "ss_steps": 7}, dtype=torch.float32)
    assert any(m.is_conv3x3 for m in D.read_lora(path)[0].values())
    return path


@pytest.fixture(scope="module")
def trained(work):
    """A rank-8 LoRA trained 40 steps on the tiny model toward 'zq' = an orange circle (~30 s on a free CPU)."""
    from trainer.demo import demo_settings
    from trainer.events import EventBus
    from trainer.runner import run_job
    from trainer.world import toy
    toy.make_dataset(work / "data", 12, seed=0, caption="zq", shape="circle", color="orange")
    s = demo_settings(work / "data", 40, "zq", seed=0).with_overrides(
        network_rank=8, network_alpha=8, train_batch_size=2, train_learning_rate=3e-3, save_precision="fp32",
        logging_save_csv=False)
    return run_job(s, lora_dir=work / "out", log_dir=work / "logs", json_dir=work / "json",
                   events=EventBus()).saved[-1]


@pytest.fixture(scope="module")
def base32(work):
    """The embedded checkpoint in fp32 (the tight equality checks are not limited by fp16 storage)."""
    state = {k: v.float() for k, v in load_state_dict(DEFAULT_MODEL).items()}
    path = work / "tiny32.safetensors"
    save_safetensors_atomic(state, path, read_header(DEFAULT_MODEL)[1])
    assert copy_model_config(DEFAULT_MODEL, path)
    return path


def deltas(path) -> dict:
    return {n: m.delta(torch.float64) for n, m in D.read_lora(path)[0].items()}


def svals(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))


def check_loads_like_a_trained_file(bundle, path):
    """SPEC §6: our loader takes it, inspect matches every module, kohya keys only, hashes right."""
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path))
    for key in tensors:
        assert key.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha"), key
    net = network_from_state_dict(bundle, tensors, source=path.name)
    report = inspect(path)
    assert report["unmatched_modules"] == [] and report["modules"] == len(net.adapters)
    md = read_metadata(path)
    assert md["sshs_model_hash"] == file_model_hash(path)
    assert json.loads(md["shinkansen_tool"])["tool"] in ("resize", "merge", "extract")
    return md


# ------------------------------------------------------------------------------------------ resize

@pytest.mark.parametrize("which", ["locon", "trained"])
def test_resize_to_a_rank_is_the_optimal_truncation(request, bundle, work, which):
    src = request.getfixturevalue(which)
    out = work / f"{which}-r2.safetensors"
    result = resize(src, out, 2, conv_rank=2, save_precision="fp32", overwrite=True)
    before, after = deltas(src), deltas(out)
    old, mods = D.read_lora(src)[0], D.read_lora(out)[0]
    worst, zero = 0.0, 0
    for name, d in before.items():
        s = svals(d)
        k = 1 if s[0] / old[name].scale <= 1e-6 else 2     # kohya: a zero ΔW keeps rank 1
        zero += k == 1
        optimal = float(s[k:].pow(2).sum().sqrt())
        error = float((after[name] - d).norm())
        worst = max(worst, abs(error - optimal) / float(s.norm()))
        assert mods[name].rank == k
        assert abs(error - optimal) <= 1e-5 * float(s.norm()) + 1e-9, (name, error, optimal)
        if k == 2:
            assert result.fro_kept[name] == pytest.approx(float(s[:2].pow(2).sum().sqrt() / s.norm()), rel=1e-4)
        if mods[name].is_conv3x3:   # LoCon structure kept: 3×3 down, 1×1 up
            assert mods[name].down.shape[2:] == (3, 3) and mods[name].up.shape[2:] == (1, 1)
    md = check_loads_like_a_trained_file(bundle, out)
    assert md["ss_network_dim"] == ("Dynamic" if zero else "2")
    assert "ss_resize" in md and md["ss_output_name"] in ("locon", "zq")
    print(f"\n[resize {which} → 2] {len(before)} modules ({zero} with ΔW = 0 kept at rank 1); worst |error − optimal| / ‖ΔW‖ = {worst:.2e}; "
          f"mean fro kept {np.mean(list(result.fro_kept.values())):.2%}")


def _definition(s: torch.Tensor, rule: str, x: float, cap: int) -> int:
    """The rule in the test's own words, on fp64 singular values of the full ΔW."""
    if rule == "sv_ratio":        # every σ greater than σ₁ / x
        k = sum(1 for v in s if v > s[0] / x)
    elif rule == "sv_cumulative":  # fewest leading σ whose sum reaches x of the total
        k = next(i + 1 for i in range(len(s)) if s[:i + 1].sum() >= x * s.sum())
    else:                          # fewest leading σ whose Frobenius norm reaches x of the total
        k = next(i + 1 for i in range(len(s)) if s[:i + 1].pow(2).sum().sqrt() >= x * s.norm())
    return max(1, min(k, cap))


@pytest.mark.parametrize("rule,x", [("sv_ratio", 2.0), ("sv_cumulative", 0.8), ("sv_fro", 0.9)])
def test_dynamic_rules_follow_their_definitions(locon, work, rule, x):
    out = work / f"locon-{rule}.safetensors"
    result = resize(locon, out, dynamic=rule, param=x, save_precision="fp32", overwrite=True)
    before = deltas(locon)
    mods = D.read_lora(out)[0]
    ranks = {}
    for name, d in before.items():
        want = _definition(svals(d), rule, x, D.read_lora(locon)[0][name].rank)
        assert mods[name].rank == want, (name, mods[name].rank, want)
        assert mods[name].scale == pytest.approx(D.read_lora(locon)[0][name].scale)   # alpha keeps the scale
        ranks[want] = ranks.get(want, 0) + 1
    md = read_metadata(out)
    assert md["ss_network_dim"] == ("Dynamic" if len(ranks) > 1 else str(next(iter(ranks))))
    assert any("fro kept" in line and "rank 4→" in line for line in result.lines)
    print(f"\n[{rule} {x}] modules per kept rank: {dict(sorted(ranks.items()))}")


def test_resized_lora_draws_the_same_colours(bundle, trained, work):
    from trainer.generate import apply_loras, generate
    from trainer.world.judge import judge
    out = work / "zq-fro95.safetensors"
    result = resize(trained, out, dynamic="sv_fro", param=0.95, overwrite=True)
    norms = {n: float(d.norm()) for n, d in deltas(trained).items()}
    # every module keeps ≥ 95 % of its norm, except the untrained ones kohya's rule keeps at rank 1 (ΔW ≈ 0)
    assert all(f >= 0.95 or norms[n] < 1e-6 for n, f in result.fro_kept.items())
    mean_rank = np.mean([new for _, new in result.ranks.values()])
    assert mean_rank < 8
    colours = {}
    for label, path in (("original", trained), ("resized", out)):
        nets = apply_loras(bundle, [(path, 1.0)])
        try:
            colours[label] = [j.color for j in judge(generate(bundle, ["zq"] * 16, SEEDS, steps=12, cfg=5.0))]
        finally:
            for n in nets:
                n.remove()
    same = np.mean([a == b for a, b in zip(colours["original"], colours["resized"])])
    print(f"\n[resize sv_fro 0.95] mean rank {mean_rank:.2f} of 8; same colour in {same:.0%} of 16 seeds; "
          f"original {colours['original']}; resized {colours['resized']}")
    assert colours["original"].count("orange") >= 6       # the LoRA does something visible (base: ~1 in 16)
    assert same >= 0.90


# ------------------------------------------------------------------------------------------ merge

def _images(bundle, loras=()):
    from trainer.generate import apply_loras, generate
    nets = apply_loras(bundle, loras)
    try:
        return np.stack([np.asarray(im, dtype=np.int16) for im in
                         generate(bundle, ["zq", "a red circle", "zq", "a small blue square"], [0, 1, 2, 3], steps=12)])
    finally:
        for n in nets:
            n.remove()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_merged_checkpoint_draws_what_base_plus_lora_draws(bundle, trained, locon, base32, work, precision):
    model = base32 if precision == "fp32" else DEFAULT_MODEL
    out = work / f"merged-{precision}.safetensors"
    merge_into_checkpoint(model, [parse_source(f"{trained}:0.8"), parse_source(f"{locon}:0.5")], out, overwrite=True)
    src, new = load_state_dict(model), load_state_dict(out)
    assert list(src) == list(new) and all(src[k].dtype == new[k].dtype and src[k].shape == new[k].shape for k in src)
    assert read_header(out)[1].items() >= read_header(model)[1].items()
    base = load_model(model, device="cpu")
    with_lora = _images(base, [(trained, 0.8), (locon, 0.5)])
    merged = _images(load_model(out, device="cpu"))
    diff = np.abs(with_lora - merged)
    print(f"\n[merge into {precision} checkpoint] pixel |diff| max {diff.max()} mean {diff.mean():.4f} (of 255)")
    if precision == "fp32":
        assert diff.max() <= 2           # fp32 rounding only
    else:
        assert diff.mean() <= 1.0 and diff.max() <= 24    # the merged weights are rounded to fp16 once


def test_merged_loras_equal_the_sum_of_their_deltas(bundle, locon, trained, work):
    r2 = work / "locon-r2b.safetensors"
    resize(locon, r2, 2, save_precision="fp32", overwrite=True)
    a, b, c = deltas(locon), deltas(r2), deltas(trained)
    expected = {n: 0.7 * a[n] - 0.5 * b[n] + c.get(n, 0) for n in a} | {n: c[n] for n in c if n not in a}
    out = work / "merged-lora.safetensors"
    merge_loras([parse_source(f"{locon}:0.7"), parse_source(f"{r2}:-0.5"), parse_source(str(trained))], out,
                save_precision="fp32", overwrite=True)
    got = deltas(out)
    assert set(got) == set(expected)
    worst = max(float((got[n] - expected[n]).norm() / expected[n].norm()) for n in expected)
    assert worst < 1e-5
    check_loads_like_a_trained_file(bundle, out)
    # --rank: the optimal truncation of the sum
    out3 = work / "merged-lora-r3.safetensors"
    merge_loras([parse_source(f"{locon}:0.7"), parse_source(f"{r2}:-0.5"), parse_source(str(trained))], out3,
                rank=3, save_precision="fp32", overwrite=True)
    got3 = deltas(out3)
    for n, e in expected.items():
        s = svals(e)
        assert float((got3[n] - e).norm()) == pytest.approx(float(s[3:].pow(2).sum().sqrt()), rel=1e-4, abs=1e-7), n
    # per-block weights: 26 values, the IN blocks at 0 leave only the other LoRA there
    from trainer.tools.layout import family_layout
    layout = family_layout("sd1")
    lbw = ",".join(["1"] + ["0"] * 12 + ["1"] * 13)
    outb = work / "merged-lbw.safetensors"
    merge_loras([parse_source(f"{locon}:0.7:{lbw}"), parse_source(f"{r2}:-0.5")], outb, save_precision="fp32",
                overwrite=True)
    gotb = deltas(outb)
    for n in a:
        w = 0.0 if layout.block(n).startswith("IN") else 0.7
        assert torch.allclose(gotb[n], w * a[n] - 0.5 * b[n], rtol=1e-5, atol=1e-9), n
    print(f"\n[merge LoRAs] concatenated: worst relative ΔW error {worst:.1e}; rank 3 = optimal truncation; "
          f"block weights honoured on {sum(layout.block(n).startswith('IN') for n in a)} IN-block modules")


# ------------------------------------------------------------------------------------------ extract

def test_extract_gives_back_delta_and_its_optimal_truncation(bundle, locon, base32, work):
    tuned = work / "tuned32.safetensors"
    merge_into_checkpoint(base32, [parse_source(str(locon))], tuned, overwrite=True)
    truth = deltas(locon)
    full = work / "extract-full.safetensors"
    r = extract(base32, tuned, full, 4, conv_rank=3, save_precision="fp32", overwrite=True)
    assert r.text_encoder
    got = deltas(full)
    assert set(got) == set(truth)
    worst = max(float((got[n] - truth[n]).norm() / truth[n].norm()) for n in truth)
    assert worst < 1e-4
    check_loads_like_a_trained_file(bundle, full)
    low = work / "extract-r2.safetensors"
    extract(base32, tuned, low, 2, conv_rank=2, save_precision="fp32", overwrite=True)
    got2 = deltas(low)
    worst2 = 0.0
    for n, d in truth.items():
        s = svals(d)
        optimal, error = float(s[2:].pow(2).sum().sqrt()), float((got2[n] - d).norm())
        worst2 = max(worst2, abs(error - optimal) / float(s.norm()))
        assert abs(error - optimal) <= 1e-4 * float(s.norm()), (n, error, optimal)
    print(f"\n[extract] full rank: worst relative ΔW error {worst:.1e}; rank 2: worst |error − optimal| / ‖ΔW‖ "
          f"{worst2:.1e} over {len(truth)} modules")


# ------------------------------------------------------------------------------------------ CLI and bad input

def test_cli_resize_prints_each_module(locon, work, capsys):
    out = work / "cli-r1.safetensors"
    assert cli(["resize", str(locon), "-o", str(out), "--rank", "1"]) == 0
    text = capsys.readouterr().out
    assert f"saved: {out}" in text and text.count("→1 ") == len(D.read_lora(locon)[0]) and "mean fro kept" in text
    assert out.is_file()


def test_bad_inputs_are_one_line(locon, work, capsys):
    sdxl_lora = work / "sdxl.safetensors"
    tensors, md = __import__("trainer.networks.file", fromlist=["load_lora"]).load_lora(locon)
    D.save_lora_file(sdxl_lora, D.read_lora(locon)[0].values(), {**md, "ss_base_model_version": "sdxl_base_v1-0"},
                     torch.float32)
    out = work / "bad.safetensors"
    cases = [
        (["resize", str(DEFAULT_MODEL), "-o", str(out), "--rank", "2"], "not a LoRA"),
        (["resize", str(locon), "-o", str(out), "--rank", "0"], "at least 1"),
        (["resize", str(work / "missing.safetensors"), "-o", str(out), "--rank", "2"], "not found"),
        (["resize", str(locon), "-o", str(out), "--dynamic", "sv_fro"], "--param"),
        (["merge", "--model", str(DEFAULT_MODEL), "--lora", str(sdxl_lora), "-o", str(out)], "sdxl LoRA"),
        (["merge", "--lora", f"{locon}:1:1,0,1", "-o", str(out)], "block weights"),
        (["extract", "--base", str(DEFAULT_MODEL), "--tuned", str(locon), "--rank", "4", "-o", str(out)], ""),
        (["extract", "--base", str(DEFAULT_MODEL), "--tuned", str(DEFAULT_MODEL), "--rank", "0", "-o", str(out)],
         "at least 1"),
    ]
    for argv, words in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, (argv, err)
        assert not out.exists()
