"""A stand-in for AUTOMATIC1111 1.10's ``modules.*`` and its loaded model, for the WebUI tests.

Only the shape matters (names, attributes, wrappers as a1111.md §1-§3 describe them); the
tiny SD1 model provides real tensors. Nothing here is WebUI code.
"""
from __future__ import annotations

import os
import sys
import threading
import types
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn


# ---------------------------------------------------------------------- the loaded model (SD1 layout)

class EmbeddingsWithFixes(nn.Module):
    """A1111's token-embedding wrapper (its weight shows up as ``token_embedding.wrapped.weight``)."""

    def __init__(self, wrapped: nn.Embedding):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class Container(nn.Module):
    pass


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    """``cond_stage_model`` after the hijack: ``.wrapped`` is ldm's FrozenCLIPEmbedder."""

    def __init__(self, text_encoder, tokenizer):
        super().__init__()
        self.wrapped = Container()
        self.wrapped.transformer = Container()
        self.wrapped.transformer.text_model = text_encoder.text_model
        self.wrapped.transformer.config = text_encoder.config
        emb = text_encoder.text_model.embeddings
        emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding)
        # the 4.30.2 slow CLIPTokenizer's attributes
        self.wrapped.tokenizer = SimpleNamespace(encoder=dict(tokenizer.vocab), bpe_ranks=dict(tokenizer.ranks))


class FakeSdModel(nn.Module):
    """``ldm.models.diffusion.ddpm.LatentDiffusion`` as the WebUI holds it (SD1)."""

    def __init__(self, bundle, checkpoint: Path, reference=None):
        super().__init__()
        self.model = Container()                         # DiffusionWrapper
        self.model.diffusion_model = bundle.unet
        self.model.conditioning_key = "crossattn"
        self.model.diffusion_model.num_heads = bundle.config.unet.num_heads
        self.model.diffusion_model.num_head_channels = bundle.config.unet.num_head_channels
        self.first_stage_model = bundle.vae
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(bundle.text_encoders[0], bundle.tokenizer)
        self._reference = reference                       # same weights, own modules: the fake's conditioning
        self.sd_checkpoint_info = SimpleNamespace(filename=str(checkpoint), model_name=checkpoint.stem,
                                                  title=f"{checkpoint.stem} [0123456789]", sha256="ab" * 32,
                                                  shorthash="0123456789")
        self.is_sdxl, self.is_sd2, self.is_sd1, self.is_sd3, self.is_ssd = False, False, True, False, False
        self.parameterization, self.scale_factor, self.image_size = "eps", 0.18215, 8
        self.lowvram, self.latent_channels = False, 4
        # as ldm leaves it: everything in eval; the UNet's parameters still require grad, the rest do not
        self.eval()
        self.model.diffusion_model.requires_grad_(True)
        self.first_stage_model.requires_grad_(False)
        self.cond_stage_model.requires_grad_(False)

    def get_learned_conditioning(self, texts):
        skip = sys.modules["modules.shared"].opts.data.get("CLIP_stop_at_last_layers", 1)
        return self._reference.encode_prompts(list(texts), clip_skip=skip)["context"]


def build_sd_model(checkpoint: Path, seed: int = 0, dtype=torch.float32) -> FakeSdModel:
    """The tiny model of ``checkpoint`` as the WebUI would hold it (the same weights, in memory)."""
    from trainer.models.loader import random_tiny_bundle
    model = FakeSdModel(random_tiny_bundle(seed=seed, device="cpu"), checkpoint,
                        reference=random_tiny_bundle(seed=seed, device="cpu"))
    return model.to(dtype)


def linear_layers(model: FakeSdModel, n: int = 4) -> list:
    """Some UNet attention and text-encoder Linear layers (what a LoRA patches)."""
    unet = [m for name, m in model.model.diffusion_model.named_modules() if name.endswith(("attn2.to_k", "attn1.to_q"))]
    te = [m for name, m in model.cond_stage_model.named_modules() if name.endswith("self_attn.q_proj")]
    return unet[:n] + te[:n]


@torch.no_grad()
def apply_lora_in_place(model: FakeSdModel, networks, scale: float = 0.5) -> list:
    """What the built-in Lora leaves after a ``<lora:x:1>`` generation: backups on CPU, deltas merged."""
    layers = linear_layers(model)
    for layer in layers:
        layer.network_weights_backup = layer.weight.to("cpu", copy=True)
        layer.network_bias_backup = layer.bias.to("cpu", copy=True) if layer.bias is not None else None
        layer.weight += scale * torch.randn_like(layer.weight)
        if layer.bias is not None:
            layer.bias += scale
        layer.network_current_names = (("x", 1.0, 1.0, None),)
    networks.loaded_networks.append(SimpleNamespace(name="x"))
    return layers


