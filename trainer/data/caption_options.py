"""kohya's per-step caption options: prefix/suffix, shuffle with kept tokens, caption and tag dropout.

The rules are kohya sd-scripts' (``BaseDataset.process_caption``), restated so a kohya user's
settings mean the same here:

1. ``caption_prefix`` + ``" "`` + caption + ``" "`` + ``caption_suffix`` (a space, not a comma,
   as kohya joins them; so a prefix without a trailing comma becomes part of the first tag).
2. Whole-caption dropout: with probability ``caption_dropout_rate``, or on every epoch number
   (1-based, as kohya counts) divisible by ``caption_dropout_every_n_epochs``, the caption is
   ``""`` and nothing else happens.
3. Only when ``shuffle_caption`` or ``caption_tag_dropout_rate`` is on is the caption split into
   tags at ``caption_separator`` and re-joined with ``", "``:

   * with ``keep_tokens_separator`` present in the caption: the part before it is fixed, the part
     after it is shuffled, and a part after a second separator is a fixed suffix;
   * otherwise the first ``keep_tokens`` tags are fixed and the rest are shuffled.

   Fixed tags are never shuffled nor dropped; each other tag is dropped with probability
   ``caption_tag_dropout_rate`` after the shuffle.

One deliberate difference: kohya leaves ``keep_tokens_separator`` in the text when neither shuffle
nor tag dropout is on (the model would then learn the literal ``|||``); here it is always removed.

Our ``lora_trigger_word`` is joined in front of each caption as its first tag when the dataset is
read (``"trigger, caption"``), which is where kohya users write it by hand, so ``keep_tokens=1``
keeps it first and safe from tag dropout exactly as in kohya.

Randomness comes from one ``torch.Generator`` the run registers as resumable state (draw order per
caption: the dropout draw, then the shuffle permutation, then one draw per shuffled tag), so a
resumed run draws the very captions the uninterrupted run would have.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings, under kohya's names (which are also our settings' names)."""
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""

    @classmethod
    def from_settings(cls, s: Any) -> "CaptionOptions":
        """From a :class:`~trainer.settings.Settings` (or anything with these attributes)."""
        return cls(**{f.name: getattr(s, f.name) for f in fields(cls) if hasattr(s, f.name)})

    @property
    def per_step(self) -> bool:
        """Whether the text of a caption can differ from step to step in unboundedly many ways (shuffle,
        tag dropout): then its text-encoder output cannot be computed once and cached."""
        return bool(self.shuffle_caption or self.caption_tag_dropout_rate > 0)

    @property
    def drops_captions(self) -> bool:
        return self.caption_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0

    @property
    def active(self) -> bool:
        return self != CaptionOptions(caption_separator=self.caption_separator)

    def fixed_text(self, caption: str) -> str:
        """The caption with prefix and suffix (the part of the processing that never varies)."""
        if self.caption_prefix:
            caption = f"{self.caption_prefix} {caption}"
        if self.caption_suffix:
            caption = f"{caption} {self.caption_suffix}"
        return caption

    def cacheable_texts(self, caption: str) -> set[str]:
        """Every text ``caption`` can become when :attr:`per_step` is off (for the text-encoder cache)."""
        out = {self._without_separator(self.fixed_text(caption))}
        if self.drops_captions:
            out.add("")
        return out

    def _without_separator(self, text: str) -> str:
        if self.keep_tokens_separator and self.keep_tokens_separator in text:
            parts = [p.strip() for p in text.split(self.keep_tokens_separator)]
            text = ", ".join(p for p in parts if p)
        return text

    def split(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """(fixed, shuffled, fixed suffix) tags of ``caption`` (after prefix/suffix)."""
        sep, keep_sep = self.caption_separator, self.keep_tokens_separator

        def tags(text: str) -> list[str]:
            return [t.strip() for t in text.split(sep) if t.strip()]

        if keep_sep and keep_sep in caption:
            fixed, flex = caption.split(keep_sep, 1)
            suffix = ""
            if keep_sep in flex:
                flex, suffix = flex.split(keep_sep, 1)
            return tags(fixed), tags(flex), tags(suffix)
        all_tags = tags(caption)
        k = max(0, int(self.keep_tokens))
        return all_tags[:k], all_tags[k:], []

    def process(self, caption: str, generator: torch.Generator, epoch: int = 1) -> str:
        """The caption one training step sees (``epoch`` 1-based, for ``caption_dropout_every_n_epochs``)."""
        caption = self.fixed_text(caption)
        dropped = False
        if self.caption_dropout_rate > 0:
            dropped = float(torch.rand((), generator=generator)) < self.caption_dropout_rate
        n = self.caption_dropout_every_n_epochs
        if dropped or (n > 0 and epoch % n == 0):
            return ""
        if not self.per_step:
            return self._without_separator(caption)
        fixed, flex, suffix = self.split(caption)
        if self.shuffle_caption and len(flex) > 1:
            flex = [flex[i] for i in torch.randperm(len(flex), generator=generator).tolist()]
        if self.caption_tag_dropout_rate > 0 and flex:
            keep = torch.rand(len(flex), generator=generator) >= self.caption_tag_dropout_rate
            flex = [t for t, k in zip(flex, keep.tolist()) if k]
        return ", ".join(fixed + flex + suffix)

    def metadata(self) -> dict[str, Any]:
        """kohya's metadata keys for these options (values as kohya's ``str()`` writes them)."""
        return {"ss_shuffle_caption": bool(self.shuffle_caption), "ss_keep_tokens": int(self.keep_tokens),
                "ss_caption_dropout_rate": float(self.caption_dropout_rate),
                "ss_caption_dropout_every_n_epochs": int(self.caption_dropout_every_n_epochs),
                "ss_caption_tag_dropout_rate": float(self.caption_tag_dropout_rate)}


def describe(options: CaptionOptions, train_te: bool) -> Optional[str]:
    """The one log line saying why text-encoder outputs are not cached (None when they are, or the
    text encoder is trained and so runs every step anyway)."""
    if train_te or not options.per_step:
        return None
    why = [n for n, on in (("shuffle_caption", options.shuffle_caption),
                           ("caption_tag_dropout_rate", options.caption_tag_dropout_rate > 0)) if on]
    return (f"{' and '.join(why)} change the captions every step: text-encoder outputs are computed each "
            "step instead of cached")
