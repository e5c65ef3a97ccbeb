"""Per-block ranks, alphas and LR weights in kohya's syntax (``block_dims``, ``block_alphas``, ``block_lr_weight``).

The slot of each module is recomputed here from its kohya *name*, as kohya's ``get_block_index`` does
(SD1/SD2: diffusers-style names, down_blocks.i.{resnets|attentions}.j → 1 + 3i + j, downsamplers → 1 + 3i + 2,
mid_block → 12, up_blocks.i.… → 13 + 3i + j, upsamplers → 13 + 3i + 2; SDXL: ldm-style names, input_blocks.n →
1 + n, middle_block.k → 10 + k, output_blocks.n → 13 + n), independently of the code's path-based rule.
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

import trainer.engine as engine
import trainer.modes.lora as lora_mode
from trainer.errors import UserError
from trainer.events import EventBus, StepEvent
from trainer.models.configs import builtin_config
from trainer.models.loader import random_tiny_bundle
from trainer.models.text_encoders import build_text_encoder
from trainer.models.unet import UNetModel
from trainer.networks import NetworkSpec, create_network, load_lora, lora_file_bytes, write_file_atomic
from trainer.networks import modules as M
from trainer.runner import run_job
from trainer.settings import Settings, SettingsError
from trainer.tools.inspect_lora import inspect, main as inspect_main
from trainer.world import toy

SD_RE = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")


def kohya_slot(name: str, sdxl: bool) -> int:
    if sdxl:
        m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name)
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)] + int(m.group(2))
    if "mid_block_" in name:
        return 12
    d, i, kind, j = SD_RE.search(name).groups()
    idx = 3 * int(i) + (2 if kind in ("upsamplers", "downsamplers") else int(j))
    return 1 + idx if d == "down" else 13 + idx


def block_of_slot(slot: int, sdxl: bool) -> str:
    if sdxl:
        return f"IN{slot - 1:02d}" if slot <= 9 else "M00" if slot <= 12 else f"OUT{slot - 13:02d}"
    return f"IN{slot:02d}" if slot < 12 else "M00" if slot == 12 else f"OUT{slot - 13:02d}"


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_model(name: str) -> SimpleNamespace:
    cfg = builtin_config(name)
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    tes = [build_text_encoder(s.role, s.config, device="meta") for s in cfg.text_encoders]
    return SimpleNamespace(unet=unet, text_encoders=tes, family=cfg.family, prediction_type=cfg.prediction_type)


def lists(n: int) -> tuple[list[int], list[float]]:
    dims = [(i * 5) % 4 * 2 for i in range(n)]            # 0, 2, 4, 6, 0, … : some blocks without modules
    alphas = [float(i % 3) for i in range(n)]              # 0 (= the rank), 1, 2, …
    return dims, alphas


@pytest.mark.parametrize("model,network_type", [("sd15", "lierla"), ("sd15", "c3lier"), ("sdxl", "lierla"),
                                                ("sdxl", "c3lier")])
def test_module_set_and_ranks_per_block_follow_the_syntax(model, network_type):
    m = meta_model(model)
    sdxl = model == "sdxl"
    n = 23 if sdxl else 25
    dims, alphas = lists(n)
    base = dict(network_type=network_type, rank=8, alpha=4, conv_rank=3, conv_alpha=1)
    full = create_network(m, NetworkSpec(**base))
    net = create_network(m, NetworkSpec(**base, block_dims=dims, block_alphas=alphas))
    want = {}
    for name, t in full.targets.items():
        if t.part == "te":
            want[name] = (8, 4.0)
        elif t.kind == "conv":                  # 3x3 convs keep the conv rank (kohya without conv_block_dims)
            want[name] = (3, 1.0)
        else:
            slot = kohya_slot(name, sdxl)
            if dims[slot]:
                want[name] = (dims[slot], alphas[slot] or float(dims[slot]))
    assert set(net.targets) == set(want)
    got = {k: (M.rank_of(a), round(float(a.scale) * M.rank_of(a), 6)) for k, a in net.adapters.items()}
    assert got == want
    assert len(net.targets) < len(full.targets)          # the zero blocks are really gone
    assert set(net.block_ranks()) == {full.targets[k].block for k in want}
    # what the file says: kohya's network args
    from trainer.networks import network_metadata
    args = json.loads(network_metadata(net)["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims))


def _file_of(net, path, real: bool) -> None:
    """The network as a LoRA file; a meta network's tensors become zeros of the same shapes (alpha kept)."""
    if real:
        write_file_atomic(path, lora_file_bytes(net, {"ss_output_name": "b"}, dtype=torch.float32))
        return
    from safetensors.torch import save_file
    tensors = {}
    for name, a in net.adapters.items():
        for k, v in M.tensors_of(a).items():
            tensors[f"{name}.{k}"] = torch.zeros(v.shape) if k != "alpha" else torch.tensor(float(a.scale) * M.rank_of(a))
    save_file(tensors, str(path))


