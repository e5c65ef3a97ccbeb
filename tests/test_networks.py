"""trainer.networks: kohya key sets and names, A1111 binding, hooks/multiplier/stacking, the file, hashes.

Full-size SD1.5 / SD2 / SDXL architectures are built on the meta device (no memory, no weights); the
behaviour tests run on the random tiny SD1 bundle with 8×8 latents.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import stat
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from reference import load_json, reference_dir
from trainer.errors import UserError
from trainer.models.configs import builtin_config
from trainer.models.loader import random_tiny_bundle
from trainer.models.text_encoders import build_text_encoder
from trainer.models.unet import UNetConfig, UNetModel
from trainer.networks import (NetworkSpec, build_metadata, create_network, file_model_hash, kohya_hashes,
                              kohya_names, load_lora, name_table, network_from_state_dict, networks_off,
                              resume_network, save_lora, split_modules)
from trainer.networks import modules as M
from trainer.networks.targets import diffusers_path, unet_lora_names

KOHYA_FILE = "lora_keys/kohya_sd15_rank4.safetensors"
PROMPTS = ["a red circle", "blue square"]


# ------------------------------------------------------------------------------------------ fixtures

def meta_model(name: str) -> SimpleNamespace:
    cfg = builtin_config(name)
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    tes = [build_text_encoder(s.role, s.config, device="meta") for s in cfg.text_encoders]
    return SimpleNamespace(unet=unet, text_encoders=tes, family=cfg.family, prediction_type=cfg.prediction_type)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def meta_models() -> dict:
    return {n: meta_model(n) for n in ("sd15", "sd21v", "sdxl")}


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_bundle(seed=0, device="cpu")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600]), torch.randn(2, 4, 8, 8, generator=g)


def run(bundle, inputs) -> torch.Tensor:
    x, t, _ = inputs
    with torch.no_grad():
        return bundle.unet(x, t, bundle.encode_prompts(PROMPTS)["context"])


def train(bundle, net, inputs, steps: int = 1, lr: float = 1e-2) -> None:
    x, t, target = inputs
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=lr)
    for _ in range(steps):
        out = bundle.unet(x, t, bundle.encode_prompts(PROMPTS)["context"])
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def spec(network_type="lierla", **kw) -> NetworkSpec:
    kw.setdefault("rank", 4)
    kw.setdefault("alpha", 1)
    kw.setdefault("seed", 0)
    return NetworkSpec(network_type, **kw)


REF_SETS = [("sd15", "sd15", False), ("sd15", "sd15_locon", True), ("sdxl", "sdxl", False),
            ("sdxl", "sdxl_locon", True)]


def kohya_like(model, locon: bool):
    return create_network(model, spec("c3lier" if locon else "lierla", conv_rank=4 if locon else 0,
                                      conv_alpha=1 if locon else 0))


# ------------------------------------------------------------------------------------------ key sets

@pytest.mark.parametrize("model_name,ref,locon", REF_SETS)
def test_key_sets_equal_kohya(meta_models, model_name, ref, locon):
    """Names, lora_down/lora_up shapes and 0-d alphas equal kohya's create_network output exactly."""
    reference = load_json(f"lora_keys/{ref}.json")
    net = kohya_like(meta_models[model_name], locon)
    ours = {k: list(v.shape) for k, v in net.kohya_state_dict().items()}
    assert ours == reference["state_dict"]
    assert net.te_count() == reference["counts"]["text_encoder"]
    assert net.unet_count() == reference["counts"]["unet"]
    assert {m["name"] for m in reference["modules"]} == set(net.names())


