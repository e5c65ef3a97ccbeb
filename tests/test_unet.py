"""UNet parity with ldm/sgm (golden outputs) and the exact layouts of released checkpoints."""
import pytest
import torch

from reference import golden_state_dict, load_json, load_tensors
from trainer.models.configs import UNET_PREFIX, builtin_config
from trainer.models.unet import UNetConfig, UNetModel


def _config(kw: dict) -> UNetConfig:
    return UNetConfig(in_channels=kw["in_channels"], out_channels=kw["out_channels"],
                      model_channels=kw["model_channels"], attention_resolutions=tuple(kw["attention_resolutions"]),
                      num_res_blocks=kw["num_res_blocks"], channel_mult=tuple(kw["channel_mult"]),
                      num_heads=kw.get("num_heads", -1), num_head_channels=kw.get("num_head_channels", -1),
                      transformer_depth=kw["transformer_depth"], context_dim=kw["context_dim"],
                      use_linear_in_transformer=kw.get("use_linear_in_transformer", False),
                      adm_in_channels=kw.get("adm_in_channels"))


@pytest.mark.parametrize("name", ["unet_sd1", "unet_sd2", "unet_sdxl"])
def test_golden_unet_outputs(name):
    spec = load_json(f"golden/{name}.json")
    ref = load_tensors(f"golden/{name}.safetensors")
    model = UNetModel(_config(spec["constructor_kwargs"])).eval()
    model.load_state_dict(golden_state_dict(spec["weights"]), strict=True)
    blocks = {}
    for i, b in enumerate(model.input_blocks):
        b.register_forward_hook(lambda m, a, o, i=i: blocks.__setitem__(f"h.input_blocks.{i}", o))
    model.middle_block.register_forward_hook(lambda m, a, o: blocks.__setitem__("h.middle_block", o))
    for i, b in enumerate(model.output_blocks):
        b.register_forward_hook(lambda m, a, o, i=i: blocks.__setitem__(f"h.output_blocks.{i}", o))
    with torch.no_grad():
        out = model(ref["x"], ref["timesteps"], ref["context"], ref.get("y"))
    compared = 0
    for key, value in blocks.items():
        assert (value - ref[key]).abs().max().item() < 1e-4, key
        compared += 1
    assert compared == len([k for k in ref if k.startswith("h.")])
    assert (out - ref["out"]).abs().max().item() < 1e-4
    assert (out.double() - ref["out_fp64"]).abs().max().item() < 1e-4


def test_golden_unet_on_meta_then_assign():
    """Meta construction + assign is how checkpoints load (no second copy); it must give the same numbers."""
    spec = load_json("golden/unet_sd1.json")
    ref = load_tensors("golden/unet_sd1.safetensors")
    with torch.device("meta"):
        model = UNetModel(_config(spec["constructor_kwargs"]))
    model.load_state_dict(golden_state_dict(spec["weights"]), strict=True, assign=True)
    with torch.no_grad():
        out = model.eval()(ref["x"], ref["timesteps"], ref["context"])
    assert (out - ref["out"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("manifest,builtin", [("sd15", "sd15"), ("sd21v", "sd21v"), ("sdxl_base", "sdxl")])
def test_full_size_unet_layout_matches_released_checkpoints(manifest, builtin):
    expected = {k[len(UNET_PREFIX):]: v for k, v in load_json(f"manifests/{manifest}.json").items()
                if k.startswith(UNET_PREFIX)}
    with torch.device("meta"):
        model = UNetModel(builtin_config(builtin).unet)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(expected)
    assert ours == expected


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, num_heads=4, context_dim=16)
    model = UNetModel(cfg).train()
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 16)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(ckpt)
        model(x, t, c).square().mean().backward()
        grads.append(model.input_blocks[1][1].proj_in.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_odd_latent_sizes_line_up():
    """Buckets like 72x64 px give 9x8 latents: the upsampled path must still match every skip."""
    cfg = UNetConfig(model_channels=32, num_heads=4, context_dim=16)
    model = UNetModel(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 9, 8), torch.tensor([10]), torch.randn(1, 3, 16))
    assert out.shape == (1, 4, 9, 8)
