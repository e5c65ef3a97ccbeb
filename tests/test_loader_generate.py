"""Loading a checkpoint into a ModelBundle and drawing with ``python -m trainer generate``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.models.loader import load_model, random_tiny_bundle
from trainer.models.tiny import write_model_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    bundle = random_tiny_bundle(seed=3, device="cpu")
    path = write_model_files(bundle, folder, "tiny-rand", dtype=torch.float32)
    return bundle, path


def _run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_round_trip_gives_same_outputs(tiny_files):
    bundle, path = tiny_files
    loaded = load_model(path, device="cpu")
    assert loaded.family == "sd1" and loaded.unet.config.num_heads == 4   # head split from the YAML
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    c0, c1 = bundle.encode_prompts(["a red circle", ""]), loaded.encode_prompts(["a red circle", ""])
    assert torch.equal(c0["context"], c1["context"])
    for a, b in ((bundle.unet, loaded.unet), (bundle.vae, loaded.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Same weights, but the loaded ones are views into the file's mapping at 8-byte offsets: on one thread
    # the CPU kernels then take another vector path and the last bit of a few outputs differs.
    with torch.no_grad():
        torch.testing.assert_close(bundle.unet_call(x, t, c0), loaded.unet_call(x, t, c1), rtol=1e-5, atol=1e-6)
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(bundle.decode_latents(z), loaded.decode_latents(z), rtol=1e-5, atol=1e-6)


def test_weights_are_views_of_one_mapping(tiny_files):
    """fp32 file, fp32 model: every frozen tensor sits in the file's mmap at its own offset — no copy."""
    import json, struct
    _, path = tiny_files
    loaded = load_model(path, device="cpu")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    tensors = loaded.checkpoint_state_dict()
    bases = {tensors[k].data_ptr() - (8 + n + e["data_offsets"][0])
             for k, e in header.items() if k != "__metadata__" and tensors[k].numel()}
    assert len(bases) == 1


def test_yaml_sets_v_prediction_and_override(tiny_files, tmp_path):
    _, path = tiny_files
    for f in path.parent.iterdir():
        target = tmp_path / f.name
        if f.is_dir():
            target.symlink_to(f, target_is_directory=True)
        else:
            target.write_bytes(f.read_bytes())
    yaml_file = tmp_path / "tiny-rand.yaml"
    yaml_file.write_text(yaml_file.read_text().replace('parameterization: "eps"', 'parameterization: "v"'))
    assert load_model(tmp_path / "tiny-rand.safetensors", device="cpu").prediction_type == "v_prediction"
    assert load_model(tmp_path / "tiny-rand.safetensors", device="cpu",
                      prediction_type="epsilon").prediction_type == "epsilon"


def test_separate_vae_file_replaces_the_checkpoints(tiny_files, tmp_path):
    from safetensors.torch import save_file
    bundle, path = tiny_files
    other = random_tiny_bundle(seed=99, device="cpu").vae
    vae_path = tmp_path / "other.vae.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(vae_path))
    loaded = load_model(path, vae=vae_path, device="cpu")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.vae.decode(z), other.decode(z))
    bad = tmp_path / "bad.vae.safetensors"
    save_file({"foo": torch.zeros(1)}, str(bad))
    with pytest.raises(Exception, match="not a VAE"):
        load_model(path, vae=bad, device="cpu")


def test_generate_cli_writes_png_of_asked_size(tiny_files, tmp_path):
    _, path = tiny_files
    out = tmp_path / "out.png"
    r = _run("generate", "--prompt", "a small blue triangle", "--model", str(path), "--size", "64,96",
             "--steps", "4", "--seed", "7", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"saved: {out}" in r.stdout
    with Image.open(out) as im:
        assert im.size == (96, 64) and im.mode == "RGB"
    again = tmp_path / "again.png"
    assert _run("generate", "--prompt", "a small blue triangle", "--model", str(path), "--size", "64,96",
                "--steps", "4", "--seed", "7", "-o", str(again)).returncode == 0
    assert out.read_bytes() == again.read_bytes()   # same seed, same image


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_bad_checkpoint_is_a_one_line_error_naming_the_file(tiny_files, tmp_path, damage):
    _, path = tiny_files
    bad = tmp_path / "broken.safetensors"
    data = path.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "text": b"<html>not a model</html>", "empty": b""}[damage])
    r = _run("generate", "--prompt", "x", "--model", str(bad), "-o", str(tmp_path / "o.png"))
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.png").exists()


def test_missing_tokenizer_is_a_clear_offline_error(tiny_files, tmp_path):
    _, path = tiny_files
    r = _run("generate", "--prompt", "x", "--model", str(path), "--tokenizer", "nobody/no-such-tokenizer",
             "-o", str(tmp_path / "o.png"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no-such-tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_default_model_runs_and_says_what_it_is(tmp_path):
    out = tmp_path / "default.png"
    r = _run("generate", "--prompt", "a red circle", "--steps", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)
    from trainer.models.loader import DEFAULT_MODEL
    if not DEFAULT_MODEL.is_file():
        assert "RANDOM-INITIALISED" in r.stderr


def _has(device: str) -> bool:
    return torch.cuda.is_available() if device.startswith("cuda") else torch.backends.mps.is_available()


@pytest.mark.parametrize("command,device", [("train", "cuda"), ("generate", "mps"), ("generate", "cuda:1")])
def test_device_this_torch_lacks_is_one_line(tmp_path, command, device):
    """``--device cuda``/``mps`` where this PyTorch has no such device: one line naming it, no traceback."""
    if _has(device):
        pytest.skip(f"{device} exists here")
    job = tmp_path / "job.json"
    job.write_text('{"mode": "iLECO", "original_prompt": "red", "train_iterations": 1, "image_size": 64}')
    args = (["train", str(job), "--lora-dir", str(tmp_path)] if command == "train"
            else ["generate", "--prompt", "x", "-o", str(tmp_path / "o.png")])
    r = _run(*args, "--device", device)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --device {device}: "), r.stderr
    assert "use --device cpu" in lines[0] and not list(tmp_path.glob("*.safetensors"))


def test_device_is_checked_before_the_model_loads(monkeypatch, tmp_path):
    """A queued or CLI job with a missing device fails before any model work."""
    from trainer import runner
    from trainer.errors import UserError
    from trainer.settings import Settings

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")
    monkeypatch.setattr("trainer.models.loader.load_model", must_not_load)
    monkeypatch.setattr("trainer.models.loader.random_tiny_bundle", must_not_load)
    device = "mps" if not _has("mps") else "cuda:99"
    s = Settings({"mode": "iLECO", "original_prompt": "red", "train_iterations": 1, "image_size": 64})
    with pytest.raises(UserError, match=f"^--device {device}: "):
        runner.run_job(s, lora_dir=tmp_path, device=device, log_dir=tmp_path, json_dir=tmp_path)
    with pytest.raises(UserError, match="not a device"):
        runner.run_job(s, lora_dir=tmp_path, device="gpu0", log_dir=tmp_path, json_dir=tmp_path)