@pytest.mark.parametrize("ref,locon", [("sd2", False), ("sd2_locon", True)])
def test_sd2_key_sets_differ_only_in_linear_proj(meta_models, ref, locon):
    """SD2: kohya writes proj_in/proj_out as 1×1-conv factors [r, C, 1, 1]; our SD2 UNet (like the
    checkpoint) has Linear projections, so we write [r, C] / [C, r]. Nothing else differs."""
    reference = load_json(f"lora_keys/{ref}.json")["state_dict"]
    ours = {k: list(v.shape) for k, v in kohya_like(meta_models["sd21v"], locon).kohya_state_dict().items()}
    assert set(ours) == set(reference)
    differ = {k for k in ours if ours[k] != reference[k]}
    proj = {k for k in ours if re.search(r"_proj_(in|out)\.lora_(down|up)\.weight$", k) and k.startswith("lora_unet")}
    assert differ == proj and len(proj) == 64
    for k in differ:
        assert reference[k] == ours[k] + [1, 1]


@pytest.mark.parametrize("ref,model_name", [("sd15", "sd15"), ("sd15_locon", "sd15"), ("sdxl", "sdxl"),
                                            ("sdxl_locon", "sdxl"), ("sd2", "sd21v"), ("sd2_locon", "sd21v")])
def test_names_bind_where_a1111_binds(meta_models, ref, model_name):
    """Every kohya name maps to our layer whose checkpoint weight (and OpenCLIP q/k/v rows) is the one
    A1111 binds the name to; the UNet name is derived from our ldm path by rule."""
    m = meta_models[model_name]
    table = name_table(m.unet, m.text_encoders, m.family)
    for entry in load_json(f"lora_keys/{ref}.json")["modules"]:
        target = table[entry["name"]]
        assert target.name == entry["name"]
        weight, rows = target.checkpoint_weight()
        assert weight == entry["checkpoint_weight"], entry["name"]
        assert (list(rows) if rows else None) == entry.get("checkpoint_rows")
        assert weight.startswith(entry["checkpoint_module"])
        if target.part == "unet":
            path = entry["checkpoint_module"].removeprefix("model.diffusion_model.")
            assert target.path == path
            assert unet_lora_names(m.unet, path, m.family)[0] == entry["name"]
            if m.family != "sdxl":
                assert "lora_unet_" + diffusers_path(m.unet, path).replace(".", "_") == entry["name"]
                assert entry["module"] == diffusers_path(m.unet, path)
        lora_down = entry["lora_down"]
        assert target.module.weight.shape[1] == lora_down[1] and target.module.weight.shape[0] == entry["lora_up"][0]


def test_kohya_file_loads_into_sd15(meta_models):
    """kohya's real SD1.5 file: every module resolves to a layer of ours with matching shapes."""
    tensors, _ = load_lora(reference_dir() / KOHYA_FILE)
    net = network_from_state_dict(meta_models["sd15"], tensors)
    assert len(net.targets) == 264 and net.spec.network_type == "lierla"
    assert (net.spec.rank, net.spec.alpha) == (4, 1.0)
    assert set(net.kohya_state_dict()) == set(tensors)


# ------------------------------------------------------------------------------------------ selection

def test_blocks_elements_and_counts(meta_models, caplog):
    sd15 = meta_models["sd15"]
    full = create_network(sd15, spec())
    assert full.counts["BASE"] == 72 and full.counts["IN01"] == 12 and "IN00" not in full.counts
    assert sum(full.counts.values()) == 264
    for element, attn in (("SelfAttention", ".attn1."), ("CrossAttention", ".attn2.")):
        net = create_network(sd15, spec(element=element))
        unet = [t for t in net.targets.values() if t.part == "unet"]
        assert len(unet) == 64 and all(attn in t.path for t in unet)
        assert net.te_count() == 72  # BASE selected: text encoder kept whatever the element
    net = create_network(sd15, spec(blocks=["IN01", "mid", "OUT11"]))
    assert net.counts == {"IN01": 12, "M00": 12, "OUT11": 12} and net.te_count() == 0
    with pytest.raises(UserError, match="select no UNet layer"):
        create_network(sd15, spec(blocks=["BASE", "IN00"]))
    with pytest.raises(UserError, match="select no UNet layer"):
        create_network(sd15, spec(blocks=["IN10", "IN11"]))          # ResNet-only blocks, lierla
    assert create_network(sd15, spec("c3lier", blocks=["IN10", "IN11"])).counts == {"IN10": 3, "IN11": 3}
    with pytest.raises(UserError, match="network_blocks"):
        create_network(sd15, spec(blocks=["IN1X"]))
    with pytest.raises(UserError, match="network_element"):
        create_network(sd15, spec(element="Attention"))
    with caplog.at_level(logging.WARNING):
        xl = create_network(meta_models["sdxl"], spec(blocks=["BASE", "IN04", "IN11"]))
    assert "IN11" in caplog.text and set(xl.counts) == {"BASE", "IN04"}
    assert "per block: BASE 264, IN04 22" in xl.describe()


