"""One bench case and the settings it means for each tool, defined once so both tools get the same."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

CASES = ("tiny", "sd15", "sdxl")
#: Each case's resolution when none is given (tiny: the embedded model's 64 px world).
DEFAULT_RESOLUTION = {"tiny": 64, "sd15": 512, "sdxl": 1024}


@dataclass
class Case:
    name: str                               # tiny | sd15 | sdxl
    resolution: int
    batch: int = 1
    rank: int = 16
    alpha: float = 16.0
    steps: int = 12
    warmup: int = 2                         # steps 1..warmup are left out of the median
    train_text_encoder: bool = True
    blocks: Optional[tuple] = None          # UNet blocks; None = all of the family's
    precision: str = "auto"                 # auto | fp32 | bf16 | fp16 (the frozen model's)
    learning_rate: float = 1e-4
    grad_clip: float = 1.0                  # kohya's default max_grad_norm; ours is set the same
    images: int = 8
    extra: dict = field(default_factory=dict)   # more of our settings (name=value), ours only

    @property
    def label(self) -> str:
        parts = [self.name, f"{self.resolution}²", f"b{self.batch}", "UNet+TE" if self.train_text_encoder else "UNet"]
        if self.blocks:
            parts.append(f"{len(self.blocks)} blocks")
        return " ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks) if self.blocks else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        d = dict(d)
        d["blocks"] = tuple(d["blocks"]) if d.get("blocks") else None
        return cls(**d)


def network_blocks(case: Case) -> list[str]:
    from ..settings import BLOCKS_SD, BLOCKS_SDXL
    unet = list(case.blocks) if case.blocks else [b for b in (BLOCKS_SDXL if case.name == "sdxl" else BLOCKS_SD)
                                                  if b != "BASE"]
    return (["BASE"] if case.train_text_encoder else []) + unet


def our_settings(case: Case, data_dir: str, checkpoint: Optional[str], output_name: str) -> dict:
    """Our settings for ``case``: what kohya's command line (kohya.command) says, in our names."""
    d = {"mode": "LoRA", "lora_data_directory": data_dir, "image_size": str(case.resolution),
         "image_buckets_step": 64, "image_min_length": 64, "train_iterations": case.steps,
         "train_batch_size": case.batch, "train_learning_rate": case.learning_rate, "train_optimizer": "AdamW",
         "train_lr_scheduler": "constant", "network_rank": case.rank, "network_alpha": case.alpha,
         "network_blocks": ",".join(network_blocks(case)), "gradient_clip_norm": case.grad_clip,
         "use_gradient_checkpointing": False, "train_seed": 1, "save_lora_name": output_name,
         "train_model_precision": case.precision, "train_VAE_precision": case.precision,
         "logging_save_csv": False}
    if checkpoint:
        d["model_checkpoint"] = checkpoint
    d.update(case.extra)
    return d
