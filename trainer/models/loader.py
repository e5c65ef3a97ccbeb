"""Build a ModelBundle from files: checkpoint (+ optional VAE file, NAME.yaml, tokenizer).

Loading never holds two copies: the header alone decides family and config, modules are
built on the ``meta`` device, and the checkpoint's tensors (mmap views) are assigned into
them. Only a dtype or device change copies, tensor by tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from ..errors import UserError
from .bundle import ModelBundle
from .checkpoint_io import CheckpointError, load_state_dict, shapes_of
from .configs import UNET_PREFIX, VAE_PREFIX, ModelConfig, apply_yaml, config_from_shapes
from .schedule import NoiseSchedule
from .text_encoders import load_text_encoder
from .tokenizer import ClipTokenizer
from .unet import UNetModel
from .vae import AutoencoderKL

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "tiny-sd" / "tiny-sd.safetensors"
DEFAULT_TOKENIZERS = {"sd1": "openai/clip-vit-large-patch14", "sd2": "openai/clip-vit-large-patch14",
                      "sdxl": "openai/clip-vit-large-patch14"}  # one BPE for all three families

Log = Callable[[str], None]


def resolve_device(device=None) -> torch.device:
    """``--device`` as a torch device (empty = cuda when available, else cpu), checked before any model work.

    ``torch.device("cuda")`` succeeds even where PyTorch has no CUDA; the failure would come from deep
    inside a model load as a traceback. Here a device this build or machine lacks is one line saying so.
    """
    if device is None or (isinstance(device, str) and not device.strip()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        _check_cuda(dev, device)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        why = ("this PyTorch build has no MPS support" if not torch.backends.mps.is_built()
               else "MPS needs an Apple-silicon Mac with macOS 12.3 or later")
        raise UserError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: {dev.type} is not supported; use cpu, cuda, cuda:N or mps")
    return dev


def _check_cuda(dev: torch.device, given) -> None:
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"--device {given}: {why} (torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise UserError(f"--device {given}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def _sub(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _assign(module: torch.nn.Module, state: dict, what: str, source: str) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        missing = [k for k in module.state_dict() if k not in state]
        unexpected = [k for k in state if k not in module.state_dict()]
        detail = (f"missing {len(missing)} keys, e.g. {missing[0]}" if missing else
                  f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}" if unexpected else
                  str(e).splitlines()[-1].strip()[:200])
        raise CheckpointError(f"{source}: {what} weights do not fit ({detail})") from None


def _vae_state(path: Path) -> dict[str, torch.Tensor]:
    state = load_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in state):
        state = _sub(state, VAE_PREFIX)
    if not any(k.startswith("encoder.") for k in state) and not any(k.startswith("decoder.") for k in state):
        if any("down_blocks" in k for k in state):
            raise CheckpointError(f"{path}: diffusers-format VAE; use an original-format VAE file")
        raise CheckpointError(f"{path}: not a VAE (no encoder./decoder. weights)")
    return {k: v for k, v in state.items() if not k.startswith("loss.") and k != "model_ema.decay"
            and not k.startswith("model_ema.")}


def load_tokenizer(config: ModelConfig, override: Optional[str] = None) -> ClipTokenizer:
    name = override or config.tokenizer or DEFAULT_TOKENIZERS[config.family]
    return ClipTokenizer.from_pretrained(name)


def read_config(path: str | Path, prediction_type: Optional[str] = None, shapes: Optional[dict] = None) -> ModelConfig:
    """The checkpoint's config from its header and the ``NAME.yaml`` beside it: no weights read, so the
    form can ask a model's native size without loading it."""
    path = Path(path)
    config = config_from_shapes(shapes if shapes is not None else shapes_of(path), str(path))
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.is_file():
        config = apply_yaml(config, yaml_path)
    if prediction_type:
        config.prediction_type = prediction_type
    if config.family == "sd2" and config.prediction_type == "v_prediction" and not yaml_path.is_file():
        config.native_size = (768, 768)
    return config