# ---------------------------------------------------------------------- modules.*

class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.section, self.category_id = default, label, section, category_id


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)


class FIFOLock:
    """``modules.fifo_lock.FIFOLock`` as far as a user of ``queue_lock`` can tell; records holds."""

    def __init__(self):
        self._lock = threading.Lock()
        self.holds = 0

    def acquire(self, blocking=True):
        got = self._lock.acquire(blocking)
        self.holds += int(got)
        return got

    def release(self):
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.width, self.height = width or 512, height or 512


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def make_modules(tmp: Path, sd_model=None, ext_dir: Path | None = None) -> dict:
    """``modules.*`` (and the built-in Lora's top-level ``networks``) with A1111 1.10's names."""
    callbacks = {k: [] for k in ("before_ui", "ui_tabs", "ui_settings", "app_started", "script_unloaded",
                                 "model_loaded")}
    script_callbacks = _module(
        "modules.script_callbacks", callbacks=callbacks,
        **{f"on_{k}": (lambda k: lambda fn, *, name=None: callbacks[k].append(fn))(k) for k in callbacks})
    cmd_opts = SimpleNamespace(lora_dir=str(tmp / "models" / "Lora"), api_auth=None, lowvram=False, medvram=False,
                               medvram_sdxl=False, ckpt_dir=None, vae_dir=None, api=False, no_half=True)
    shared = _module("modules.shared", opts=Options(), cmd_opts=cmd_opts, OptionInfo=OptionInfo, sd_model=sd_model,
                     loaded_hypernetworks=[], state=SimpleNamespace(interrupted=False))
    shared.opts.data["CLIP_stop_at_last_layers"] = 1
    checkpoints = {}
    if sd_model is not None:
        info = sd_model.sd_checkpoint_info
        checkpoints[info.title] = info

    def get_closet_checkpoint_match(search):
        for title, info in checkpoints.items():
            if search in title:
                return info
        return None

    model_path = str(tmp / "models" / "Stable-diffusion")

    class CheckpointInfo:
        """A1111's: named by its path under the checkpoint folder; ``register`` lists it."""

        def __init__(self, filename):
            self.filename = filename
            name = os.path.relpath(os.path.abspath(filename), model_path)
            self.name = os.path.basename(filename) if name.startswith("..") else name
            self.title = self.model_name = self.name
            self.sha256 = self.shorthash = None

        def register(self):
            checkpoints[self.title] = self

    sd_models = _module("modules.sd_models", model_data=SimpleNamespace(sd_model=sd_model, loaded_sd_models=[]),
                        checkpoints_list=checkpoints, get_closet_checkpoint_match=get_closet_checkpoint_match,
                        model_path=model_path, CheckpointInfo=CheckpointInfo)
    sd_vae = _module("modules.sd_vae", vae_dict={}, loaded_vae_file=None)
    parser_calls: list = []

    def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
        parser_calls.append((list(prompts), getattr(prompts, "width", None), getattr(prompts, "height", None),
                             shared.opts.data.get("CLIP_stop_at_last_layers")))
        conds = model.get_learned_conditioning(prompts)
        return [[ScheduledPromptConditioning(steps, conds[i])] for i in range(len(prompts))]

    prompt_parser = _module("modules.prompt_parser", get_learned_conditioning=get_learned_conditioning,
                            SdConditioning=SdConditioning, calls=parser_calls)
    hijack = SimpleNamespace(circular_enabled=False)
    hijack.apply_circular = lambda enable: setattr(hijack, "circular_enabled", enable)
    sd_hijack = _module("modules.sd_hijack", model_hijack=hijack)
    sd_unet = _module("modules.sd_unet", current_unet=None)

    def apply_unet(option=None):
        sd_unet.current_unet = None if option == "None" else sd_unet.saved_unet
    sd_unet.apply_unet, sd_unet.saved_unet = apply_unet, None
    gc_calls = []
    devices = _module("modules.devices", device=torch.device("cpu"), cpu=torch.device("cpu"), dtype=torch.float32,
                      fp8=False, torch_gc=lambda: gc_calls.append(1), gc_calls=gc_calls)
    paths = _module("modules.paths", models_path=str(tmp / "models"), script_path=str(tmp / "webui"),
                    data_path=str(tmp / "webui"))
    scripts = _module("modules.scripts", basedir=lambda: str(ext_dir or tmp))
    call_queue = _module("modules.call_queue", queue_lock=FIFOLock())

    listed: list = []

    def list_available_networks():
        listed.clear()
        listed.extend(sorted(p.name for p in Path(cmd_opts.lora_dir).glob("*.safetensors")))

    def network_restore_weights_from_backup(self):
        weights = getattr(self, "network_weights_backup", None)
        bias = getattr(self, "network_bias_backup", None)
        if weights is not None:
            self.weight.copy_(weights)
        if bias is not None:
            self.bias.copy_(bias)

    networks = _module("networks", loaded_networks=[], available_networks=listed,
                       list_available_networks=list_available_networks,
                       network_restore_weights_from_backup=network_restore_weights_from_backup)
    mods = {"modules.script_callbacks": script_callbacks, "modules.shared": shared, "modules.sd_models": sd_models,
            "modules.sd_vae": sd_vae, "modules.prompt_parser": prompt_parser, "modules.sd_hijack": sd_hijack,
            "modules.sd_unet": sd_unet, "modules.devices": devices, "modules.paths": paths,
            "modules.scripts": scripts, "modules.call_queue": call_queue}
    mods.update(_interrogators(shared, call_queue.queue_lock))
    package = _module("modules", __path__=[])
    for full, mod in mods.items():
        setattr(package, full.split(".", 1)[1], mod)
    return {"modules": package, **mods, "networks": networks}


