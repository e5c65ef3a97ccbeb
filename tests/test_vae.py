"""AutoencoderKL against the ldm golden run, and its key layout against the full-size manifests."""
from __future__ import annotations

import pytest
import torch
from reference import golden_state_dict, load_json, load_tensors

from trainer.models.vae import SCALE_FACTORS, AutoencoderKL, DiagonalGaussian

TOL = 1e-4
EXPECTED_TENSORS = {"image", "enc.h", "moments", "posterior.mean", "posterior.logvar", "posterior.std",
                    "dec.post_quant_conv", "decoded", "decoded_fp64", "posterior.mean_fp64"}
SD_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                   ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope="module")
def golden():
    spec = load_json("golden/vae.json")
    tensors = load_tensors("golden/vae.safetensors")
    return spec, tensors, golden_state_dict(spec["weights"])


@pytest.fixture(scope="module")
def vae(golden):
    spec, _, sd = golden
    model = AutoencoderKL(**spec["constructor_kwargs"]).eval()
    model.load_state_dict(sd, strict=True)
    return model


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs().max().item()
    assert err < TOL, err


def test_golden_file_lists_expected_tensors(golden):
    spec, tensors, _ = golden
    assert set(tensors) == EXPECTED_TENSORS
    assert set(spec["files"]["vae.safetensors"]) == EXPECTED_TENSORS


def test_state_dict_names_match_golden(golden):
    spec, _, sd = golden
    model = AutoencoderKL(**spec["constructor_kwargs"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in sd.items()}


def test_matches_ldm_golden(vae, golden):
    _, t, _ = golden
    with torch.no_grad():
        h = vae.encoder(t["image"])
        _close(h, t["enc.h"])
        moments = vae.quant_conv(h)
        _close(moments, t["moments"])
        post = vae.encode(t["image"])
        _close(post.mean, t["posterior.mean"])
        _close(post.logvar, t["posterior.logvar"])
        _close(post.std, t["posterior.std"])
        _close(vae.post_quant_conv(post.mean), t["dec.post_quant_conv"])
        _close(vae.decode(t["posterior.mean"]), t["decoded"])
        _close(vae.decode(post.mode()), t["decoded"])


def test_meta_construction_then_assign_load(golden):
    spec, t, sd = golden
    with torch.device("meta"):
        model = AutoencoderKL(**spec["constructor_kwargs"])
    model.load_state_dict(sd, strict=True, assign=True)
    with torch.no_grad():
        _close(model.eval().decode(t["posterior.mean"]), t["decoded"])


def test_gradient_checkpointing_same_grads(golden):
    spec, t, sd = golden
    x = t["image"][:1, :, :32, :32]
    grads = []
    for flag in (False, True):
        model = AutoencoderKL(**spec["constructor_kwargs"], gradient_checkpointing=flag)
        model.load_state_dict(sd)
        model.train()
        model.decode(model.encode(x).mean).square().mean().backward()
        grads.append(model.encoder.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_posterior_clamp_and_seeded_sample():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 50.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.max().item() == 20.0
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    post = DiagonalGaussian(moments)
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    torch.testing.assert_close(post.var, post.std ** 2)


@pytest.mark.parametrize("manifest", ["manifests/sd15.json", "manifests/sdxl_base.json"])
def test_full_size_keys_match_manifest(manifest):
    prefix = "first_stage_model."
    expected = {k[len(prefix):]: list(v) for k, v in load_json(manifest).items() if k.startswith(prefix)}
    assert len(expected) == 248
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=SD_DDCONFIG, embed_dim=4)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    assert ours["encoder.mid.attn_1.q.weight"] == [512, 512, 1, 1]


def test_scale_factors():
    assert SCALE_FACTORS == {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
