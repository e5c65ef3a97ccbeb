"""ModelBundle conditioning end to end: prompt text → tokenizer → encoders → what each family's UNet sees.

Uses the golden small text encoders and the reference tokenizer, so the expected tensors are the
reference implementations' own outputs (ldm / sgm / A1111) for the same prompts.
"""
import math

import numpy as np
import pytest
import torch

from reference import golden_state_dict, load_json, load_tensors, reference_dir
from trainer.models import text_encoders as te
from trainer.models.bundle import ModelBundle
from trainer.models.configs import ModelConfig, TextEncoderSpec, VAEConfig
from trainer.models.schedule import NoiseSchedule
from trainer.models.tokenizer import ClipTokenizer
from trainer.models.unet import UNetConfig, UNetModel
from trainer.models.vae import AutoencoderKL

TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    j = load_json("golden/clip_text.json")
    return j, load_tensors("golden/clip_text.safetensors")


def _clip_l(j, role):
    cfg = te.load_text_config(j["clip_l"]["config"])
    state = {te.ROLES[role].prefix + k: v for k, v in golden_state_dict(j["clip_l"]["weights"]).items()}
    return te.load_text_encoder(state, role, cfg), cfg


def _openclip(j, role):
    o = j["openclip"]
    cfg = te.openclip_config(o["text_cfg"]["width"], o["text_cfg"]["layers"], o["text_cfg"]["heads"],
                             o["mlp_width"], o["embed_dim"])
    prefix = te.ROLES[role].prefix[: -len("model.")]
    state = {prefix + k: v for k, v in golden_state_dict(o["weights"]).items()}
    return te.load_text_encoder(state, role, cfg), cfg


def _bundle(family, encoders, adm=None):
    unet_cfg = UNetConfig(model_channels=32, num_heads=4, context_dim=sum(e.config.hidden_size for e in encoders),
                          adm_in_channels=adm)
    cfg = ModelConfig(family, unet_cfg, VAEConfig(ch=32, ch_mult=(1, 1, 2, 2)),
                      [TextEncoderSpec(e.role.name, e.config) for e in encoders], native_size=(1024, 1024))
    tok = ClipTokenizer.from_folder(reference_dir() / "tokenizer")
    return ModelBundle(cfg, UNetModel(unet_cfg), AutoencoderKL(**cfg.vae.kwargs()), encoders, tok, NoiseSchedule())


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < TOL


def test_sd1_last_layer_and_clip_skip(golden):
    j, t = golden
    enc, _ = _clip_l(j, "sd1")
    b = _bundle("sd1", [enc])
    with torch.no_grad():
        close(b.encode_prompts(j["prompts"])["context"], t["a1111.sd1.clip_skip_1"])
        close(b.encode_prompts(j["prompts"], clip_skip=2)["context"], t["a1111.sd1.clip_skip_2"])


def test_sd2_penultimate_with_ln_final(golden):
    j, t = golden
    enc, _ = _openclip(j, "sd2")
    b = _bundle("sd2", [enc])
    with torch.no_grad():
        close(b.encode_prompts(j["prompts"])["context"], t["a1111.sd2"])


def _sinusoid(value, dim=256):
    """sgm's size embedding, computed independently in numpy float32 as sgm does it (cosines first)."""
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float32) / half).astype(np.float32)
    args = np.float32(value) * freqs
    return list(np.cos(args)) + list(np.sin(args))


def test_sdxl_two_encoders_pooled_and_size_vector(golden):
    j, t = golden
    e1, _ = _clip_l(j, "sdxl_te1")
    e2, _ = _openclip(j, "sdxl_te2")
    adm = e2.config.projection_dim + 6 * 256
    b = _bundle("sdxl", [e1, e2], adm=adm)
    with torch.no_grad():
        cond = b.encode_prompts(j["prompts"], size=(1024, 768), crop=(16, 8), original_size=(2048, 1536))
    close(cond["context"], torch.cat([t["clip_l.hidden_states.1"], t["a1111.sdxl_te2"]], dim=-1))
    y = cond["y"]
    assert y.shape == (len(j["prompts"]), adm)
    close(y[:, :64], t["a1111.sdxl_te2.pooled"])
    expected = torch.tensor([sum((_sinusoid(v) for v in (2048, 1536, 16, 8, 1024, 768)), [])]).float()
    # fp32 arguments near 2048 have a spacing of 1.2e-4, so an independent fp32 computation agrees to ~1e-4.
    assert (y[:, 64:] - expected).abs().max().item() < 5e-4
    with torch.no_grad():   # the UNet accepts it
        out = b.unet_call(torch.randn(len(j["prompts"]), 4, 8, 8), torch.full((len(j["prompts"]),), 500), cond)
    assert out.shape == (len(j["prompts"]), 4, 8, 8)


def test_long_prompts_chunk_and_pad_to_match(golden):
    j, _ = golden
    enc, _ = _clip_l(j, "sd1")
    b = _bundle("sd1", [enc])
    long_prompt = ", ".join(["a red circle on a white background"] * 12)
    with torch.no_grad():
        cond = b.encode_prompts([long_prompt, "a cat"])
        assert cond["context"].shape[1] == 77 * 2
        # the short prompt's second chunk is the empty-prompt chunk
        close(cond["context"][1, 77:], b.encode_prompts([""])["context"][0])
        a, u = b.match_lengths(b.encode_prompts([long_prompt]), b.encode_prompts([""]))
        assert a["context"].shape == u["context"].shape


def test_emphasis_changes_only_weighted_prompts(golden):
    j, _ = golden
    enc, _ = _clip_l(j, "sd1")
    b = _bundle("sd1", [enc])
    with torch.no_grad():
        plain = b.encode_prompts(["a red circle"])["context"]
        same = b.encode_prompts(["a (red:1.0) circle"])["context"]
        weighted = b.encode_prompts(["a (red:1.5) circle"])["context"]
    close(plain, same)
    assert (plain - weighted).abs().max() > 1e-3
    assert abs(plain.mean().item() - weighted.mean().item()) < 1e-5   # A1111 restores the mean