# ------------------------------------------------------------------------------------------ behaviour

@pytest.mark.parametrize("network_type,dora", [("lierla", False), ("c3lier", False), ("loha", False),
                                               ("lokr", False), ("lierla", True)])
def test_fresh_network_changes_nothing(tiny, inputs, network_type, dora):
    base = run(tiny, inputs)
    net = create_network(tiny, spec(network_type, dora=dora)).apply_to(tiny)
    try:
        assert (run(tiny, inputs) - base).abs().max() < 1e-6
    finally:
        net.remove()


def test_training_leaves_base_untouched_and_multiplier_zero_is_off(tiny, inputs):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in tiny.text_encoders[0].state_dict().items()}
    base = run(tiny, inputs)
    net = create_network(tiny, spec("c3lier")).apply_to(tiny)
    try:
        train(tiny, net, inputs)
        assert all(p.grad is None and not p.requires_grad for p in tiny.unet.parameters())
        assert all(p.grad is None for p in tiny.text_encoders[0].parameters())
        assert all(torch.equal(v, before[k]) for k, v in tiny.unet.state_dict().items())
        assert all(torch.equal(v, te_before[k]) for k, v in tiny.text_encoders[0].state_dict().items())
        on = run(tiny, inputs)
        assert (on - base).abs().max() > 1e-4
        with net.off():
            assert torch.equal(run(tiny, inputs), base)
        with networks_off():
            assert torch.equal(run(tiny, inputs), base)
        assert net.multiplier == 1.0 and torch.equal(run(tiny, inputs), on)
    finally:
        net.remove()
    assert torch.equal(run(tiny, inputs), base)


def test_remove_leaves_no_hook(tiny):
    net = create_network(tiny, spec("c3lier")).apply_to(tiny)
    modules = [t.module for t in net.targets.values()]
    assert all(len(m._forward_hooks) == 1 for m in modules)
    with pytest.raises(RuntimeError):
        net.apply_to(tiny)
    net.remove()
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in modules)
    assert all(type(m).forward is m.forward.__func__ for m in modules)


