"""The WebUI adapter: the only module that imports ``modules.*`` (AUTOMATIC1111 1.10).

:class:`WebUIHost` is what the queue, the tab and the API get from the host when running in
the WebUI. A job goes: ``job_context`` (the WebUI's generation lock, the built-in Lora's
in-place merges undone, hypernetworks / tiling / UNet overrides parked, a snapshot of the
model's flags) → ``bundle_for`` (our modules over the loaded model's tensors) → the run →
the context's exit puts everything back, whether the run finished, stopped or failed.

The registration callbacks at the bottom are what ``scripts/shinkansen.py`` hands to
``script_callbacks``; state (host, queue) lives here, in the package, so a running job
survives "Reload UI" (the WebUI re-executes script files, not cached packages).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from modules import call_queue, devices, paths, sd_models, shared

from ..engine import DTYPES, ROOT, resolve_precision
from ..errors import UserError
from ..app.host import Host
from .model import bundle_from_webui, replace_vae
from .state import ModelSnapshot, reset_builtin_lora

log = logging.getLogger(__name__)

TAB_TITLE, TAB_ID = "Shinkansen", "shinkansen"
SECTION = ("shinkansen", "Shinkansen")
OPTIONS = {  # key: (default, label)
    "shinkansen_share_model": (True, "Train on the loaded checkpoint's weights in memory (no second copy); "
                                     "off: read its file again"),
    "shinkansen_refresh_loras": (True, "Refresh the Lora list after each training run"),
    "shinkansen_offer_tiny_model": (True, "List the embedded tiny model (64x64) in the checkpoint dropdown "
                                          "(shinkansen-tiny-sd in models/Stable-diffusion; applies at restart)"),
}


def _option(key: str):
    return getattr(shared.opts, key, OPTIONS[key][0])


def _optional(name: str):
    """A WebUI module that not every WebUI version or fork has (Forge stubs several)."""
    try:
        return __import__(f"modules.{name}", fromlist=[name])
    except Exception:   # noqa: BLE001 - a missing or broken optional module just disables its feature
        return None


def api_credentials() -> dict:
    """``--api-auth user:pass[,user2:pass2]`` as A1111 parses it."""
    raw = getattr(shared.cmd_opts, "api_auth", None) or ""
    pairs = (c.split(":", 1) for c in raw.split(",") if ":" in c)
    return {user.strip(): password for user, password in pairs}


def lora_dir() -> Path:
    return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"))


def _precision(name: str, held: torch.dtype, device: torch.device, keep_half: bool = True) -> torch.dtype:
    """``auto`` keeps the WebUI's half precision on a GPU, so the weights are shared instead of copied.

    ``keep_half=False`` for SDXL's VAE in fp16, which overflows when encoding (NaN latents).
    """
    if name == "auto" and keep_half and device.type != "cpu" and held in (torch.float16, torch.bfloat16):
        return held
    return DTYPES[name] if name in DTYPES else resolve_precision(name, device)


def _ldm_shaped(model) -> bool:
    """A1111's layout (ldm/sgm modules); Forge's engine objects are not, so they load from the file."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    return isinstance(unet, torch.nn.Module) and isinstance(getattr(model, "first_stage_model", None), torch.nn.Module)


