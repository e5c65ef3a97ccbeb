"""Text encoders: golden parity, full-size checkpoint layouts, OpenCLIP mapping, training switches.

Runs under transformers 4.30.2 (A1111's pin, via .ci/transformers430.sh) and 5.x alike.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from reference import golden_state_dict, load_json, load_tensors
from trainer.models import text_encoders as te

TOL = 1e-4
MANIFESTS = {"sd1": "sd15.json", "sd2": "sd21v.json", "sdxl_te1": "sdxl_base.json", "sdxl_te2": "sdxl_base.json"}


@pytest.fixture(scope="module")
def golden() -> dict:
    return load_json("golden/clip_text.json")


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_tensors("golden/clip_text.safetensors")


@pytest.fixture(scope="module")
def clip_l_state(golden) -> dict[str, torch.Tensor]:
    return golden_state_dict(golden["clip_l"]["weights"])  # keys: text_model.…


@pytest.fixture(scope="module")
def openclip_state(golden) -> dict[str, torch.Tensor]:
    return golden_state_dict(golden["openclip"]["weights"])  # keys: model.<open_clip name>


def openclip_small_config(golden) -> te.CLIPTextConfig:
    j = golden["openclip"]
    t = j["text_cfg"]
    assert j["act"].startswith("GELU") and not j["quick_gelu"]
    return te.openclip_config(width=t["width"], layers=t["layers"], heads=t["heads"],
                              mlp_width=j["mlp_width"], embed_dim=j["embed_dim"])


def openclip_checkpoint(openclip_state, role: te.Role) -> dict[str, torch.Tensor]:
    # golden keys are "model." + open_clip name; the role prefix ends in "model."
    return {role.prefix[: -len("model.")] + k: v for k, v in openclip_state.items()}


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    err = (actual.detach().float() - expected.float()).abs().max().item()
    assert err <= TOL, err


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes()


# ------------------------------------------------------------------------------------------- golden

@torch.no_grad()
def test_clip_l_golden(golden, tensors, clip_l_state):
    cfg = golden["clip_l"]["config"]
    ids = tensors["clip_l.tokens"]
    sd1 = te.load_text_encoder({te.PREFIX_SD1 + k: v for k, v in clip_l_state.items()}, "sd1", cfg).eval()

    out = sd1.text_model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    for i in range(3):
        close(out.hidden_states[i], tensors[f"clip_l.hidden_states.{i}"])
    close(out.last_hidden_state, tensors["clip_l.last_hidden_state"])
    close(out.pooler_output, tensors["clip_l.pooler_output"])

    close(sd1(ids).hidden, tensors["clip_l.last_hidden_state"])
    close(sd1(ids).hidden, tensors["a1111.sd1.clip_skip_1"])
    assert sd1(ids).pooled is None
    sd1.clip_skip = 2  # A1111 / kohya: final_layer_norm(hidden_states[-2])
    close(sd1(ids).hidden, tensors["clip_l.penultimate_final_ln"])
    close(sd1(ids).hidden, tensors["a1111.sd1.clip_skip_2"])
    sd1.clip_skip = 3
    with pytest.raises(ValueError):
        sd1(ids)

    # SDXL TE1: same weights under the SDXL prefix, penultimate layer without final LN; the file's
    # position_ids may be missing (accepted under both transformers versions)
    ckpt = {te.PREFIX_SDXL_TE1 + k: v for k, v in clip_l_state.items() if not k.endswith("position_ids")}
    te1 = te.load_text_encoder(ckpt, te.SDXL_TE1, cfg).eval()
    close(te1(ids).hidden, tensors["clip_l.hidden_states.1"])
    assert torch.equal(te1.text_model.embeddings.position_ids, torch.arange(77).expand(1, -1))


@torch.no_grad()
def test_openclip_golden(golden, tensors, openclip_state):
    cfg = openclip_small_config(golden)
    ids = tensors["openclip.tokens"]
    assert (ids == 0).any(), "OpenCLIP pads with 0: pooling must still find the EOT"

    sd2 = te.load_text_encoder(openclip_checkpoint(openclip_state, te.SD2), "sd2", cfg).eval()
    out = sd2.text_model(input_ids=ids, output_hidden_states=True)
    for i in range(3):
        close(out.hidden_states[i], tensors[f"openclip.hidden.{i}"])
    close(out.last_hidden_state, tensors["openclip.last"])
    z = sd2(ids)
    close(z.hidden, tensors["openclip.penultimate_ln_final"])
    close(z.hidden, tensors["a1111.sd2"])
    assert z.pooled is None
    assert set(sd2.aside) == {"logit_scale", "text_projection"}

    te2 = te.load_text_encoder(openclip_checkpoint(openclip_state, te.SDXL_TE2), "sdxl_te2", cfg).eval()
    z = te2(ids)
    close(z.hidden, tensors["openclip.penultimate"])
    close(z.hidden, tensors["a1111.sdxl_te2"])
    close(z.pooled, tensors["openclip.pooled"])
    close(z.pooled, tensors["a1111.sdxl_te2.pooled"])
    assert set(te2.aside) == {"logit_scale"}


# ------------------------------------------------------------------------------- full-size layouts

def deliberately_absent(enc: te.TextEncoder) -> dict[str, str]:
    """Manifest keys a meta-built encoder does not produce, each with its reason."""
    role, absent = enc.role, {}
    if not role.openclip and te.POSITION_IDS not in enc.state_dict():
        absent[role.prefix + te.POSITION_IDS] = \
            "non-persistent buffer in transformers >= 4.31 (rebuilt as arange on load, file value ignored)"
    if role.openclip:
        absent[role.prefix + "logit_scale"] = "no transformers counterpart: held aside (TextEncoder.aside)"
        if not role.projection:
            absent[role.prefix + "text_projection"] = "SD2 uses no projection (CLIPTextModel): held aside"
    return absent


@pytest.mark.parametrize("role", list(te.ROLES))
def test_full_size_layout_matches_manifest(role):
    manifest = load_json(f"manifests/{MANIFESTS[role]}")
    enc = te.build_text_encoder(role, device="meta")
    expected = {k: s for k, s in manifest.items() if k.startswith(enc.role.prefix)}
    produced = {k: list(v.shape) for k, v in enc.checkpoint_state_dict().items()}

    absent = deliberately_absent(enc)
    assert set(produced) - set(expected) == set()
    assert set(expected) - set(produced) == set(absent), absent
    assert {k: s for k, s in expected.items() if k not in absent} == produced

    # header-only mapping agrees with the module's own names
    own = set(enc.state_dict())
    assert set(te.encoder_keys(manifest, role)) | {te.POSITION_IDS} == own | {te.POSITION_IDS}

    # strict, assigning load of a full-size checkpoint (meta tensors) with and without position_ids
    ckpt = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    for drop in ([], [enc.role.prefix + te.POSITION_IDS]):
        loaded = te.load_text_encoder({k: v for k, v in ckpt.items() if k not in drop}, role)
        # held-aside tensors come back; position_ids only where the installed transformers keeps it
        assert {k: list(v.shape) for k, v in loaded.checkpoint_state_dict().items()} == \
            {k: s for k, s in expected.items() if not k.endswith(te.POSITION_IDS) or k in produced}


@pytest.mark.parametrize("file,roles", [("sd15.json", {"lora_te": "sd1"}), ("sd2.json", {"lora_te": "sd2"}),
                                        ("sdxl.json", {"lora_te1": "sdxl_te1", "lora_te2": "sdxl_te2"})])
def test_kohya_lora_module_paths_exist(file, roles):
    """kohya names text-encoder LoRAs after these module paths; they must exist with matching shapes."""
    data = load_json(f"lora_keys/{file}")
    encoders = {p: dict(te.build_text_encoder(r, device="meta").named_modules()) for p, r in roles.items()}
    count = 0
    for m in data["modules"]:
        prefix = m["name"].split("_text_model_")[0]
        if prefix not in encoders:
            continue
        module = encoders[prefix][m["module"]]
        assert isinstance(module, nn.Linear)
        assert (module.in_features, module.out_features) == (m["lora_down"][1], m["lora_up"][0])
        count += 1
    assert count == data["counts"]["text_encoder"]


# ------------------------------------------------------------------------------------ OpenCLIP mapping

@pytest.mark.parametrize("role", [te.SD2, te.SDXL_TE2])
def test_openclip_round_trip_bitwise(openclip_state, golden, role):
    ckpt = openclip_checkpoint(openclip_state, role)
    own, aside = te.encoder_state_dict(ckpt, role)
    back = te.checkpoint_state_dict(own, role, aside)
    assert list(back) != [] and set(back) == set(ckpt)
    assert all(bitwise_equal(back[k], ckpt[k]) for k in ckpt)

    # views only: q/k/v and the projection share the checkpoint's storage
    fused = ckpt[role.prefix + "transformer.resblocks.0.attn.in_proj_weight"]
    for p in ("q_proj", "k_proj", "v_proj"):
        t = own[f"text_model.encoder.layers.0.self_attn.{p}.weight"]
        assert t.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    if role.projection:
        assert own["text_projection.weight"].data_ptr() == ckpt[role.prefix + "text_projection"].data_ptr()

    # through a loaded module, too (held-aside tensors come back)
    enc = te.load_text_encoder(ckpt, role, openclip_small_config(golden))
    back = enc.checkpoint_state_dict()
    assert set(back) == set(ckpt) and all(bitwise_equal(back[k], ckpt[k]) for k in ckpt)


def test_load_from_safetensors_mmap_takes_tensors_over(tmp_path, openclip_state, golden):
    from safetensors.torch import load_file, save_file
    path = tmp_path / "te2.safetensors"
    save_file(openclip_checkpoint(openclip_state, te.SDXL_TE2), str(path))
    ckpt = load_file(str(path))
    enc = te.load_text_encoder(ckpt, te.SDXL_TE2, openclip_small_config(golden))
    q = enc.text_model.encoder.layers[1].self_attn.q_proj.weight
    fused = ckpt[te.PREFIX_SDXL_TE2 + "transformer.resblocks.1.attn.in_proj_weight"]
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert enc.text_model.embeddings.token_embedding.weight.data_ptr() == \
        ckpt[te.PREFIX_SDXL_TE2 + "token_embedding.weight"].data_ptr()
    assert not any(t.is_meta for t in list(enc.parameters()) + list(enc.buffers()))


def test_unknown_openclip_key_is_loud():
    with pytest.raises(KeyError):
        te.openclip_to_hf({"transformer.resblocks.0.attn.weird": torch.zeros(1)})


# ------------------------------------------------------------------------------------------ training

def test_gradient_checkpointing_and_requires_grad(golden, clip_l_state, tensors):
    enc = te.load_text_encoder({te.PREFIX_SD1 + k: v.clone() for k, v in clip_l_state.items()}, "sd1",
                               golden["clip_l"]["config"])
    enc.requires_grad_(False)
    trained = [enc.text_model.encoder.layers[0].self_attn.q_proj.weight, enc.text_model.encoder.layers[1].mlp.fc2.bias]
    for p in trained:
        p.requires_grad_(True)
    enc.train()
    ids = tensors["clip_l.tokens"][:2]

    def grads() -> list[torch.Tensor]:
        for p in trained:
            p.grad = None
        enc(ids).hidden.square().mean().backward()
        return [p.grad.clone() for p in trained]

    plain = grads()
    enc.set_gradient_checkpointing(True)
    assert enc.gradient_checkpointing
    # frozen embeddings feed the first layer: non-reentrant checkpointing still reaches its weights
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    enc.set_gradient_checkpointing(False)
    assert not enc.gradient_checkpointing
    assert enc.text_model.embeddings.token_embedding.weight.grad is None


def test_config_from_folder(tmp_path, golden):
    text = golden["clip_l"]["config"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": text}))
    enc = te.build_text_encoder("sd1", tmp_path, device="meta")
    assert (enc.config.hidden_size, enc.config.num_hidden_layers, enc.config.hidden_act) == (64, 2, "quick_gelu")
    full = te.clip_l_config()
    assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads, full.intermediate_size,
            full.hidden_act, full.eos_token_id) == (768, 12, 12, 3072, "quick_gelu", 49407)