def _randomize(net, std=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def test_stacked_networks_add(tiny, inputs):
    """Copier (frozen, weight 1) + trained LoRA on the same layers = the base weights plus both ΔW."""
    copier = _randomize(create_network(tiny, spec("c3lier", rank=8, seed=1)), seed=4).freeze()
    lora = _randomize(create_network(tiny, spec("lierla", seed=2)), seed=5)
    merged = copy.deepcopy(tiny)
    with torch.no_grad():
        for net in (copier, lora):
            for name, t in net.targets.items():
                root = merged.unet if t.part == "unet" else merged.text_encoders[t.encoder]
                root.get_submodule(t.path).weight += M.delta_weight(net.adapters[name], t.module, 1.0)
    copier.apply_to(tiny)
    lora.apply_to(tiny)
    try:
        assert not any(p.requires_grad for p in copier.parameters())
        assert lora.trainable_parameters() and not copier.trainable_parameters()
        stacked = run(tiny, inputs)
        assert (run(merged, inputs) - stacked).abs().max() < 1e-4
        with lora.off():
            only_copier = run(tiny, inputs)
        assert (only_copier - stacked).abs().max() > 1e-4
    finally:
        copier.remove()
        lora.remove()


def test_param_groups(tiny):
    net = create_network(tiny, spec())
    groups = net.trainable_parameters(unet_lr=1e-4, te_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("text_encoder", 5e-5)]
    n_unet = sum(p.numel() for p in groups[0]["params"])
    n_te = sum(p.numel() for p in groups[1]["params"])
    assert n_unet + n_te == sum(p.numel() for p in net.parameters())   # the model's own weights are not in it
    assert not {id(p) for p in net.parameters()} & {id(p) for p in tiny.unet.parameters()}
    assert not any(k.startswith(("unet", "text_encoders")) for k, _ in net.named_modules())
    unet_only = create_network(tiny, spec(blocks=["IN01", "OUT11"]))
    assert [g["name"] for g in unet_only.trainable_parameters()] == ["unet"]


def test_apply_to_another_bundle(tiny, inputs):
    other = random_tiny_bundle(seed=7, device="cpu")
    net = _randomize(create_network(tiny, spec()))
    own = [t.module for t in net.targets.values()]
    net.apply_to(other)
    try:
        assert all(not m._forward_hooks for m in own)
        assert all(t.module is other.unet.get_submodule(t.path) for t in net.targets.values() if t.part == "unet")
        with net.off():
            off = run(other, inputs)
        assert (run(other, inputs) - off).abs().max() > 1e-4
    finally:
        net.remove()


# ------------------------------------------------------------------------------------------ the file

def _outputs_with(bundle, net, inputs):
    net.apply_to(bundle)
    try:
        return run(bundle, inputs)
    finally:
        net.remove()


@pytest.mark.parametrize("network_type,dora", [("lierla", False), ("c3lier", False), ("loha", False),
                                               ("lokr", False), ("lierla", True), ("c3lier", True)])
def test_train_save_load_round_trip(tiny, inputs, tmp_path, network_type, dora):
    net = create_network(tiny, spec(network_type, dora=dora)).apply_to(tiny)
    try:
        train(tiny, net, inputs)
        trained = run(tiny, inputs)
    finally:
        net.remove()
    path = save_lora(net, tmp_path / "x.safetensors", {"ss_output_name": "x"}, dtype="fp32")
    fresh = create_network(tiny, spec(network_type, dora=dora, seed=9))
    resume_network(fresh, path)
    assert torch.equal(_outputs_with(tiny, fresh, inputs), trained)
    tensors, metadata = load_lora(path)
    loaded = network_from_state_dict(tiny, tensors)
    assert loaded.spec.network_type == network_type and loaded.spec.dora == dora
    assert torch.equal(_outputs_with(tiny, loaded, inputs), trained)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    _check_consumer_semantics(net, tensors)


def _consumer_delta(found: dict, weight: torch.Tensor) -> torch.Tensor:
    """ΔW at multiplier 1 as A1111's Lora extension computes it from file tensors (written from its rules)."""
    shape = weight.shape
    if "lora_down.weight" in found:
        up, down = found["lora_up.weight"], found["lora_down.weight"]
        dim = down.shape[0]
        dw = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    elif "hada_w1_a" in found:
        dim = found["hada_w1_b"].shape[0]
        dw = ((found["hada_w1_a"] @ found["hada_w1_b"]) * (found["hada_w2_a"] @ found["hada_w2_b"])).reshape(shape)
    else:
        w1 = found.get("lokr_w1")
        w1 = w1 if w1 is not None else found["lokr_w1_a"] @ found["lokr_w1_b"]
        w2 = found.get("lokr_w2")
        w2 = w2 if w2 is not None else found["lokr_w2_a"] @ found["lokr_w2_b"]
        dim = found["lokr_w1_b"].shape[0] if "lokr_w1_b" in found else \
            found["lokr_w2_b"].shape[0] if "lokr_w2_b" in found else None
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        dw = torch.kron(w1, w2).reshape(shape)
    scale = found["alpha"].item() / dim if dim is not None and "alpha" in found else 1.0
    dw = dw * scale
    if "dora_scale" in found:
        merged = dw + weight
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))
        dw = merged * (found["dora_scale"] / norm) - weight
    return dw


