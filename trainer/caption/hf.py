"""BLIP and Florence-2 captioners through transformers' own classes (never ``trust_remote_code``).

Both write one sentence per image. BLIP is ``BlipForConditionalGeneration`` (the
``Salesforce/blip-image-captioning-*`` repositories); Florence-2 is the ``Florence2ForConditionalGeneration``
that transformers ships natively since 4.56, with the converted weights of ``florence-community/Florence-2-*``
(Microsoft's own repositories need remote code, which we do not run). Decoding is beam search, so a caption
does not change from one run to the next.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from ..errors import UserError

FLORENCE_TASKS = {"caption": "<CAPTION>", "detailed": "<DETAILED_CAPTION>",
                  "more_detailed": "<MORE_DETAILED_CAPTION>"}


def pick_device(device: Optional[str]):
    import torch
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this PyTorch has no CUDA device; use --device cpu")
    return dev, (torch.float16 if dev.type == "cuda" else torch.float32)


def _load(label: str, folder: Path, load):
    try:
        return load()
    except (OSError, ValueError, KeyError) as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{folder}: cannot load the {label} model or its processor ({line[:200]})") from None


def check_florence2() -> None:
    """Florence-2 is native in transformers only from 4.56 on (the WebUI pins 4.30.2)."""
    import transformers
    if not hasattr(transformers, "Florence2ForConditionalGeneration"):
        raise UserError(f"Florence-2 needs transformers 4.56 or newer (this is {transformers.__version__}): "
                        "pip install -U transformers, or caption with --kind blip or wd14")


class _Generator:
    """What BLIP and Florence-2 share: a processor, a generating model, beam search settings."""

    kind = ""
    label = ""

    def __init__(self, device: Optional[str], num_beams: int, max_length: int, min_length: int):
        self.device, self.dtype = pick_device(device)
        self.num_beams, self.max_length, self.min_length = int(num_beams), int(max_length), int(min_length)

    def close(self) -> None:
        self.model = None


class BlipCaptioner(_Generator):
    kind, label = "blip", "BLIP"

    def __init__(self, folder: Path, device: Optional[str] = None, num_beams: int = 3, max_length: int = 75,
                 min_length: int = 5, prompt: str = ""):
        super().__init__(device, num_beams, max_length, min_length)
        from transformers import BlipForConditionalGeneration, BlipProcessor
        self.processor = _load(self.label, folder, lambda: BlipProcessor.from_pretrained(folder))
        self.model = _load(self.label, folder, lambda: BlipForConditionalGeneration.from_pretrained(
            folder)).to(self.device, self.dtype).eval()
        self.prompt = prompt.strip()      # BLIP's conditional captioning: the caption continues this text

    def caption(self, images: Sequence[Image.Image]) -> list[list[str]]:
        import torch
        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=list(images), return_tensors="pt", **kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, num_beams=self.num_beams, max_length=self.max_length,
                                      min_length=self.min_length, do_sample=False)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [[" ".join(t.split())] if t.strip() else [] for t in texts]


class FlorenceCaptioner(_Generator):
    kind, label = "florence2", "Florence-2"

    def __init__(self, folder: Path, device: Optional[str] = None, num_beams: int = 3, max_length: int = 256,
                 min_length: int = 0, task: str = "more_detailed"):
        super().__init__(device, num_beams, max_length, min_length)
        if task not in FLORENCE_TASKS:
            raise UserError(f"--task {task!r}: choose one of {', '.join(FLORENCE_TASKS)}")
        self.task = FLORENCE_TASKS[task]
        check_florence2()
        from transformers import AutoProcessor, Florence2ForConditionalGeneration
        self.processor = _load(self.label, folder, lambda: AutoProcessor.from_pretrained(folder))
        self.model = _load(self.label, folder, lambda: Florence2ForConditionalGeneration.from_pretrained(
            folder)).to(self.device, self.dtype).eval()

    def caption(self, images: Sequence[Image.Image]) -> list[list[str]]:
        import torch
        inputs = self.processor(text=[self.task] * len(images), images=list(images), return_tensors="pt",
                                padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, num_beams=self.num_beams, max_new_tokens=self.max_length,
                                      min_new_tokens=self.min_length, do_sample=False)
        # The caption tasks' answer is the decoded text without special tokens (what the processor's
        # post_process_generation does for "pure_text" tasks, without needing its parser configuration).
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [[" ".join(t.split())] if t.strip() else [] for t in texts]
