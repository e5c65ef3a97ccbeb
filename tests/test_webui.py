"""Training inside the WebUI: on the loaded model's tensors, under its lock, leaving it exactly as it was.

The WebUI is faked (``tests/fake_webui.py``: A1111 1.10's names and wrappers) over the tiny SD1
model; ``trainer/webui.py`` is the real adapter.
"""
import builtins
import importlib
import io
import mmap
import sys
from pathlib import Path

import pytest
import torch

import fake_webui
from trainer.engine import StopRequest
from trainer.errors import UserError
from trainer.events import EventBus, StepEvent
from trainer.models.loader import random_tiny_bundle
from trainer.models.tiny import write_model_files
from trainer.runner import run_job
from trainer.settings import Settings

ILECO = dict(mode="iLECO", original_prompt="red circle", target_prompt="blue circle", image_size=(64, 64),
             train_iterations=4, train_batch_size=1, network_rank=2, network_alpha=2, train_seed=3,
             train_learning_rate=1e-3, train_lr_scheduler="constant", network_blocks=["IN01", "OUT11"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model written as a WebUI checkpoint (the fake WebUI model holds the same weights in memory)."""
    folder = tmp_path_factory.mktemp("ckpt")
    return write_model_files(random_tiny_bundle(seed=0, device="cpu"), folder, dtype=torch.float32)


@pytest.fixture
def webui(tmp_path, monkeypatch, checkpoint):
    """Fake ``modules.*`` with a loaded model, and a fresh ``trainer.webui`` bound to them."""
    model = fake_webui.build_sd_model(checkpoint)
    mods = fake_webui.make_modules(tmp_path, sd_model=model)
    fake_webui.install(monkeypatch, mods)
    monkeypatch.delitem(sys.modules, "trainer.webui.adapter", raising=False)
    adapter = importlib.import_module("trainer.webui.adapter")
    host = adapter.WebUIHost.create()
    host.root = tmp_path / "ext"
    return adapter, host, model, mods


def _snapshot(model):
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "devices": {k: v.device for k, v in model.state_dict().items()},
    }


def _assert_unchanged(model, before):
    now = _snapshot(model)
    assert now["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in now["tensors"].items() if not torch.equal(v, before["tensors"][k])]
    assert not changed, f"WebUI tensors changed: {changed[:5]}"
    for key in ("dtypes", "requires_grad", "training", "devices"):
        assert now[key] == before[key], key
    hooks = [name for name, m in model.named_modules()
             if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]
    assert not hooks, f"hooks left on the WebUI model: {hooks[:5]}"


def _train(host, settings, events=None, stop=None, sabotage=None):
    """What the queue does for one job, with the WebUI host."""
    with host.job_context(settings):
        bundle, info = host.bundle_for(settings)
        if sabotage:
            sabotage(bundle)
        result = run_job(settings, lora_dir=host.lora_dir, bundle=bundle, model_info=info, events=events,
                         stop=stop, log_dir=host.logs_dir, json_dir=host.json_dir,
                         prompt_encoder=host.prompt_encoder(bundle))
    if result.saved:
        host.after_job(result)
    return bundle, info, result


@pytest.fixture
def no_checkpoint_reads(monkeypatch, checkpoint):
    """Any read of the checkpoint's folder (or any torch/safetensors file load) fails the test."""
    folder = str(checkpoint.parent.resolve())
    real_open, real_io_open = builtins.open, io.open

    def guarded(real):
        def open_(file, *a, **kw):
            if isinstance(file, (str, Path)) and str(Path(file).resolve()).startswith(folder):
                raise AssertionError(f"the checkpoint folder was read: {file}")
            return real(file, *a, **kw)
        return open_

    def refuse(*a, **kw):
        raise AssertionError("a model file was loaded")

    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(io, "open", guarded(real_io_open))
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(mmap, "mmap", refuse)
    import safetensors
    import safetensors.torch
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


def test_trains_on_the_loaded_model_without_reading_its_file(webui, no_checkpoint_reads):
    adapter, host, model, mods = webui
    settings = Settings.from_dict(ILECO)
    steps = []
    bundle, info, result = _train(host, settings, EventBus([lambda e: steps.append(e)
                                                             if isinstance(e, StepEvent) else None]))
    assert result.status == "done" and len(steps) == 4
    # our modules, the WebUI's memory: every frozen tensor of the bundle is a view of the WebUI's
    from trainer.webui.model import checkpoint_state
    theirs = checkpoint_state(model)
    ours = bundle.checkpoint_state_dict()
    assert ours.keys() == theirs.keys() and len(ours) > 100
    assert all(ours[k].untyped_storage().data_ptr() == theirs[k].untyped_storage().data_ptr() for k in ours)
    assert bundle.unet is not model.model.diffusion_model
    # the LoRA went to --lora-dir, and the Lora list was refreshed to show it
    assert result.saved == [Path(mods["modules.shared"].cmd_opts.lora_dir) / "untitled.safetensors"]
    assert mods["networks"].available_networks == ["untitled.safetensors"]
    assert info["name"] == "tiny-sd" and info["hash"] == "0123456789"
    # logs stay in the extension folder
    assert result.csv is not None and Path(result.csv).is_relative_to(host.root)


def test_prompts_go_through_the_webui_prompt_parser(webui):
    adapter, host, model, mods = webui
    calls = mods["modules.prompt_parser"].calls
    _train(host, Settings.from_dict(dict(ILECO, clip_skip=2)))
    texts = [c[0] for c in calls]
    assert ["red circle"] in texts and ["blue circle"] in texts
    assert all(c[1:] == (64, 64, 2) for c in calls)             # size and clip skip handed over
    assert mods["modules.shared"].opts.data["CLIP_stop_at_last_layers"] == 1   # and put back


def test_prompt_encoder_returns_the_parsers_conditioning(webui):
    adapter, host, model, mods = webui
    settings = Settings.from_dict(ILECO)
    with host.job_context(settings):
        bundle, _ = host.bundle_for(settings)
        encode = host.prompt_encoder(bundle)
        with torch.no_grad():
            cond = encode(["a (red:1.3) circle", "blue"], size=(64, 64))
            expected = model.get_learned_conditioning(["a (red:1.3) circle", "blue"])
        assert torch.equal(cond["context"], expected)
        calls = len(mods["modules.prompt_parser"].calls)
        with torch.enable_grad():   # a text-encoder LoRA needs our own encoder (it carries the LoRA)
            encode(["red"], size=(64, 64))
        assert len(mods["modules.prompt_parser"].calls) == calls
    other = random_tiny_bundle(seed=1, device="cpu")
    assert host.prompt_encoder(other) is None   # never for a bundle that does not share the WebUI's encoder


@pytest.mark.parametrize("outcome", ["done", "stopped", "failed"])
def test_webui_model_exactly_as_before(webui, outcome):
    adapter, host, model, mods = webui
    before = _snapshot(model)
    lock = mods["modules.call_queue"].queue_lock
    stop = StopRequest()
    seen = []

    def on_event(e):
        if isinstance(e, StepEvent):
            seen.append(e.step)
            assert lock.locked(), "the generation lock must be held for the whole job"
            if outcome == "stopped" and e.step == 2:
                stop.request("stop")

    def sabotage(bundle):
        if outcome != "failed":
            return
        real, calls = bundle.unet_call, []

        def unet_call(*a, **kw):
            calls.append(1)
            if len(calls) > 4:
                raise RuntimeError("boom")
            return real(*a, **kw)
        bundle.unet_call = unet_call

    if outcome == "failed":
        with pytest.raises(RuntimeError, match="boom"):
            _train(host, Settings.from_dict(ILECO), EventBus([on_event]), stop, sabotage)
    else:
        _, _, result = _train(host, Settings.from_dict(ILECO), EventBus([on_event]), stop, sabotage)
        assert result.status == outcome
    assert seen and not lock.locked() and lock.holds == 1
    _assert_unchanged(model, before)


def test_flags_changed_during_a_job_are_put_back(webui):
    adapter, host, model, mods = webui
    before = _snapshot(model)
    unet = model.model.diffusion_model
    with host.job_context(Settings.from_dict(ILECO)):
        unet.train()                                     # something flips the WebUI's own modules
        unet.requires_grad_(False)
        unet.input_blocks[0][0].register_forward_hook(lambda *a: None)
    _assert_unchanged(model, before)


def test_lora_merged_in_place_is_undone_before_training(webui, checkpoint):
    adapter, host, model, mods = webui
    networks = mods["networks"]
    clean = fake_webui.build_sd_model(checkpoint)        # the same checkpoint, never patched
    layers = fake_webui.apply_lora_in_place(model, networks)
    assert not torch.equal(layers[0].weight, layers[0].network_weights_backup)
    settings = Settings.from_dict(ILECO)
    with host.job_context(settings):
        assert networks.loaded_networks == []
        for layer in layers:
            assert torch.equal(layer.weight, layer.network_weights_backup) and layer.network_current_names == ()
        bundle, _ = host.bundle_for(settings)
        reference = clean.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
        result = run_job(settings, lora_dir=host.lora_dir, bundle=bundle, log_dir=host.logs_dir,
                         json_dir=host.json_dir, prompt_encoder=host.prompt_encoder(bundle))
    assert result.status == "done"


def test_hypernetworks_tiling_and_unet_override_parked_then_restored(webui):
    adapter, host, model, mods = webui
    shared, hijack, sd_unet = mods["modules.shared"], mods["modules.sd_hijack"].model_hijack, mods["modules.sd_unet"]
    hypernet, trt = object(), object()
    shared.loaded_hypernetworks.append(hypernet)
    hijack.circular_enabled = True
    sd_unet.current_unet = sd_unet.saved_unet = trt
    with host.job_context(Settings.from_dict(ILECO)):
        assert shared.loaded_hypernetworks == [] and hijack.circular_enabled is False and sd_unet.current_unet is None
    assert shared.loaded_hypernetworks == [hypernet] and hijack.circular_enabled is True and sd_unet.current_unet is trt


def test_half_precision_webui_model_is_copied_not_changed(webui, checkpoint, monkeypatch, tmp_path):
    adapter, host, _, mods = webui
    model = fake_webui.build_sd_model(checkpoint, dtype=torch.float16)
    mods["modules.sd_models"].model_data.sd_model = model
    before = _snapshot(model)
    bundle, _, result = _train(host, Settings.from_dict(ILECO))   # auto precision on CPU = fp32
    assert result.status == "done" and bundle.dtype == torch.float32
    _assert_unchanged(model, before)


def test_refusals_are_one_clear_line(webui, checkpoint):
    adapter, host, model, mods = webui
    settings = Settings.from_dict(ILECO)
    lock = mods["modules.call_queue"].queue_lock
    mods["modules.shared"].cmd_opts.medvram = True
    with pytest.raises(UserError, match="--lowvram/--medvram"):
        with host.job_context(settings):
            pass
    assert not lock.locked()
    mods["modules.shared"].cmd_opts.medvram = False

    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None:
        layer = fake_webui.linear_layers(model)[0]
        layer.weight.data = layer.weight.data.to(fp8)
        with pytest.raises(UserError, match="fp8"), host.job_context(settings):
            host.bundle_for(settings)

    inpaint = fake_webui.build_sd_model(checkpoint)
    conv = inpaint.model.diffusion_model.input_blocks[0][0]
    inpaint.model.diffusion_model.input_blocks[0][0] = torch.nn.Conv2d(9, conv.out_channels, 3, padding=1)
    mods["modules.sd_models"].model_data.sd_model = inpaint
    with pytest.raises(UserError, match="inpainting"), host.job_context(settings):
        host.bundle_for(settings)


def test_another_checkpoint_is_loaded_from_its_file(webui, tmp_path):
    adapter, host, model, mods = webui
    other = write_model_files(random_tiny_bundle(seed=7, device="cpu"), tmp_path / "other", name="other",
                              dtype=torch.float32)
    settings = Settings.from_dict(dict(ILECO, model_checkpoint=str(other)))
    with host.job_context(settings):
        bundle, info = host.bundle_for(settings)
        assert host.prompt_encoder(bundle) is None     # its text encoder is not the WebUI's
    assert bundle.source == str(other) and info["name"] == "other"
    webui_ptrs = {v.untyped_storage().data_ptr() for v in model.state_dict().values()}
    assert not any(v.untyped_storage().data_ptr() in webui_ptrs for v in bundle.unet.state_dict().values())
    # a title from the WebUI's checkpoint list means the loaded model itself: shared
    titled = Settings.from_dict(dict(ILECO, model_checkpoint="tiny-sd [0123456789]"))
    with host.job_context(titled):
        bundle, _ = host.bundle_for(titled)
        assert host.prompt_encoder(bundle) is not None
    with pytest.raises(UserError, match="model_checkpoint"):
        host.bundle_for(Settings.from_dict(dict(ILECO, model_checkpoint="no-such-model")))


def test_paths_and_pickers_come_from_the_webui(webui, checkpoint):
    adapter, host, model, mods = webui
    assert host.lora_dir == Path(mods["modules.shared"].cmd_opts.lora_dir)
    assert host.checkpoints() == ["", str(checkpoint)]
    assert host.vaes()[0] == "None"
    mods["modules.shared"].cmd_opts.lora_dir = None
    assert adapter.lora_dir() == Path(mods["modules.paths"].models_path) / "Lora"


def test_auto_precision_shares_half_weights_on_a_gpu(webui, monkeypatch):
    adapter, _, _, _ = webui
    cuda, cpu, half = torch.device("cuda"), torch.device("cpu"), torch.float16
    monkeypatch.setattr(adapter, "resolve_precision", lambda name, device: torch.bfloat16)
    assert adapter._precision("auto", half, cuda) == half                    # shared, no copy
    assert adapter._precision("auto", half, cpu) == torch.bfloat16           # CPU: what standalone would pick
    assert adapter._precision("fp32", half, cuda) == torch.float32           # asked for: copied
    assert adapter._precision("auto", half, cuda, keep_half=False) == torch.bfloat16   # SDXL's fp16 VAE


def test_a_queued_job_runs_through_the_webui_host(webui):
    """The real queue worker with the WebUI host: lock, shared model, LoRA in --lora-dir, Lora list refreshed."""
    import time
    from trainer.app.jobs import JobQueue
    adapter, host, model, mods = webui
    before = _snapshot(model)
    queue = JobQueue(host, poll_s=0.05).start()
    try:
        job = queue.add(Settings.from_dict(dict(ILECO, save_lora_name="queued")))
        deadline = time.time() + 120
        while queue.get(job.id).state in ("pending", "running") and time.time() < deadline:
            time.sleep(0.1)
        done = queue.get(job.id)
    finally:
        queue.close(timeout=30)
    assert done.state == "done", done.message
    assert mods["networks"].available_networks == ["queued.safetensors"]
    assert mods["modules.call_queue"].queue_lock.holds == 1 and not mods["modules.call_queue"].queue_lock.locked()
    assert [c[0] for c in mods["modules.prompt_parser"].calls] == [["red circle"], ["blue circle"]]
    _assert_unchanged(model, before)


def test_a_model_that_cannot_be_shared_is_read_from_its_file(webui, checkpoint):
    """Forge-style engine objects (no ldm modules), or sharing turned off in Settings: our loader reads the file."""
    from types import SimpleNamespace
    adapter, host, model, mods = webui
    settings = Settings.from_dict(ILECO)
    forge = SimpleNamespace(sd_checkpoint_info=model.sd_checkpoint_info, forge_objects=object(), lowvram=False)
    mods["modules.sd_models"].model_data.sd_model = forge
    with host.job_context(settings):
        bundle, info = host.bundle_for(settings)
        assert bundle.source == str(checkpoint) and host.prompt_encoder(bundle) is None
    mods["modules.sd_models"].model_data.sd_model = model
    mods["modules.shared"].opts.data["shinkansen_share_model"] = False
    with host.job_context(settings):
        bundle, _ = host.bundle_for(settings)
    assert bundle.source == str(checkpoint)
    conv_in = model.model.diffusion_model.input_blocks[0][0].weight
    assert bundle.unet.input_blocks[0][0].weight.data_ptr() != conv_in.data_ptr()