def _check_consumer_semantics(net, tensors):
    """Each hooked layer computes exactly base(x) + what A1111 would add from the saved tensors, at
    weight 1 and at weight -0.25 (A1111 scales the final ΔW, DoRA included, by the weight)."""
    net.apply_to()
    try:
        g = torch.Generator().manual_seed(0)
        for name, found in split_modules(tensors).items():
            org = net.targets[name].module
            dw = _consumer_delta(found, org.weight)
            for k in (1.0, -0.25):
                with torch.no_grad(), net.at(k):
                    if isinstance(org, torch.nn.Linear):
                        x = torch.randn(3, org.in_features, generator=g)
                        want = F.linear(x, org.weight + k * dw, org.bias)
                    else:
                        x = torch.randn(1, org.in_channels, 8, 8, generator=g)
                        want = F.conv2d(x, org.weight + k * dw, org.bias, org.stride, org.padding)
                    assert (org(x) - want).abs().max() < 1e-4, (name, k)
    finally:
        net.remove()


def test_gradient_checkpointing_gives_the_same_gradients(tiny, inputs):
    """Hooks run again in the recomputation, so checkpointed training gets the same LoRA gradients."""
    net = _randomize(create_network(tiny, spec("c3lier"))).apply_to(tiny)
    x, t, target = inputs
    grads = []
    try:
        for enabled in (False, True):
            tiny.unet.set_gradient_checkpointing(enabled)
            tiny.text_encoders[0].set_gradient_checkpointing(enabled)
            tiny.unet.train()
            tiny.text_encoders[0].train()
            net.zero_grad()
            out = tiny.unet(x, t, tiny.encode_prompts(PROMPTS)["context"])
            F.mse_loss(out, target).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
    finally:
        tiny.unet.set_gradient_checkpointing(False)
        tiny.text_encoders[0].set_gradient_checkpointing(False)
        tiny.eval()
        net.remove()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*grads))
    assert any(g.abs().max() > 0 for g in grads[0])


def test_strength_is_baked(tiny, tmp_path):
    net = _randomize(create_network(tiny, spec("c3lier")))
    for s in (0.5, -2.0):
        path = save_lora(net, tmp_path / f"s{s}.safetensors", dtype="fp32", strength=s)
        loaded = network_from_state_dict(tiny, load_lora(path)[0])
        for name, t in net.targets.items():
            a = M.delta_weight(net.adapters[name], t.module, 1.0)
            b = M.delta_weight(loaded.adapters[name], t.module, 1.0)
            assert torch.allclose(b, s * a, rtol=1e-5, atol=1e-7), name
        found = split_modules(load_lora(path)[0])
        some = next(iter(found.values()))
        assert some["alpha"].item() == 1.0  # alpha untouched; up and down take √|s| each
    for nt in ("loha", "lokr"):
        other = _randomize(create_network(tiny, spec(nt)))
        loaded = network_from_state_dict(tiny, other.kohya_state_dict(strength=-0.25))
        for name, t in other.targets.items():
            assert torch.allclose(M.delta_weight(loaded.adapters[name], t.module, 1.0),
                                  -0.25 * M.delta_weight(other.adapters[name], t.module, 1.0), rtol=1e-4, atol=1e-7)
    with pytest.raises(UserError, match="DoRA"):
        create_network(tiny, spec(dora=True)).kohya_state_dict(strength=0.5)


