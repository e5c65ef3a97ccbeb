"""Checkpoint files: header-only detection, zero-copy loading, truncation, safe pickles."""
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from reference import load_json
from trainer.models import checkpoint_io as io
from trainer.models.configs import config_from_shapes, detect_family


@pytest.fixture
def small_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
              str(p), metadata={"k": "v"})
    return p


def test_header_only(small_file):
    shapes, meta = io.read_header(small_file)
    assert shapes["a"].shape == (2, 3) and shapes["a"].dtype == "F32"
    assert shapes["b"].shape == (4,) and meta == {"k": "v"}


def test_mmap_load_is_view_and_copy_on_write(small_file):
    sd = io.load_safetensors(small_file)
    assert torch.equal(sd["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert sd["b"].dtype == torch.float16
    sd["a"].zero_()  # private mapping: writing must never reach the file
    assert torch.equal(io.load_safetensors(small_file)["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_truncated_file_is_a_one_line_error_naming_it(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[:-5])
    with pytest.raises(io.CheckpointError) as e:
        io.read_header(small_file)
    assert str(small_file) in str(e.value) and "\n" not in str(e.value)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("hello, this is not a model at all")
    with pytest.raises(io.CheckpointError, match="not a safetensors file"):
        io.read_header(p)
    with pytest.raises(io.CheckpointError, match="file not found"):
        io.load_state_dict(tmp_path / "missing.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(io.CheckpointError, match="refused to unpickle|not a readable checkpoint"):
        io.load_state_dict(p)
    assert "pwned" not in capsys.readouterr().out


def test_plain_ckpt_loads(tmp_path):
    p = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 5}, p)
    assert torch.equal(io.load_state_dict(p)["w"], torch.ones(3))


def test_fp8_storage_refused(tmp_path):
    p = tmp_path / "fp8.safetensors"
    save_file({"w": torch.zeros(4, dtype=torch.float8_e4m3fn)}, str(p))
    with pytest.raises(io.CheckpointError, match="fp8"):
        io.load_safetensors(p)


@pytest.mark.parametrize("manifest,family", [("sd15", "sd1"), ("sd21v", "sd2"), ("sdxl_base", "sdxl")])
def test_family_detection_from_real_layouts(manifest, family):
    shapes = load_json(f"manifests/{manifest}.json")
    assert detect_family(shapes) == family
    assert config_from_shapes(shapes).family == family


def test_unsupported_models_are_named(tmp_path):
    base = dict(load_json("manifests/sd15.json"))
    inpaint = dict(base)
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = [320, 9, 3, 3]
    with pytest.raises(io.CheckpointError, match="inpainting"):
        detect_family(inpaint)
    with pytest.raises(io.CheckpointError, match="SD3"):
        detect_family({"model.diffusion_model.joint_blocks.0.x": [1]})
    with pytest.raises(io.CheckpointError, match="Flux"):
        detect_family({"double_blocks.0.img_attn.qkv.weight": [1]})
    with pytest.raises(io.CheckpointError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0.lora_up.weight": [1]})
    xl = load_json("manifests/sdxl_base.json")
    refiner = {k: v for k, v in xl.items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(io.CheckpointError, match="refiner"):
        detect_family(refiner)