@dataclass
class WebUIHost(Host):
    name: str = "webui"
    _bundle: object = field(default=None, repr=False)    # the bundle sharing the loaded model, during a job
    _model: object = field(default=None, repr=False)

    @classmethod
    def create(cls) -> "WebUIHost":
        creds = api_credentials()
        return cls(root=ROOT, lora_dir=lora_dir(), model_dir=Path(getattr(sd_models, "model_path", "") or "."),
                   vae_dir=None, default_model="", auth=next(iter(creds.items()), None))

    # ------------------------------------------------------------------ pickers
    def checkpoints(self) -> list[str]:
        """"" (the loaded model) first, then every checkpoint file the WebUI knows."""
        infos = getattr(sd_models, "checkpoints_list", {}) or {}
        return [""] + sorted({str(i.filename) for i in infos.values() if getattr(i, "filename", None)})

    def vaes(self) -> list[str]:
        """"None" (what the WebUI has loaded) first, then every VAE file it knows."""
        sd_vae = _optional("sd_vae")
        return ["None"] + sorted({str(p) for p in (getattr(sd_vae, "vae_dict", {}) or {}).values()})

    def native_size(self, checkpoint: str) -> Optional[tuple]:
        """"" is the loaded model, whose size the user knows: no claim (and no model load) for it."""
        try:
            path = self._resolve(checkpoint)
        except UserError:
            return None
        return super().native_size(str(path)) if path else None

    # ------------------------------------------------------------------ the loaded model
    @staticmethod
    def loaded_model(load: bool = True):
        """The WebUI's model; ``load=False`` never triggers a (synchronous) load."""
        model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
        if model is None and load:
            model = shared.sd_model
        return model

    @staticmethod
    def refuse_lowvram(model) -> None:
        opts = shared.cmd_opts
        sdxl = bool(getattr(model, "is_sdxl", False))
        if getattr(model, "lowvram", False) or getattr(opts, "lowvram", False) or getattr(opts, "medvram", False) \
                or (sdxl and getattr(opts, "medvram_sdxl", False)):
            raise UserError("the WebUI runs with --lowvram/--medvram, which moves model parts between CPU and GPU "
                            "inside every forward and breaks training; restart the WebUI without it")

    def _resolve(self, value: str) -> Optional[Path]:
        """A checkpoint picked in the tab as a file; None = the loaded one."""
        if not value:
            return None
        if Path(value).is_file():
            return Path(value)
        info = sd_models.get_closet_checkpoint_match(value) if hasattr(sd_models, "get_closet_checkpoint_match") \
            else None
        if info is None:
            raise UserError(f"model_checkpoint: {value} is neither a file nor a checkpoint the WebUI knows")
        return Path(info.filename)

    @staticmethod
    def _same_file(a, b) -> bool:
        try:
            return bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve()
        except OSError:
            return False

    def _vae_file(self, value: str) -> Optional[Path]:
        if not value or value.lower() in ("none", "automatic"):
            return None
        vae_dict = getattr(_optional("sd_vae"), "vae_dict", {}) or {}
        path = Path(vae_dict.get(value, value))
        if not path.is_file():
            raise UserError(f"model_vae: {value} is neither a file nor a VAE the WebUI knows")
        return path

    # ------------------------------------------------------------------ Host interface
    def bundle_for(self, settings, device=None, log: Optional[Callable[[str], None]] = None):
        """Our bundle over the loaded model's tensors, or the picked checkpoint loaded from its file."""
        say = log or (lambda m: None)
        picked = self._resolve(settings.model_checkpoint)
        model = self.loaded_model(load=picked is None)
        info = getattr(model, "sd_checkpoint_info", None)
        loaded_file = getattr(info, "filename", None)
        if picked is None and model is None:
            raise UserError("no model is loaded in the WebUI; load one or pick a checkpoint in the Model dropdown")
        same = model is not None and (picked is None or self._same_file(picked, loaded_file))
        if not (same and _option("shinkansen_share_model") and _ldm_shaped(model)):
            from ..runner import load_bundle
            if picked is None and not loaded_file:
                raise UserError("the WebUI's model cannot be shared and has no checkpoint file; "
                                "pick a checkpoint in the Model dropdown")
            path = picked or Path(loaded_file)
            say(f"loading {path.name} from its file")
            return load_bundle(settings.with_overrides(model_checkpoint=str(path)), device, say)

        reset_builtin_lora(model, sys.modules.get("networks"))   # idempotent; also done by job_context
        unet_weight = next(model.model.diffusion_model.parameters())
        vae_weight = next(model.first_stage_model.parameters())
        target = torch.device(device) if device is not None else unet_weight.device
        dtype = _precision(settings.train_model_precision, unet_weight.dtype, target)
        vae_dtype = _precision(settings.train_VAE_precision, vae_weight.dtype, target,
                               keep_half=not (getattr(model, "is_sdxl", False) and vae_weight.dtype == torch.float16))
        bundle = bundle_from_webui(model, dtype=dtype, vae_dtype=vae_dtype, device=target)
        loaded_vae = getattr(_optional("sd_vae"), "loaded_vae_file", None)
        vae = self._vae_file(settings.model_vae)
        if vae is not None and not self._same_file(vae, loaded_vae):
            replace_vae(bundle, vae, vae_dtype)
            loaded_vae = str(vae)
        self._bundle, self._model = bundle, model
        copied = dtype != unet_weight.dtype or target != unet_weight.device
        say(f"training on the WebUI's loaded model {bundle.name}" +
            (f" (copied to {str(dtype).replace('torch.', '')} on {target})" if copied else " (shared, no second copy)"))
        sha = getattr(info, "sha256", None) or ""
        return bundle, {"name": getattr(info, "model_name", None) or bundle.name, "sha256": sha,
                        "hash": getattr(info, "shorthash", None) or sha[:10],
                        "vae": Path(loaded_vae).name if loaded_vae else ""}

    def prompt_encoder(self, bundle):
        """The WebUI's prompt parser (emphasis, embeddings) for the bundle sharing its text encoders."""
        if bundle is None or bundle is not self._bundle or _optional("prompt_parser") is None:
            return None
        return WebUIPromptEncoder(bundle, self._model)

    @contextlib.contextmanager
    def job_context(self, settings) -> Iterator[None]:
        """The generation lock for the whole job; the WebUI's model exactly as before afterwards."""
        with call_queue.queue_lock:
            model = self.loaded_model(load=False)
            if model is not None:
                self.refuse_lowvram(model)
            if not isinstance(model, torch.nn.Module):   # not loaded, or a Forge engine object: nothing to guard
                model = None
            snapshot = ModelSnapshot.capture(model) if model is not None else None
            with _parked_extras():
                try:
                    if model is not None:
                        n = reset_builtin_lora(model, sys.modules.get("networks"))
                        if n:
                            log.info("restored %d layers patched in place by the built-in Lora extension", n)
                    yield
                finally:
                    self._bundle = self._model = None   # drop our references to the WebUI's tensors
                    if snapshot is not None:
                        changed = snapshot.restore(model)
                        if changed:
                            log.warning("put back on the WebUI model: %s", ", ".join(changed[:10]))
                    if hasattr(devices, "torch_gc"):
                        devices.torch_gc()

    def after_job(self, result) -> None:
        """The new file shows up in the Lora tab without pressing refresh."""
        networks = sys.modules.get("networks")
        if not getattr(result, "saved", None) or not _option("shinkansen_refresh_loras") \
                or not hasattr(networks, "list_available_networks"):
            return
        try:
            networks.list_available_networks()
        except Exception as e:  # noqa: BLE001 - a failed refresh must not fail a finished job
            log.warning("could not refresh the Lora list: %s", e)

    def caption_kinds(self) -> dict:
        """The WebUI's interrogators (CLIP, DeepBooru) for the Caption panel."""
        from .interrogate import caption_kinds
        return caption_kinds()