def test_fp16_file_follows_kohya_conventions(tiny, tmp_path):
    """Same key set, key pattern, tensor ranks, dtype (F16, alpha included) and minimum metadata as
    kohya's real SD1.5 file: the tiny model has SD1's block structure, so even the UNet names coincide
    (its text encoder has 2 layers, so its TE keys are those of kohya's layers 0–1)."""
    net = create_network(tiny, spec())
    path = save_lora(net, tmp_path / "t.safetensors", {"ss_output_name": "t", "ss_resolution": (64, 64),
                                                        "ss_tag_frequency": {"1_x": {"red": 1}}, "ss_seed": 42,
                                                        "ss_min_snr_gamma": None, "ss_cache_latents": True})
    ours, md = load_lora(path)
    kohya, kohya_md = load_lora(reference_dir() / KOHYA_FILE)
    assert {k for k in ours if k.startswith("lora_unet_")} == {k for k in kohya if k.startswith("lora_unet_")}
    assert {k for k in ours if k.startswith("lora_te_")} == \
        {k for k in kohya if re.match(r"lora_te_text_model_encoder_layers_[01]_", k)}
    assert all(ours[k].dim() == kohya[k].dim() for k in ours)
    assert all(v.dtype == torch.float16 for v in ours.values())
    pattern = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in kohya) and all(pattern.match(k) for k in ours)
    assert all(v.shape == () for k, v in ours.items() if k.endswith(".alpha"))
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                "modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type",
                "modelspec.sai_model_spec"):
        assert md[key] == kohya_md[key], key
    assert md["ss_resolution"] == "(64, 64)" and md["ss_seed"] == "42" and md["ss_min_snr_gamma"] == "None"
    assert md["ss_cache_latents"] == "True" and json.loads(md["ss_tag_frequency"]) == {"1_x": {"red": 1}}
    assert md["modelspec.title"] == "t" and "ss_network_args" not in md
    assert md["sshs_model_hash"] == file_model_hash(path)
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == kohya_hashes(ours, md)
    with safe_open(str(path), "pt") as f:
        assert all(isinstance(v, str) for v in f.metadata().values())


def test_reproduces_kohya_hashes():
    recorded = load_json("lora_keys/kohya_written_files.json")["files"]["sd15_lora"]["metadata"]
    tensors, metadata = load_lora(reference_dir() / KOHYA_FILE)
    assert kohya_hashes(tensors, metadata) == (recorded["sshs_model_hash"], recorded["sshs_legacy_hash"])
    assert file_model_hash(reference_dir() / KOHYA_FILE) == recorded["sshs_model_hash"]


@pytest.mark.parametrize("model_name,network_type,dora,expect", [
    ("sd15", "c3lier", False, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                               "ss_v2": "False", "ss_network_args": {"conv_dim": "4", "conv_alpha": "1"}}),
    ("sd21v", "lierla", False, {"ss_base_model_version": "sd_v2_v", "ss_v2": "True", "modelspec.prediction_type": "v",
                                "modelspec.architecture": "stable-diffusion-v2-768-v/lora"}),
    ("sdxl", "loha", False, {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0",
                             "ss_network_args": {"algo": "loha", "conv_dim": "4", "conv_alpha": "1"},
                             "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                             "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}),
    ("sd15", "lierla", True, {"ss_network_module": "lycoris.kohya",
                              "ss_network_args": {"algo": "lora", "dora_wd": "True"}}),
])
def test_network_metadata(meta_models, model_name, network_type, dora, expect):
    model = meta_models[model_name]
    if dora:  # DoRA reads the base weights: use the tiny model for this one
        model = random_tiny_bundle(device="cpu")
    md = build_metadata(create_network(model, spec(network_type, dora=dora)), {"ss_output_name": "n"})
    for key, value in expect.items():
        assert (json.loads(md[key]) if isinstance(value, dict) else md[key]) == value, key
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "1.0"


def test_resume_checks_and_sd2_conv_factors(tiny, tmp_path):
    path = save_lora(create_network(tiny, spec()), tmp_path / "r.safetensors", dtype="fp32")
    with pytest.raises(UserError, match="shape"):
        resume_network(create_network(tiny, spec(rank=8)), path)
    with pytest.raises(UserError, match="missing"):
        resume_network(create_network(tiny, spec("c3lier")), path)
    with pytest.raises(UserError, match="network needs"):
        resume_network(create_network(tiny, spec(dora=True)), path)
    with pytest.raises(UserError, match="not found"):
        load_lora(tmp_path / "absent.safetensors")
    # A small SD2-style UNet (Linear proj_in/proj_out) accepts kohya's 1×1-conv factors for them.
    unet = UNetModel(UNetConfig(model_channels=32, num_heads=-1, num_head_channels=8, context_dim=64,
                                use_linear_in_transformer=True, channel_mult=(1, 2)))
    sd2 = SimpleNamespace(unet=unet, text_encoders=[], family="sd2")
    net = _randomize(create_network(sd2, spec(blocks=["IN01", "OUT05"])))
    tensors = net.kohya_state_dict()
    kohya_style = {k: (v[..., None, None] if "_proj_" in k and v.dim() == 2 else v) for k, v in tensors.items()}
    assert any(v.dim() == 4 for v in kohya_style.values())
    fresh = create_network(sd2, spec(blocks=["IN01", "OUT05"], seed=5))
    fresh.load_kohya_state_dict(kohya_style)
    assert all(torch.equal(a, b) for a, b in zip(fresh.kohya_state_dict().values(), tensors.values()))


