"""The bench (issue 17): the step-end instrument, the device-correct peak, kohya's command line, and a
real tiny run's JSON. A real kohya run needs a sd-scripts checkout and its packages: not in CI."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.bench import kohya, peak
from trainer.bench.case import Case, our_settings
from trainer.bench.cli import main as bench_main
from trainer.bench.instrument import Instrument, summarize
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_uses_step_end_times():
    ends = [10.0, 11.0, 11.5, 12.5, 13.0, 14.0, 20.0]     # steps 1..7 end; step 7 FLOP-counted
    s = summarize(ends, t0=4.0, warmup=2, counted_last=True)
    assert s["first_step_s"] == 6.0
    assert s["step_times"] == [0.5, 1.0, 0.5, 1.0]         # steps 3..6; 7 (counted) left out
    assert s["timed_steps"] == [3, 6] and s["s_per_step"] == 0.75 and s["steps_seen"] == 7


def test_instrument_times_each_optimizer_step_and_counts_flops(tmp_path):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = tmp_path / "r.json"
    inst = Instrument(str(result), t0=time.time(), warmup=1, total_steps=5).install()
    try:
        pauses = [0.0, 0.3, 0.6, 0.3, 0.0]
        for pause in pauses:
            time.sleep(pause)
            model(torch.randn(8, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        inst.write()
    finally:
        inst.remove()
    r = json.loads(result.read_text())
    assert r["steps_seen"] == 5 and r["device"] == "cpu" and "peak_cuda_gib" not in r
    assert r["timed_steps"] == [2, 4]                      # step 1 warm-up, step 5 counted
    for measured, pause in zip(r["step_times"], pauses[1:4]):
        assert pause <= measured < pause + 0.25            # the sleep before each step is inside it
    assert r["step_times"][1] == max(r["step_times"]) and r["s_per_step"] == sorted(r["step_times"])[1]
    assert r["flops_per_step"] == 2 * (2 * 8 * 64 * 64)    # forward + weight gradient of one 8×64×64 linear
    assert r["trainable_params"] == 64 * 64 + 64 and r["optimizer"] == "AdamW" and r["peak_rss_gib"] > 0


def test_cpu_peak_is_fp32_mm_even_for_half_training(monkeypatch):
    seen = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: (seen.append((a.dtype, a.device.type)), real(a, b))[1])
    flops = peak.matmul_peak_flops(torch.device("cpu"), torch.bfloat16, n=128, repeats=2)
    assert flops > 0 and set(seen) == {(torch.float32, "cpu")}


def _case(**kw):
    return Case(**{"name": "sd15", "resolution": 256, **kw})


def test_kohya_command_matches_our_settings(tmp_path):
    (tmp_path / "train_network.py").write_text("")
    (tmp_path / "sdxl_train_network.py").write_text("")
    case = _case(rank=8, alpha=4, steps=12, batch=2)
    cmd = kohya.command(case, tmp_path, Path("ck.safetensors"), Path("data"), Path("tok"), Path("out"), "float32")
    assert cmd[0] == str(tmp_path / "train_network.py")
    opts = dict(zip(cmd[1::2], cmd[2::2]))
    ours = our_settings(case, "data", "ck.safetensors", "x")
    assert opts["--network_dim"] == str(ours["network_rank"]) == "8"
    assert float(opts["--network_alpha"]) == ours["network_alpha"] == 4
    assert float(opts["--learning_rate"]) == ours["train_learning_rate"]
    assert float(opts["--max_grad_norm"]) == ours["gradient_clip_norm"] == 1.0      # both clip the same
    assert opts["--max_train_steps"] == str(ours["train_iterations"]) and opts["--train_batch_size"] == "2"
    assert opts["--resolution"] == "256,256" and ours["image_size"] == "256"
    assert opts["--optimizer_type"] == ours["train_optimizer"] == "AdamW"
    assert opts["--lr_scheduler"] == ours["train_lr_scheduler"] == "constant"
    assert opts["--mixed_precision"] == "no" and ours["use_gradient_checkpointing"] is False
    for flag in ("--cache_latents", "--sdpa"):
        assert flag in cmd
    assert "--network_train_unet_only" not in cmd and "BASE" in ours["network_blocks"]
    assert "--gradient_checkpointing" not in cmd

    unet = kohya.command(_case(name="sdxl", resolution=1024, train_text_encoder=False), tmp_path, Path("c"),
                         Path("d"), Path("t"), Path("o"), "bfloat16")
    assert unet[0].endswith("sdxl_train_network.py")
    assert "--network_train_unet_only" in unet and "--cache_text_encoder_outputs" in unet
    assert unet[unet.index("--mixed_precision") + 1] == "bf16"
    assert "BASE" not in our_settings(_case(name="sdxl", train_text_encoder=False), "d", "c", "x")["network_blocks"]

    with pytest.raises(UserError, match="every UNet block"):
        kohya.check(_case(blocks=("IN01",)), tmp_path)
    with pytest.raises(UserError, match="no kohya counterpart"):
        kohya.check(_case(name="tiny"), tmp_path)
    with pytest.raises(UserError, match="sd-scripts checkout"):
        kohya.check(_case(), tmp_path / "nope")


@pytest.mark.parametrize("case,manifest", [("sd15", "sd15"), ("sdxl", "sdxl_base")])
def test_random_checkpoint_has_the_real_layout(case, manifest):
    """kohya loads the bench's checkpoint with its own converters: every key and shape of the real layout,
    except the sampler buffers and position ids that neither tool reads."""
    from trainer.bench.fixtures import random_state
    from tests.reference import load_json
    real = load_json(f"manifests/{manifest}.json")
    ours = {k: list(v.shape) for k, v in random_state(case, "meta").items()}
    assert all(real[k] == shape for k, shape in ours.items())
    left_out = set(real) - set(ours)
    assert all(k.endswith("position_ids") or "." not in k or k == "denoiser.sigmas" for k in left_out), left_out


def test_kohya_tokenizer_cache_uses_hub_names(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text("{}")
    cache = kohya.tokenizer_cache(tok, tmp_path / "cache", _case(name="sdxl"))
    assert (cache / "openai_clip-vit-large-patch14" / "vocab.json").is_file()
    assert (cache / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k" / "vocab.json").is_file()


def test_kohya_environment_puts_its_packages_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = kohya.environment(str(tmp_path))
    assert env["PYTHONPATH"] == str(tmp_path) and env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("SHINKANSEN_KOHYA_PYTHONPATH", str(tmp_path))
    assert kohya.environment(None)["PYTHONPATH"] == str(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        kohya.environment(str(tmp_path / "missing"))


def test_ratios_are_ours_over_kohya_medians_per_case():
    from trainer.bench.report import ratio_table, ratios
    run = lambda tool, s, rss, first: {"label": "sd15", "tool": tool, "steps_per_s": 1 / s, "samples_per_s": 2 / s,
                                       "peak_rss_gib": rss, "first_step_s": first}
    (row,) = ratios([run("ours", 2.0, 4.0, 10), run("kohya", 4.0, 5.0, 40), run("ours", 2.0, 4.0, 20),
                     run("kohya", 4.0, 5.0, 40), {"label": "tiny", "tool": "ours", "steps_per_s": 9}])
    assert row["steps_per_s"] == row["samples_per_s"] == 2.0 and row["rounds"] == 2
    assert row["peak_rss_gib"] == 0.8 and row["first_step_s"] == 15 / 40 and row["peak_cuda_gib"] is None
    assert "2.00×" in ratio_table([row]) and "CUDA" not in ratio_table([row])


def test_bad_arguments_are_one_line_before_any_model(capsys):
    assert bench_main(["--cases", "tiny,nope"]) == 2
    assert bench_main(["--cases", "tiny", "--steps", "3", "--warmup", "2"]) == 2
    assert bench_main(["--cases", "sd15", "--kohya", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "nope" in err[0] and "warmup + 2" in err[1] and "sd-scripts" in err[2]


def test_tiny_bench_reports_cpu_fp32_figures(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "trainer", "bench", "--cases", "tiny", "--steps", "4", "--warmup", "1",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["matmul_peak_flops"] > 0
    (r,) = data["runs"]
    for key in ("s_per_step", "steps_per_s", "samples_per_s", "first_step_s", "peak_rss_gib", "flops_per_step",
                "fraction_of_peak", "step_times", "timed_steps", "label", "tool"):
        assert r.get(key) is not None, key
    assert r["tool"] == "ours" and r["dtype"] == "float32" and r["steps_seen"] == 4
    assert r["timed_steps"] == [2, 3] and len(r["step_times"]) == 2     # step 4 is the FLOP-counted one
    assert "peak_cuda_gib" not in r and "CUDA" not in p.stdout        # no GPU: no CUDA memory
    assert 0 < r["fraction_of_peak"] <= 1
    assert r["first_step_s"] > r["s_per_step"]                        # start → first step includes loading
    assert data["ratios"] == []