@pytest.mark.parametrize("model", ["tiny", "sdxl"])
def test_inspect_shows_rank_and_alpha_per_block(tmp_path, capsys, model):
    sdxl = model == "sdxl"
    m = random_tiny_bundle(seed=0, device="cpu") if model == "tiny" else meta_model("sdxl")
    n = 23 if sdxl else 25
    dims, alphas = lists(n)
    net = create_network(m, NetworkSpec("c3lier", rank=8, alpha=4, conv_rank=3, conv_alpha=1, block_dims=dims,
                                        block_alphas=alphas))
    path = tmp_path / "b.safetensors"
    _file_of(net, path, real=not sdxl)
    report = inspect(path)
    want_r, want_a = {}, {}
    for name, t in net.targets.items():
        block = "BASE" if t.part == "te" else block_of_slot(kohya_slot(name, sdxl), sdxl)
        if t.part == "te" or t.kind == "conv":
            rank, alpha = (8, 4.0) if t.part == "te" else (3, 1.0)
        else:
            rank = dims[kohya_slot(name, sdxl)]
            alpha = alphas[kohya_slot(name, sdxl)] or float(rank)
        want_r.setdefault(block, set()).add(rank)
        want_a.setdefault(block, set()).add(alpha)
    one = lambda d: {b: next(iter(v)) if len(v) == 1 else sorted(v) for b, v in d.items()}   # noqa: E731
    assert report["ranks_per_block"] == one(want_r)
    assert report["alphas_per_block"] == pytest.approx(one(want_a))
    if sdxl:   # the middle block's three slots differ: inspect lists each rank it holds
        assert set(report["ranks_per_block"]["M00"]) == {3, dims[10], dims[11]} and dims[12] == 0
    inspect_main([str(path), "--brief"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["ranks_per_block"] == json.loads(json.dumps(report["ranks_per_block"]))


def test_bad_syntax_is_one_line_before_model_work():
    for bad, words in (("4," * 23 + "4", "24 values"), ("4," * 24, "empty|not a whole"), ("4," * 24 + "-1", "negative"), ("4," * 24 + "x", "not a whole")):
        with pytest.raises(SettingsError, match=f"block_dims: .*{words}"):
            Settings.from_dict({"block_dims": bad})
    with pytest.raises(SettingsError, match="block_lr_weight: .*22 values"):
        Settings.from_dict({"block_lr_weight": "1," * 21 + "1"})
    s = Settings.from_dict({"block_dims": "4," * 24 + "4", "block_alphas": "1," * 22 + "1", "lora_data_directory": "."})
    assert any("differ in length" in str(e) for e in s.problems(check_files=False))
    # the SDXL form on an SD1 model: one line when the network is built, before any step
    with pytest.raises(UserError, match="block_dims: 23 values, but this sd1 model needs 25"):
        create_network(random_tiny_bundle(seed=0, device="cpu"), NetworkSpec(block_dims=[4] * 23))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 2, seed=1, image_size=64)
    return folder


def unet_names(net) -> list[str]:
    """The UNet module names (the text encoder has no slot)."""
    return [n for n, t in net.targets.items() if t.part == "unet"]


def test_lr_weight_zero_freezes_a_block_and_groups_carry_scaled_lrs(tmp_path, dataset, monkeypatch):
    weights = [1.0] * 25
    weights[1] = 0.0          # IN01: frozen
    weights[16] = 0.25        # OUT03: a quarter of the LR
    weights[12] = 2.0         # MID: twice
    lr = 2e-3
    holder, groups_seen = {}, []
    real_new, real_opt = lora_mode.new_network, engine.build_optimizer

    def spy_new(run, s, *a, **kw):
        holder["net"] = net = real_new(run, s, *a, **kw)
        holder["init"] = {k: v.clone() for k, v in net.kohya_state_dict().items()}
        return net

    def spy_opt(name, groups, *a, **kw):
        groups_seen.extend(groups)
        return real_opt(name, groups, *a, **kw)

    monkeypatch.setattr(lora_mode, "new_network", spy_new)
    monkeypatch.setattr(engine, "build_optimizer", spy_opt)
    s = Settings.from_dict({"mode": "LoRA", "image_size": (64, 64), "image_buckets_step": 64, "image_min_length": 64,
                            "train_batch_size": 2, "network_rank": 4, "network_alpha": 4, "train_seed": 3,
                            "train_learning_rate": lr, "train_lr_scheduler": "constant", "train_iterations": 3,
                            "logging_save_csv": False, "save_precision": "fp32", "save_lora_name": "lrw",
                            "lora_data_directory": str(dataset), "block_lr_weight": ",".join(map(str, weights))})
    result = run_job(s, lora_dir=tmp_path, bundle=random_tiny_bundle(seed=0, device="cpu"), events=EventBus(),
                     log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    net, init = holder["net"], holder["init"]
    saved, md = load_lora(result.saved[0])
    owner = {id(p): name for name, a in net.adapters.items() for p in a.parameters()}
    frozen = [n for n in unet_names(net) if kohya_slot(n, False) == 1]
    assert frozen and not any(id(p) in {id(q) for g in groups_seen for q in g["params"]}
                              for n in frozen for p in net.adapters[n].parameters())
    for g in groups_seen:     # every trained parameter sits in a group at lr × its block's weight
        for p in g["params"]:
            name = owner[id(p)]
            w = 1.0 if name.startswith("lora_te") else weights[kohya_slot(name, False)]   # BASE: the TE LR
            assert g["lr"] == pytest.approx(lr * w)
    assert {g["name"] for g in groups_seen} == {"unet", "unet MID", "unet OUT03", "text_encoder"}
    for n in frozen:          # after training the frozen block is exactly as initialised (ups still zero)
        for k in (f"{n}.lora_up.weight", f"{n}.lora_down.weight"):
            assert torch.equal(saved[k], init[k])
    moved = [n for n in unet_names(net) if kohya_slot(n, False) == 4]   # IN04, weight 1: it did train
    assert any(float(saved[f"{n}.lora_up.weight"].abs().max()) > 0 for n in moved)
    assert json.loads(md["ss_network_args"])["down_lr_weight"].startswith("1,0,1")