@contextlib.contextmanager
def _parked_extras() -> Iterator[None]:
    """Hypernetworks, tiling and UNet overrides of the last generation off for the job, back after it.

    Training uses our own modules, but the WebUI's text encoder runs for prompts, and a UNet
    override (e.g. TensorRT) parks the real UNet on the CPU, where sharing it would need a copy.
    """
    undo = []
    hypernetworks = getattr(shared, "loaded_hypernetworks", None)
    if hypernetworks:
        kept = list(hypernetworks)
        hypernetworks.clear()
        undo.append(lambda: hypernetworks.extend(kept))
    hijack = getattr(_optional("sd_hijack"), "model_hijack", None)
    if getattr(hijack, "circular_enabled", False):
        hijack.apply_circular(False)
        undo.append(lambda: hijack.apply_circular(True))
    sd_unet = _optional("sd_unet")
    if getattr(sd_unet, "current_unet", None) is not None:
        sd_unet.apply_unet("None")
        undo.append(sd_unet.apply_unet)     # re-selects the user's option (opts.sd_unet)
    try:
        yield
    finally:
        for fn in reversed(undo):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep restoring the rest
                log.warning("could not restore a WebUI setting after training: %s", e)


class WebUIPromptEncoder:
    """``encode_prompts(prompts, size=None, clip_skip=None)`` through the WebUI's prompt parser.

    With gradients on (a text-encoder LoRA is being trained) the bundle's own encoder is used:
    only it carries the LoRA; the WebUI's text encoder would give the LoRA no gradient.
    """

    CLIP_SKIP = "CLIP_stop_at_last_layers"

    def __init__(self, bundle, model):
        self.bundle, self.model = bundle, model

    def __call__(self, prompts, size=None, clip_skip=None, **kw) -> dict:
        if torch.is_grad_enabled():
            return self.bundle.encode_prompts(prompts, size=size, clip_skip=clip_skip, **kw)
        from modules import prompt_parser
        h, w = size or self.bundle.native_size
        texts = prompt_parser.SdConditioning(list(prompts), width=w, height=h) \
            if hasattr(prompt_parser, "SdConditioning") else list(prompts)
        autocast = devices.autocast() if hasattr(devices, "autocast") else contextlib.nullcontext()
        with self._clip_skip(clip_skip), torch.no_grad(), autocast:
            schedules = prompt_parser.get_learned_conditioning(self.model, texts, 1)
        return self._cond([s[0].cond for s in schedules])

    @contextlib.contextmanager
    def _clip_skip(self, value) -> Iterator[None]:
        data = getattr(shared.opts, "data", None)
        if not value or data is None:
            yield
            return
        had, old = self.CLIP_SKIP in data, data.get(self.CLIP_SKIP)
        data[self.CLIP_SKIP] = int(value)
        try:
            yield
        finally:
            if had:
                data[self.CLIP_SKIP] = old
            else:
                data.pop(self.CLIP_SKIP, None)

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.bundle.device, self.bundle.dtype)
        return t.clone() if t.is_inference() else t

    def _cond(self, conds: list) -> dict:
        if isinstance(conds[0], dict):   # SDXL: {"crossattn": [77k, 2048], "vector": [2816]}
            contexts = [c["crossattn"] for c in conds]
            y = torch.stack([self._tensor(c["vector"]) for c in conds])
        else:
            contexts, y = conds, None
        longest = max(c.shape[0] for c in contexts)
        if any(c.shape[0] != longest for c in contexts):   # pad with empty-prompt chunks, as A1111 batches do
            empty = self.bundle.encode_prompts([""])["context"][0]
            contexts = [torch.cat([self._tensor(c)] + [empty] * ((longest - c.shape[0]) // empty.shape[0]))
                        for c in contexts]
        out = {"context": torch.stack([self._tensor(c) for c in contexts])}
        if y is not None:
            out["y"] = y
        return out


# ---------------------------------------------------------------------- registration (called by the script)

_state: dict = {}


def host() -> WebUIHost:
    if "host" not in _state:
        _state["host"] = WebUIHost.create()
    return _state["host"]


def job_queue():
    """The one queue of this WebUI process (it outlives UI reloads)."""
    if "queue" not in _state:
        from ..app import jobs
        _state["queue"] = jobs.queue_for(host()) if hasattr(jobs, "queue_for") else jobs.JobQueue(host()).start()
    return _state["queue"]


def ui_tabs() -> list:
    try:
        from ..app.ui import build_tab
        blocks = build_tab(host(), job_queue())
    except Exception as e:  # noqa: BLE001 - an unsupported environment gets a tab saying so, not a dead WebUI
        log.exception("Shinkansen: could not build the tab")
        blocks = _unsupported_tab(f"{type(e).__name__}: {e}")
    return [(blocks, TAB_TITLE, TAB_ID)]


def _unsupported_tab(reason: str):
    import gradio as gr
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown(f"**Shinkansen cannot run in this WebUI.** {reason}")
    return blocks


def ui_settings() -> None:
    for key, (default, label) in OPTIONS.items():
        try:
            info = shared.OptionInfo(default, label, section=SECTION, category_id="training")
        except TypeError:   # WebUIs before 1.7 have no categories
            info = shared.OptionInfo(default, label, section=SECTION)
        shared.opts.add_option(key, info)


def before_ui() -> None:
    """The embedded tiny model in the checkpoint dropdown, whose choices the WebUI builds right after this."""
    from .embedded import offer_embedded_model
    model_dir = getattr(sd_models, "model_path", None) if _option("shinkansen_offer_tiny_model") else None
    path = offer_embedded_model(Path(model_dir)) if model_dir else None
    listed = getattr(sd_models, "checkpoints_list", None)
    if path is None or listed is None or not hasattr(sd_models, "CheckpointInfo") \
            or any(WebUIHost._same_file(getattr(i, "filename", None), path) for i in listed.values()):
        return
    try:   # the WebUI scanned its folder before loading scripts; from now on its own scans find the file
        sd_models.CheckpointInfo(str(path)).register()
    except Exception as e:  # noqa: BLE001 - a checkpoint we could not list must not stop the WebUI
        log.warning("Shinkansen: could not list the embedded tiny model %s: %s", path, e)


def app_started(demo, app) -> None:
    """API routes under /shinkansen/v1, behind ``--api-auth`` when it is set."""
    from ..app.api import register_api
    credentials = api_credentials()
    h = host()
    h.auth = next(iter(credentials.items()), None)
    register_api(app, job_queue(), h, auth=credentials or None)


def script_unloaded() -> None:
    """UI reload: the queue and a running job stay; only references to the old UI's model go."""
    h = _state.get("host")
    if h is not None and h._bundle is None:
        h._model = None
