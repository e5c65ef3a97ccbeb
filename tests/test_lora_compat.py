"""Our saved LoRA files load everywhere: A1111 1.10's built-in Lora, ComfyUI, diffusers; SPEC §6 metadata;
kohya's hashes.

Real files are written through the engine's own save path (``Run.save`` → ``save_lora`` with
``Run.metadata``) for full-size SD1.5 and SDXL-base networks: every block + BASE, rank 4, LoRA (lierla)
and LoCon (c3lier). The base models stay on the meta device; only the adapters are materialised on the
CPU (small at rank 4), with random non-zero factors.

Each consumer's key rules are restated here in our own words and run against the checkpoint layouts in
``shared/reference/manifests``, never against our model code, so a naming mistake in
``trainer.networks`` cannot confirm itself:

- **A1111 1.10**: ``convert_diffusers_name_to_compvis`` plus ``load_network``'s lookup chain. The
  restatement is first shown to reproduce, for every module of kohya's own key sets, the binding that
  running the real A1111 code recorded (``lora_keys/*.json``: ``checkpoint_module``/``_weight``/``_rows``).
- **ComfyUI**: the ``model_lora_keys_unet``/``model_lora_keys_clip`` key map (ldm names, diffusers names
  from ``unet_to_diffusers``, ``lora_te``/``lora_te1``/``lora_te2``) and ``load_lora``'s key consumption.
- **diffusers**: its own kohya converter (the installed package, a test-only dependency) and its key
  conversions to PEFT; targets checked on diffusers' ``UNet2DConditionModel`` and transformers' CLIP
  models built on the meta device from inline configs (no hub access).

Every check also asserts that the consumer binds each name to the checkpoint weight our network trained
(``Target.checkpoint_weight``), not merely to some layer of a fitting shape.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import safetensors.torch
import torch

from reference import load_json, reference_dir
from trainer.engine import Run, RunPaths
from trainer.models.configs import builtin_config
from trainer.models.text_encoders import build_text_encoder
from trainer.models.unet import UNetModel
from trainer.networks import NetworkSpec, create_network, load_lora, split_modules
from trainer.networks import modules as M
from trainer.settings import Settings

KOHYA_FILE = "lora_keys/kohya_sd15_rank4.safetensors"
MANIFESTS = {"sd1": "manifests/sd15.json", "sd2": "manifests/sd21v.json", "sdxl": "manifests/sdxl_base.json"}
UNET = "model.diffusion_model."
SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha"}
RANK, ALPHA = 4, 1.0

# case -> (builtin model, family, LoCon?, training resolution)
CASES = {"sd15": ("sd15", "sd1", False, 512), "sd15_locon": ("sd15", "sd1", True, 512),
         "sdxl": ("sdxl", "sdxl", False, 1024), "sdxl_locon": ("sdxl", "sdxl", True, 1024)}
# kohya's real runs (kohya_written_files.json) per case
KOHYA_RUN = {"sd15": "sd15_lora", "sd15_locon": "sd15_locon", "sdxl": "sdxl_lora", "sdxl_locon": "sdxl_locon"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, tuple]]:
    return {family: {k: tuple(v) for k, v in load_json(rel).items()} for family, rel in MANIFESTS.items()}


# ------------------------------------------------------------------------------------------ the files

@dataclass
class Saved:
    case: str
    family: str
    locon: bool
    path: Path
    tensors: dict
    metadata: dict
    binding: dict        # module name -> (checkpoint weight key, rows or None): where our network trains it
    te_binding: dict     # text-encoder module name -> (encoder index, transformers module path)
    resolution: int


def meta_model(name: str) -> SimpleNamespace:
    cfg = builtin_config(name)
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    tes = [build_text_encoder(s.role, s.config, device="meta") for s in cfg.text_encoders]
    return SimpleNamespace(unet=unet, text_encoders=tes, family=cfg.family, prediction_type=cfg.prediction_type,
                           device=torch.device("cpu"), dtype=torch.float32, name=f"{name}-reference",
                           encode_prompts=_no_prompts)


def _no_prompts(*args, **kwargs):
    raise AssertionError("saving a LoRA must not encode prompts")


def materialise(net, seed: int) -> None:
    """The network's adapters (built on meta with the model) onto the CPU with random, non-zero factors.

    ``lora_up`` is non-zero on purpose, so the files carry data like a trained LoRA's (hashes over
    all-zero up-factors would prove little)."""
    g = torch.Generator().manual_seed(seed)
    net.adapters.to_empty(device="cpu")
    with torch.no_grad():
        for name, adapter in net.adapters.items():
            buffers = {n for n, _ in adapter.named_buffers()}
            assert buffers == {"alpha", "scalar", "dtype_tensor"}, f"lycoris changed its buffers: {buffers}"
            adapter.scalar.fill_(1.0)       # lycoris' value without use_scalar
            adapter.dtype_tensor.zero_()
            _, alpha = net.spec.rank_alpha(net.targets[name])
            tensors = {k: torch.randn(p.shape, generator=g) * 0.05 for k, p in adapter.named_parameters()}
            M.load_tensors(name, adapter, {**tensors, "alpha": torch.tensor(alpha)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Saved]:
    out_dir = tmp_path_factory.mktemp("lora_compat")
    models: dict = {}
    files: dict[str, Saved] = {}
    for i, (case, (model_name, family, locon, size)) in enumerate(CASES.items()):
        model = models.setdefault(model_name, meta_model(model_name))
        spec = NetworkSpec("c3lier" if locon else "lierla", rank=RANK, alpha=ALPHA,
                           conv_rank=RANK if locon else 0, conv_alpha=ALPHA if locon else 0, blocks=None, seed=i)
        net = create_network(model, spec)
        materialise(net, seed=i)
        # What the engine passes: Run.metadata (+ the dataset facts modes/lora.py adds), written by Run.save.
        settings = Settings({"save_lora_name": f"compat_{case}", "image_size": [size, size], "train_seed": 1234,
                             "save_precision": "fp16"})
        run = Run(settings, model, RunPaths(lora_dir=out_dir),
                  model_info={"name": f"{model_name}.safetensors", "hash": "0123abcd", "sha256": "ab" * 32})
        run.extra_metadata.update({"ss_num_train_images": 2, "ss_tag_frequency": {"1_golden": {"red": 1}},
                                   "ss_dataset_dirs": {"/data/1_golden": {"n_repeats": 1, "img_count": 2}},
                                   "ss_resolution": str((size, size))})
        path = run.save(net, steps=10)
        tensors, metadata = load_lora(path)
        binding = {name: t.checkpoint_weight() for name, t in net.targets.items()}
        te_binding = {name: (t.encoder, t.path) for name, t in net.targets.items() if t.part == "te"}
        files[case] = Saved(case, family, locon, path, tensors, metadata, binding, te_binding, size)
        del net
    return files


def weight_fits(down: tuple, up: tuple, weight: tuple) -> bool:
    """lora_down [r, in(, kh, kw)] / lora_up [out, r(, 1, 1)] patch a weight [out, in(, kh, kw)]."""
    return (len(down) == len(up) == len(weight) and down[0] == up[1] and down[1] == weight[1]
            and up[0] == weight[0] and tuple(down[2:]) == tuple(weight[2:]) and all(k == 1 for k in up[2:]))


def target_shape(manifest: dict, weight: str, rows: Optional[tuple]) -> tuple:
    shape = manifest[weight]
    return (rows[1] - rows[0], *shape[1:]) if rows else shape


def check_modules_complete(tensors: dict) -> dict[str, dict]:
    per_module = split_modules(tensors)
    bad = {n: sorted(found) for n, found in per_module.items() if set(found) != SUFFIXES}
    assert not bad, f"modules without exactly lora_down/lora_up/alpha: {list(bad.items())[:3]}"
    return per_module


# ------------------------------------------------------------------------------------------ A1111 1.10

_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _openclip_rest(rest: str) -> str:
    """A1111's HF→OpenCLIP renaming of one encoder-layer remainder (first rule that applies)."""
    for hf, oc in (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj")):
        if hf in rest:
            return rest.replace(hf, oc)
    return rest.replace("self_attn", "attn")


def _res_suffix(kind: str, rest: str) -> str:
    return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


# (pattern matched at the start of the name, its compvis layer name); A1111 tries them in this order.
_A1111_RULES = [
    (r"lora_unet_conv_in(.*)", lambda m, sd2: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m, sd2: f"diffusion_model_out_2{m[1]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)",
     lambda m, sd2: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m, sd2: f"diffusion_model_input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_"
                    f"{1 if m[2] == 'attentions' else 0}_{_res_suffix(m[2], m[4])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m, sd2: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_"
                    f"{_res_suffix(m[1], m[3])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m, sd2: f"diffusion_model_output_blocks_{3 * int(m[1]) + int(m[3])}_"
                    f"{1 if m[2] == 'attentions' else 0}_{_res_suffix(m[2], m[4])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
     lambda m, sd2: f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",   # A1111's SD1 index: SDXL diffusers names miss here
     lambda m, sd2: f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
     lambda m, sd2: f"model_transformer_resblocks_{m[1]}_{_openclip_rest(m[2])}" if sd2
     else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
    (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
     lambda m, sd2: f"1_model_transformer_resblocks_{m[1]}_{_openclip_rest(m[2])}"),
]


def a1111_compvis_name(name: str, is_sd2: bool) -> str:
    for pattern, build in _A1111_RULES:
        m = re.match(pattern, name)
        if m:
            return build(m, is_sd2)
    return name


def a1111_layers(manifest: dict, family: str) -> dict[str, str]:
    """A1111's ``network_layer_mapping`` for a checkpoint layout: layer name → checkpoint module path.

    Names are ``named_modules`` paths with ``_``: the UNet under ``sd_model.model`` (``diffusion_model_…``),
    SD1/SD2 text encoder under ``cond_stage_model.wrapped`` (``transformer_…`` / ``model_…``), SDXL
    embedders as ``{i}_`` + the path inside ``conditioner.embedders[i].wrapped``."""
    modules = {".".join(key.split(".")[:i]) for key in manifest for i in range(1, key.count(".") + 1)}
    layers: dict[str, str] = {}
    for path in modules:
        if path.startswith("model.diffusion_model"):
            name = path[len("model."):]
        elif family == "sdxl" and (m := re.match(r"conditioner\.embedders\.(\d+)\.(.+)", path)):
            name = f"{m[1]}_{m[2]}"
        elif family != "sdxl" and path.startswith("cond_stage_model."):
            name = path[len("cond_stage_model."):]
        else:
            continue
        name = name.replace(".", "_")
        assert layers.setdefault(name, path) == path, f"A1111 layer name {name} is ambiguous"
    return layers


@dataclass
class A1111Binding:
    sd_key: str                  # the key A1111 files the module under (decides the TE/UNet multiplier)
    module: str                  # checkpoint module path
    weight: str                  # checkpoint weight key
    rows: Optional[tuple]        # q/k/v slice of a fused in_proj_weight


def a1111_resolve(name: str, layers: dict, manifest: dict, is_sd2: bool) -> Optional[A1111Binding]:
    """``load_network``'s lookup for one module name (the part before the first dot)."""
    key = a1111_compvis_name(name, is_sd2)
    module = layers.get(key)
    rows = None
    if module is None and (m := re.match(r"(.*)_([qkv]_proj)$", key)):   # q/k/v → MultiheadAttention
        module = layers.get(m[1])
        if module is not None:
            e = manifest[f"{module}.in_proj_weight"][0] // 3
            rows = (_QKV[m[2]] * e, (_QKV[m[2]] + 1) * e)
    if module is None and "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        module = layers.get(key)
    elif module is None and "lora_te1_text_model" in name:
        key = name.replace("lora_te1_text_model", "0_transformer_text_model")
        module = layers.get(key)
        if module is None:
            key = name.replace("lora_te1_text_model", "transformer_text_model")
            module = layers.get(key)
    if module is None:
        return None
    weight = f"{module}.in_proj_weight" if rows else f"{module}.weight"
    return A1111Binding(key, module, weight, rows)


@pytest.mark.parametrize("ref,family", [("sd15", "sd1"), ("sd15_locon", "sd1"), ("sdxl", "sdxl"),
                                        ("sdxl_locon", "sdxl"), ("sd2", "sd2"), ("sd2_locon", "sd2")])
def test_a1111_restatement_reproduces_real_a1111(manifests, ref, family):
    """Our A1111 rules give, for every kohya module name, exactly the checkpoint module/weight/rows that
    the real A1111 1.10.1 code bound it to (recorded in the reference): that is what makes the
    restatement trustworthy for our own files below."""
    reference = load_json(f"lora_keys/{ref}.json")
    assert reference["a1111_resolution"]["unmatched"] == []
    manifest = manifests[family]
    layers = a1111_layers(manifest, family)
    wrong = []
    for module in reference["modules"]:
        got = a1111_resolve(module["name"], layers, manifest, is_sd2=family == "sd2")
        want = (module["checkpoint_module"], module["checkpoint_weight"], tuple(module.get("checkpoint_rows") or ()))
        if got is None or (got.module, got.weight, tuple(got.rows or ())) != want:
            wrong.append((module["name"], got, want))
    assert not wrong, f"{len(wrong)} of {len(reference['modules'])} differ, e.g. {wrong[:3]}"


@pytest.mark.parametrize("case", list(CASES))
def test_a1111_loads_every_module(saved, manifests, case):
    """A1111 1.10's built-in Lora: every module of our file resolves (zero unmatched) to the checkpoint
    weight our network trained, with fitting factor shapes, and gets the right multiplier (TE vs UNet)."""
    f = saved[case]
    manifest = manifests[f.family]
    layers = a1111_layers(manifest, f.family)
    per_module = check_modules_complete(f.tensors)
    unmatched, wrong, misfit, multiplier = [], [], [], []
    for name, found in per_module.items():
        b = a1111_resolve(name, layers, manifest, is_sd2=False)
        if b is None:
            unmatched.append(name)
            continue
        if (b.weight, b.rows) != f.binding[name]:
            wrong.append((name, b.weight, b.rows, f.binding[name]))
        if not weight_fits(tuple(found["lora_down.weight"].shape), tuple(found["lora_up.weight"].shape),
                           target_shape(manifest, b.weight, b.rows)):
            misfit.append((name, b.weight))
        # network_apply_weights: te_multiplier if 'transformer' in sd_key[:20], else unet_multiplier
        if ("transformer" in b.sd_key[:20]) != name.startswith("lora_te"):
            multiplier.append((name, b.sd_key))
    assert not unmatched, f"{len(unmatched)} unmatched, e.g. {unmatched[:5]}"
    assert not wrong, f"bound to another weight: {wrong[:3]}"
    assert not misfit, f"shapes do not fit: {misfit[:3]}"
    assert not multiplier, f"wrong multiplier (TE/UNet): {multiplier[:3]}"
    assert len(per_module) == len(f.binding)


# ------------------------------------------------------------------------------------------ ComfyUI

_COMFY_CLIP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
               "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
               "self_attn.out_proj": "self_attn_out_proj"}
# ldm layer → diffusers layer inside a ResBlock; the transformer layers comfy maps (weights only matter here)
_COMFY_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                 "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_COMFY_SPATIAL = ("proj_in", "proj_out", "norm")
_COMFY_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_COMFY_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
                "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
COMFY_RES_BLOCKS = 2   # num_res_blocks ComfyUI's model detection gives for SD1, SD2 and SDXL


def comfy_diffusers_to_ldm(manifest: dict) -> dict[str, str]:
    """ComfyUI's ``unet_to_diffusers`` as a module table: diffusers module path → ldm module path, with the
    transformer depth of every block read from the checkpoint layout (as ComfyUI detects its config)."""
    keys = [k[len(UNET):] for k in manifest if k.startswith(UNET)]

    def depth(block: str) -> int:
        return len({k.split(".")[len(block.split(".")) + 1] for k in keys
                    if k.startswith(f"{block}.transformer_blocks.")})

    table: dict[str, str] = {}

    def resnet(d: str, ldm: str) -> None:
        table.update({f"{d}.{dn}": f"{ldm}.{ln}" for ln, dn in _COMFY_RESNET.items()})

    def spatial(d: str, ldm: str) -> int:
        n = depth(ldm)
        if n:
            table.update({f"{d}.{x}": f"{ldm}.{x}" for x in _COMFY_SPATIAL})
            table.update({f"{d}.transformer_blocks.{t}.{x}": f"{ldm}.transformer_blocks.{t}.{x}"
                          for t in range(n) for x in _COMFY_BLOCK})
        return n

    step = COMFY_RES_BLOCKS + 1
    levels = len({k.split(".")[1] for k in keys if k.startswith("output_blocks.")}) // step
    for level in range(levels):
        for j in range(COMFY_RES_BLOCKS):
            n = 1 + level * step + j
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{n}.0")
            spatial(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{n}.1")
        table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{level * step + step}.0.op"
    resnet("mid_block.resnets.0", "middle_block.0")
    spatial("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")
    for level in range(levels):
        for i in range(step):
            n = level * step + i
            resnet(f"up_blocks.{level}.resnets.{i}", f"output_blocks.{n}.0")
            has_attn = spatial(f"up_blocks.{level}.attentions.{i}", f"output_blocks.{n}.1") > 0
            if i == step - 1:
                table[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if has_attn else 1}.conv"
    table.update(_COMFY_BASIC)
    return table


def comfy_key_map(manifest: dict, family: str) -> dict[str, tuple[str, Optional[tuple]]]:
    """LoRA module name → (checkpoint weight, rows) ComfyUI accepts for this model, restricted to weights
    the checkpoint has (a name whose weight is absent would be a patch on nothing)."""
    key_map: dict[str, tuple[str, Optional[tuple]]] = {}
    # UNet: ldm names from the model's own weights, then diffusers names.
    for k in manifest:
        if k.startswith(UNET) and k.endswith(".weight"):
            key_map["lora_unet_" + k[len(UNET):-len(".weight")].replace(".", "_")] = (k, None)
    for d, ldm in comfy_diffusers_to_ldm(manifest).items():
        if f"{UNET}{ldm}.weight" in manifest:
            key_map["lora_unet_" + d.replace(".", "_")] = (f"{UNET}{ldm}.weight", None)
    # CLIP: ComfyUI holds CLIP-L as transformers keys and converts OpenCLIP-G to them (in_proj split in 3).
    clip_l: dict[tuple[int, str], tuple[str, Optional[tuple]]] = {}
    clip_g: dict[tuple[int, str], tuple[str, Optional[tuple]]] = {}
    l_prefix = "conditioner.embedders.0.transformer." if family == "sdxl" else "cond_stage_model.transformer."
    for b in range(32):
        for c in _COMFY_CLIP:
            k = f"{l_prefix}text_model.encoder.layers.{b}.{c}.weight"
            if k in manifest:
                clip_l[(b, c)] = (k, None)
        g = f"conditioner.embedders.1.model.transformer.resblocks.{b}."
        if family == "sdxl" and f"{g}attn.in_proj_weight" in manifest:
            e = manifest[f"{g}attn.in_proj_weight"][0] // 3
            for i, c in enumerate(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                clip_g[(b, c)] = (f"{g}attn.in_proj_weight", (i * e, (i + 1) * e))
            clip_g[(b, "self_attn.out_proj")] = (f"{g}attn.out_proj.weight", None)
            clip_g[(b, "mlp.fc1")] = (f"{g}mlp.c_fc.weight", None)
            clip_g[(b, "mlp.fc2")] = (f"{g}mlp.c_proj.weight", None)
    for (b, c), target in clip_l.items():
        for prefix in ("lora_te", "lora_te1"):
            key_map[f"{prefix}_text_model_encoder_layers_{b}_{_COMFY_CLIP[c]}"] = target
    for (b, c), target in clip_g.items():
        prefix = "lora_te2" if clip_l else "lora_te"
        key_map[f"{prefix}_text_model_encoder_layers_{b}_{_COMFY_CLIP[c]}"] = target
    return key_map


@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_loads_every_key(saved, manifests, case):
    """ComfyUI: every module name is in its key map, bound to the weight our network trained with fitting
    shapes, and ``load_lora`` consumes every tensor of the file (no "lora key not loaded")."""
    f = saved[case]
    manifest = manifests[f.family]
    key_map = comfy_key_map(manifest, f.family)
    per_module = check_modules_complete(f.tensors)
    unmatched = [n for n in per_module if n not in key_map]
    assert not unmatched, f"{len(unmatched)} names ComfyUI does not know, e.g. {unmatched[:5]}"
    # load_lora: walk the key map, take NAME.lora_up/lora_down(/alpha) where present
    loaded, patches = set(), {}
    for name, target in key_map.items():
        if f"{name}.lora_up.weight" in f.tensors:
            loaded |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight"}
            if f"{name}.alpha" in f.tensors:
                loaded.add(f"{name}.alpha")
            assert target not in patches, f"{name} and {patches.get(target)} patch the same weight"
            patches[target] = name
    not_loaded = sorted(set(f.tensors) - loaded)
    assert not not_loaded, f"lora key not loaded: {not_loaded[:5]}"
    wrong = [(n, key_map[n], f.binding[n]) for n in per_module if key_map[n] != f.binding[n]]
    assert not wrong, f"bound to another weight: {wrong[:3]}"
    misfit = [n for n, found in per_module.items()
              if not weight_fits(tuple(found["lora_down.weight"].shape), tuple(found["lora_up.weight"].shape),
                                 target_shape(manifest, *key_map[n]))]
    assert not misfit, f"shapes do not fit: {misfit[:3]}"


def test_comfy_table_agrees_with_a1111_on_kohya_names(manifests):
    """Cross-check of the two restatements: for every kohya module name (both files' naming styles) both
    consumers bind the same checkpoint weight and rows."""
    for ref, family in (("sd15_locon", "sd1"), ("sdxl_locon", "sdxl")):
        manifest = manifests[family]
        key_map = comfy_key_map(manifest, family)
        for module in load_json(f"lora_keys/{ref}.json")["modules"]:
            rows = tuple(module["checkpoint_rows"]) if module.get("checkpoint_rows") else None
            assert key_map[module["name"]] == (module["checkpoint_weight"], rows), module["name"]


# ------------------------------------------------------------------------------------------ diffusers

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                 num_hidden_layers=32, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


@pytest.fixture(scope="module")
def diffusers_models():
    """diffusers' UNets and transformers' CLIP text models for SD1.5 / SDXL, on the meta device."""
    pytest.importorskip("diffusers", reason="diffusers is a test-only dependency (requirements-test.txt); "
                                            "the diffusers compatibility checks need it")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "sd1": SimpleNamespace(loader=StableDiffusionLoraLoaderMixin, unet=UNet2DConditionModel(**SD15_UNET),
                                   text_encoders={"text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}),
            "sdxl": SimpleNamespace(loader=StableDiffusionXLLoraLoaderMixin, unet=UNet2DConditionModel(**SDXL_UNET),
                                    text_encoders={"text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                                                   "text_encoder_2": CLIPTextModelWithProjection(
                                                       CLIPTextConfig(**CLIP_BIGG))}),
        }


def test_diffusers_reference_models_are_full_size(diffusers_models, manifests):
    """The inline configs build the real architectures: parameter counts equal the checkpoint manifests'."""
    def count(manifest: dict, prefix: str) -> int:
        return sum(int(torch.tensor(s).prod()) if s else 1 for k, s in manifest.items() if k.startswith(prefix))

    for family in ("sd1", "sdxl"):
        unet = diffusers_models[family].unet
        assert sum(p.numel() for p in unet.parameters()) == count(manifests[family], UNET)
    te2 = diffusers_models["sdxl"].text_encoders["text_encoder_2"]
    assert len(te2.text_model.encoder.layers) == 32 and te2.text_projection.weight.shape == (1280, 1280)


def _peft_modules(state: dict, origin: dict[int, str]) -> dict[str, dict]:
    """``module.lora_A.weight`` / ``module.lora_B.weight`` keys → {module: {"A": shape, "B": shape,
    "from": {kohya module names}}}; ``origin`` maps tensor ids to the file's module names (diffusers'
    conversions rename keys and keep the tensor objects, so each target can be traced to its name)."""
    out: dict[str, dict] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        assert m, f"not a PEFT LoRA key: {key}"
        entry = out.setdefault(m[1], {"from": set()})
        entry[m[2]] = tuple(value.shape)
        entry["from"].add(origin.get(id(value), "?"))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_loads_every_key(saved, manifests, diffusers_models, case):
    """diffusers: the file takes the kohya path (every key has a kohya prefix), its converter leaves no key
    over, and after diffusers' own PEFT key conversions every target is a module of diffusers' UNet or
    transformers' CLIP with fitting shapes, with the file's alpha/rank scale — and those modules are the
    layers our network trained."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    f = saved[case]
    models = diffusers_models[f.family]
    prefixes = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
    assert all(k.startswith(prefixes) for k in f.tensors), "a key without kohya prefix: diffusers skips conversion"
    # lora_state_dict = _maybe_map_sgm_blocks_to_diffusers + _convert_non_diffusers_lora_to_diffusers (raises
    # ValueError on any key left over), exactly as load_lora_weights calls it with the pipeline's UNet config.
    origin = {id(v): k.partition(".")[0] for k, v in f.tensors.items()}
    state, alphas = models.loader.lora_state_dict(dict(f.tensors), unet_config=models.unet.config)
    n_modules = len(split_modules(f.tensors))
    assert len(state) == 2 * n_modules and len(alphas) == n_modules
    assert set(alphas.values()) == {ALPHA}

    parts = {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
             for name in ("unet", *models.text_encoders)}
    assert sum(map(len, parts.values())) == len(state), "keys for a component the pipeline does not have"
    converted = {"unet": convert_unet_state_dict_to_peft(parts.pop("unet"))}   # UNet2DConditionModel.load_lora_adapter
    for name, part in parts.items():                                            # _load_lora_into_text_encoder
        peft_state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)) if part else {}
        if not hasattr(models.text_encoders[name], "text_model"):   # transformers 5 flattens CLIPTextModel
            peft_state = {k.removeprefix("text_model."): v for k, v in peft_state.items()}
        converted[name] = peft_state

    table = comfy_diffusers_to_ldm(manifests[f.family])
    bound, problems = {}, []
    for component, peft_state in converted.items():
        model = models.unet if component == "unet" else models.text_encoders[component]
        modules = _peft_modules(peft_state, origin)
        for path, entry in modules.items():
            names = sorted(entry["from"])
            if len(names) != 1 or names[0] in bound:
                problems.append(f"{component}.{path}: fed by {names}")
                continue
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                problems.append(f"{component}: no module {path} (from {names[0]})")
                continue
            if not weight_fits(entry.get("A", ()), entry.get("B", ()), tuple(layer.weight.shape)):
                problems.append(f"{component}.{path}: {entry} does not fit {tuple(layer.weight.shape)}")
            if component == "unet":   # diffusers path → checkpoint weight via ComfyUI's diffusers↔ldm table
                bound[names[0]] = f"{UNET}{table[path]}.weight" if path in table else f"? {path}"
            else:
                bound[names[0]] = (list(models.text_encoders).index(component),
                                   path if path.startswith("text_model.") else f"text_model.{path}")
        if modules:
            # the LoRA config diffusers builds: targets, rank and alpha (scale = alpha / r, as in the file)
            ranks = {f"^{k}": v.shape[1] for k, v in peft_state.items() if ".lora_B." in k}
            prefix_alphas = {k[len(component) + 1:]: v for k, v in alphas.items() if k.split(".")[0] == component}
            kwargs = get_peft_kwargs(ranks, prefix_alphas, peft_state, is_unet=component == "unet")
            assert set(kwargs["target_modules"]) == set(modules)
            assert (kwargs["r"], kwargs["lora_alpha"], kwargs["rank_pattern"], kwargs["alpha_pattern"]) == \
                (RANK, ALPHA, {}, {})
    assert not problems, f"{len(problems)} targets missing or misfit, e.g. {problems[:3]}"
    ours = {name: f.te_binding[name] if name in f.te_binding else weight for name, (weight, _) in f.binding.items()}
    wrong = [(name, bound.get(name), want) for name, want in ours.items() if bound.get(name) != want]
    assert not wrong, f"{len(wrong)} modules bound elsewhere or not at all, e.g. {wrong[:3]}"


# ------------------------------------------------------------------------------------------ metadata

@pytest.mark.parametrize("case", list(CASES))
def test_metadata_spec6(saved, case):
    """SPEC §6: every listed key is present and a string, with kohya's values where kohya writes one
    (the real kohya runs of the same model and network type), and what A1111/Forge read from it works."""
    f = saved[case]
    md = f.metadata
    kohya = load_json("lora_keys/kohya_written_files.json")["files"][KOHYA_RUN[case]]["metadata"]
    assert all(isinstance(v, str) for v in md.values())
    required = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                "modelspec.architecture", "modelspec.title", "modelspec.date", "modelspec.resolution",
                "modelspec.prediction_type", "modelspec.sai_model_spec", "modelspec.implementation",
                "ss_output_name", "ss_training_started_at", "ss_training_finished_at", "ss_steps",
                "ss_learning_rate", "ss_optimizer", "ss_lr_scheduler", "ss_seed", "ss_min_snr_gamma",
                "ss_resolution", "ss_num_train_images", "ss_tag_frequency", "ss_dataset_dirs", "ss_sd_model_name",
                "ss_sd_model_hash", "sshs_model_hash", "sshs_legacy_hash"]
    required += ["ss_network_args"] if f.locon else []
    missing = [k for k in required if k not in md]
    assert not missing, f"missing metadata: {missing}"
    assert any(k.startswith("shinkansen_") for k in md)
    # kohya's values for the same model and network
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                "modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type",
                "modelspec.sai_model_spec"):
        assert md[key] == kohya[key], (key, md[key], kohya[key])
    assert md["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[f.family]
    if f.locon:
        ours, theirs = json.loads(md["ss_network_args"]), json.loads(kohya["ss_network_args"])
        assert {k: ours[k] for k in ("conv_dim", "conv_alpha")} == {k: theirs[k] for k in ("conv_dim", "conv_alpha")}
    else:
        assert "ss_network_args" not in md and "ss_network_args" not in kohya
    # values the engine set
    assert md["ss_output_name"] == md["modelspec.title"] == f"compat_{case}" == f.path.stem
    assert md["modelspec.resolution"] == f"{f.resolution}x{f.resolution}"
    assert md["ss_resolution"] == f"({f.resolution}, {f.resolution})"
    _dt.datetime.fromisoformat(md["modelspec.date"])
    assert float(md["ss_training_finished_at"]) >= float(md["ss_training_started_at"]) > 1.6e9
    assert md["ss_steps"] == "10" and md["ss_seed"] == "1234"
    assert re.fullmatch(r"[0-9a-f]{64}", md["sshs_model_hash"]) and re.fullmatch(r"[0-9a-f]{8}", md["sshs_legacy_hash"])
    # A1111 JSON-decodes values starting with "{"; they must be valid JSON
    for key, value in md.items():
        if value.startswith("{"):
            json.loads(value)
    # A1111 detect_version / Forge: SDXL via ss_base_model_version, SD1 via modelspec.architecture
    assert md["ss_base_model_version"].startswith("sdxl_") == (f.family == "sdxl") and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == {"sd1": "stable-diffusion-v1/lora",
                                            "sdxl": "stable-diffusion-xl-v1-base/lora"}[f.family]
    # the file itself: kohya's key set for this model/network, F16 tensors (alpha too), 0-d alphas
    reference = load_json(f"lora_keys/{case}.json")["state_dict"]
    assert {k: list(v.shape) for k, v in f.tensors.items()} == reference
    assert all(v.dtype == torch.float16 for v in f.tensors.values())


# ------------------------------------------------------------------------------------------ hashes

def read_safetensors(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n]), data


def model_hash(data: bytes, header_len: int) -> str:
    """kohya ``sshs_model_hash`` (= A1111's addnet LoRA hash): SHA-256 of every byte after the header."""
    return hashlib.sha256(data[8 + header_len:]).hexdigest()


def legacy_hash(tensors: dict, metadata: dict) -> str:
    """kohya ``sshs_legacy_hash``: first 8 hex digits of SHA-256 of the 64 KiB at offset 1 MiB of
    ``safetensors.torch.save(tensors, <the ss_* metadata only>)``."""
    blob = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert len(blob) >= 0x110000, "file too small for the legacy hash window"
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def test_hash_formulas_reproduce_kohya():
    """The two formulas above, on kohya's real SD1.5 file, give the hashes kohya wrote into it (and that the
    reference recorded for it)."""
    path = reference_dir() / KOHYA_FILE
    n, header, data = read_safetensors(path)
    md = header["__metadata__"]
    recorded = load_json("lora_keys/kohya_written_files.json")["files"]["sd15_lora"]
    assert n == recorded["header_bytes"]
    assert model_hash(data, n) == md["sshs_model_hash"] == recorded["metadata"]["sshs_model_hash"]
    tensors, _ = load_lora(path)
    assert legacy_hash(tensors, md) == md["sshs_legacy_hash"] == recorded["metadata"]["sshs_legacy_hash"]


@pytest.mark.parametrize("case", list(CASES))
def test_hashes_independent(saved, case):
    """Our files' ``sshs_model_hash``/``sshs_legacy_hash`` equal an independent computation of kohya's
    formulas on the written bytes; A1111 shows the first 12 hex digits of the model hash."""
    f = saved[case]
    n, header, data = read_safetensors(f.path)
    md = header["__metadata__"]
    assert md == f.metadata
    assert model_hash(data, n) == md["sshs_model_hash"]
    assert legacy_hash(f.tensors, md) == md["sshs_legacy_hash"]
    # the tensor data is laid out exactly as the in-memory ss_*-only serialisation kohya hashes
    blob = safetensors.torch.save(f.tensors, {k: v for k, v in md.items() if k.startswith("ss_")})
    m = int.from_bytes(blob[:8], "little")
    assert blob[8 + m:] == data[8 + n:]


# ------------------------------------------------------------------------------------------ what diffusers can't load

@pytest.mark.parametrize("network_type,dora,loads", [("lierla", False, "all"), ("c3lier", False, "all"),
                                                     ("loha", False, "refused"), ("lokr", False, "refused"),
                                                     ("lierla", True, "without dora_scale")])
def test_which_of_our_files_diffusers_loads(tmp_path, network_type, dora, loads):
    """What the README says about diffusers, checked with the installed diffusers' own kohya converter
    (``lora_state_dict``, the first step of ``load_lora_weights``): LoRA and LoCon convert key for key;
    LoHa and LoKr are refused with an error; DoRA converts only after diffusers drops every ``dora_scale``,
    so it would apply as a plain LoRA (A1111, Forge and ComfyUI read it)."""
    pytest.importorskip("diffusers", reason="diffusers is a test-only dependency (requirements-test.txt)")
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from trainer.models.loader import random_tiny_bundle
    from trainer.networks import save_lora

    net = create_network(random_tiny_bundle(seed=0, device="cpu"),
                         NetworkSpec(network_type, rank=RANK, alpha=ALPHA, dora=dora, seed=0))
    tensors, _ = load_lora(save_lora(net, tmp_path / "t.safetensors"))
    modules = len(split_modules(tensors))
    if loads == "refused":
        with pytest.raises(ValueError, match="not been correctly renamed"):
            StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))
        return
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))
    assert len(state) == 2 * modules and len(alphas) == modules
    dropped = sum(k.endswith(".dora_scale") for k in tensors)
    assert dropped == (modules if dora else 0)
    assert not any("dora" in k or "magnitude" in k for k in state)