# ---------------------------------------------------------------------- interrogators (modules.interrogate/deepbooru)

def _colour(image) -> str:
    """What the fake interrogators "see": the name of the image's centre colour."""
    r, g, b = image.getpixel((image.width // 2, image.height // 2))[:3]
    return {(255, 0, 0): "red", (0, 0, 255): "blue", (0, 255, 0): "green"}.get((r, g, b), "grey")


class FakeInterrogator:
    """``shared.interrogator`` (``modules.interrogate.InterrogateModels``): BLIP caption + CLIP flavours, and
    ``<error>`` appended when it fails (here: for green images), as A1111 1.10 returns it."""

    def __init__(self, lock):
        self.lock, self.calls = lock, []

    def interrogate(self, pil_image):
        self.calls.append((_colour(pil_image), pil_image.mode, self.lock.locked()))
        if _colour(pil_image) == "green":
            return "<error>"
        return f"a {_colour(pil_image)} picture, flat colour, minimalism"


class FakeDeepDanbooru:
    """``modules.deepbooru.model``: start()/stop() around tag_multi(), which applies the WebUI's settings."""
    TAGS = {"red": {"red_background": 0.9, "no_humans": 0.8, "circle": 0.6, "rating:safe": 0.99, "faint": 0.2},
            "blue": {"blue_background": 0.95, "no_humans": 0.7, "square": 0.55}}

    def __init__(self, shared, lock):
        self.shared, self.lock, self.started, self.stopped, self.calls = shared, lock, 0, 0, []

    def start(self):
        self.started += 1

    def stop(self):
        self.stopped += 1

    def tag_multi(self, pil_image, force_disable_ranks=False):
        opts = self.shared.opts
        self.calls.append((_colour(pil_image), self.started > self.stopped, self.lock.locked()))
        probs = self.TAGS.get(_colour(pil_image), {})
        kept = sorted(((p, t) for t, p in probs.items()
                       if p >= opts.interrogate_deepbooru_score_threshold and not t.startswith("rating:")), reverse=True)
        out = []
        for p, t in kept:
            t = t.replace("_", " ") if opts.deepbooru_use_spaces else t
            out.append(f"({t}:{p:.3f})" if opts.interrogate_return_ranks and not force_disable_ranks else t)
        return ", ".join(out)


def _interrogators(shared, lock) -> dict:
    shared.interrogator = FakeInterrogator(lock)
    shared.opts.data.update(interrogate_deepbooru_score_threshold=0.5, deepbooru_use_spaces=True,
                            interrogate_return_ranks=True)
    return {"modules.interrogate": _module("modules.interrogate", InterrogateModels=FakeInterrogator),
            "modules.deepbooru": _module("modules.deepbooru", model=FakeDeepDanbooru(shared, lock))}


def install(monkeypatch, mods: dict) -> None:
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