def load_model(path: str | Path, *, vae: Optional[str | Path] = None, prediction_type: Optional[str] = None,
               tokenizer: Optional[str] = None, device=None, dtype: torch.dtype = torch.float32,
               log: Optional[Log] = None) -> ModelBundle:
    """A checkpoint file → ModelBundle on ``device`` in ``dtype`` (frozen, eval mode)."""
    path = Path(path)
    device = resolve_device(device)
    shapes = shapes_of(path)
    config = read_config(path, prediction_type, shapes)
    tok = load_tokenizer(config, tokenizer)   # before the heavy part: a missing tokenizer fails fast

    # Only the keys a module takes, upcast tensor by tensor while reading (see load_safetensors): the
    # fp16 file and its fp32 copy are never resident together.
    prefixes = (UNET_PREFIX, *([] if vae is not None else [VAE_PREFIX]), *(t.prefix for t in config.text_encoders))
    state = load_state_dict(path, keys=[k for k in shapes if k.startswith(prefixes)], dtype=dtype)
    with torch.device("meta"):
        unet = UNetModel(config.unet)
        vae_model = AutoencoderKL(**config.vae.kwargs())
    _assign(unet, _sub(state, UNET_PREFIX), "UNet", str(path))
    if vae is not None:
        _assign(vae_model, _vae_state(Path(vae)), "VAE", str(vae))
    elif any(k.startswith(VAE_PREFIX) for k in shapes):
        _assign(vae_model, _sub(state, VAE_PREFIX), "VAE", str(path))
    else:
        raise CheckpointError(f"{path}: the checkpoint has no VAE; give one with --vae")
    encoders = []
    for spec in config.text_encoders:
        try:
            encoders.append(load_text_encoder(state, spec.role, spec.config,
                                              clip_skip=config.clip_skip_default))
        except KeyError:
            raise CheckpointError(f"{path}: text encoder weights missing (expected {spec.prefix}*)") from None
        except RuntimeError as e:
            raise CheckpointError(f"{path}: text encoder weights do not fit "
                                  f"({str(e).strip().splitlines()[-1][:160]})") from None
    if tok.vocab_size > encoders[0].config.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but {path.name}'s text encoder only "
                        f"{encoders[0].config.vocab_size}: wrong tokenizer for this model")
    bundle = ModelBundle(config, unet, vae_model, encoders, tok, NoiseSchedule(), name=path.stem, source=str(path))
    bundle.to(device=device, dtype=dtype).requires_grad_(False).eval()
    if log:
        log(f"loaded {path.name}: {config.title}, {config.prediction_type}, native {config.native_size[0]}x"
            f"{config.native_size[1]}{', VAE ' + Path(vae).name if vae else ''}")
    return bundle


def random_tiny_bundle(seed: int = 0, device=None) -> ModelBundle:
    """A random-initialised tiny SD1 model with its own small tokenizer (draws noise; for wiring only)."""
    from .tiny import tiny_config, tokenizer_vocab, TINY_WORDS
    vocab, merges = tokenizer_vocab(TINY_WORDS)
    tok = ClipTokenizer(vocab, merges)
    config = tiny_config(len(vocab), tok.bos_id, tok.eos_id)
    from .text_encoders import build_text_encoder
    torch.manual_seed(seed)
    unet = UNetModel(config.unet)
    vae_model = AutoencoderKL(**config.vae.kwargs())
    te = build_text_encoder("sd1", config.text_encoders[0].config)
    bundle = ModelBundle(config, unet, vae_model, [te], tok, NoiseSchedule(), name="random-tiny")
    return bundle.to(device=resolve_device(device)).requires_grad_(False).eval()


def load_model_or_default(model: Optional[str | Path] = None, *, log: Optional[Log] = None, **kw) -> ModelBundle:
    """``--model`` if given, else the embedded tiny model; before that exists, a random tiny model (said so)."""
    if model:
        return load_model(model, log=log, **kw)
    if DEFAULT_MODEL.is_file():
        return load_model(DEFAULT_MODEL, log=log, **kw)
    if log:
        log("note: the embedded tiny model is not built yet; using a RANDOM-INITIALISED tiny SD1 model "
            "(its images are noise, this only shows the pipeline works)")
    return random_tiny_bundle(device=kw.get("device"))