def test_atomic_write(tiny, tmp_path, monkeypatch):
    """A write that fails after the bytes went to the temporary file leaves nothing behind."""
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        save_lora(create_network(tiny, spec()), tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_name_table_api(tiny):
    net = create_network(tiny, spec())
    table = kohya_names(net)
    t = table["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert t.path == "input_blocks.4.1.transformer_blocks.0.attn1.to_q" and t.block == "IN04"
    assert t.alias == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert table["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].checkpoint_weight() == \
        ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None)


def test_network_from_file_infers_spec_and_accepts_other_names(tiny, caplog):
    net = _randomize(create_network(tiny, spec("c3lier", rank=4, alpha=2, conv_rank=8, conv_alpha=3)))
    tensors = net.kohya_state_dict()
    loaded = network_from_state_dict(tiny, tensors)
    s = loaded.spec
    assert (s.network_type, s.rank, s.alpha, s.conv_rank, s.conv_alpha, s.dora) == ("c3lier", 4, 2.0, 8, 3.0, False)
    md_a, md_b = build_metadata(net), build_metadata(loaded)
    assert all(md_a[k] == md_b[k] for k in md_a if k.startswith("ss_network"))
    # ldm-style UNet names (as some tools write SD1 files) load onto the same layers, saved back canonically
    table = kohya_names(net)
    ldm_style = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        ldm_style[f"{table[name].alias or name}.{suffix}"] = value
    assert set(ldm_style) != set(tensors)
    again = network_from_state_dict(tiny, ldm_style)
    assert set(again.kohya_state_dict()) == set(tensors)
    extra = dict(tensors, **{"lora_te_text_projection.lora_down.weight": torch.zeros(4, 64)})
    with pytest.raises(UserError, match="match no layer"):
        network_from_state_dict(tiny, extra)
    with caplog.at_level(logging.WARNING):
        assert len(network_from_state_dict(tiny, extra, strict=False).targets) == len(net.targets)
    assert "lora_te_text_projection" in caplog.text


@pytest.mark.parametrize("network_type", ["lierla", "loha", "lokr"])
def test_inspect_reports_the_rank_of_every_algorithm(tiny, tmp_path, capsys, network_type):
    """``python -m trainer inspect FILE``: ranks from the factors' shapes for LoRA, LoHa and LoKr alike (LoKr
    layers too small for the rank are LyCORIS full-matrix factors, reported as "full"), never ``{}``."""
    from trainer.cli import main as cli
    path = save_lora(create_network(tiny, spec(network_type, rank=4)), tmp_path / f"{network_type}.safetensors")
    assert cli(["inspect", str(path), "--brief"]) == 0
    report = json.loads(capsys.readouterr().out)
    ranks = report["ranks"]
    assert sum(ranks.values()) == report["modules"] > 0 and ranks.get("4", 0) > 0
    assert set(ranks) == ({"4", "full"} if network_type == "lokr" else {"4"})


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_lora_has_the_umask_mode_so_others_can_read_it(tiny, tmp_path, umask):
    """A LoRA in a shared WebUI folder must be readable by other tools and users: the mode a plain
    ``open`` gives (0o666 less the umask), not the 0600 of the temporary file it is written through."""
    old = os.umask(umask)
    try:
        path = save_lora(create_network(tiny, spec()), tmp_path / "shared.safetensors", dtype="fp32")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["shared.safetensors"]     # no temporary file left
