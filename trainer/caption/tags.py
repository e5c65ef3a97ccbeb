"""Caption text rules shared by every captioner: what ends up in ``NAME.txt`` and in which order.

Why one module: the taggers (WD14, DeepBooru) produce tags and the captioners (BLIP, Florence-2,
the WebUI's CLIP interrogator) produce sentences, but the user's wishes are the same for all of
them: the trigger word first, unwanted tags gone, an existing caption kept, replaced or extended
without repeating what it already says. Captions are comma-separated, as kohya's tools and our
trainer's ``shuffle_caption`` read them.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

SEPARATOR = ", "
MODES = ("keep", "overwrite", "append")   # what happens to an existing caption file


def split_tags(text: str) -> list[str]:
    """``"a, b,,c "`` → ``["a", "b", "c"]`` (newlines count as separators: multi-line caption files)."""
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def parse_tag_list(value: "str | Iterable[str] | None") -> list[str]:
    """``--exclude``/form input: a comma-separated string or a list of tags."""
    if not value:
        return []
    if isinstance(value, str):
        return split_tags(value)
    return [t for v in value for t in split_tags(str(v))]


def underscores_to_spaces(tag: str) -> str:
    """``long_hair`` → ``long hair``; tags of three characters or fewer are kept as they are, since
    they are kaomoji (``^_^``, ``o_o``, ``>_<``) whose underscore is the mouth (kohya's rule)."""
    return tag.replace("_", " ") if len(tag) > 3 else tag


def tag_key(tag: str) -> str:
    """How two spellings of one tag compare: case, underscores/spaces and padding do not matter."""
    return underscores_to_spaces(tag.strip()).lower()


def remove_excluded(tags: Sequence[str], exclude: Iterable[str]) -> list[str]:
    """Drop every tag named in ``exclude`` (``no_humans`` and ``no humans`` name the same tag)."""
    unwanted = {tag_key(t) for t in exclude}
    return [t for t in tags if tag_key(t) not in unwanted]


def dedupe(tags: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for t in tags:
        if tag_key(t) not in seen:
            seen.add(tag_key(t))
            out.append(t)
    return out


def trigger_first(tags: Sequence[str], trigger: str) -> list[str]:
    """The trigger word as the first tag, once (kohya users keep it in place with ``keep_tokens 1``)."""
    trigger = trigger.strip()
    if not trigger:
        return list(tags)
    return [trigger] + [t for t in tags if tag_key(t) != tag_key(trigger)]


def compose(new: Sequence[str], existing: Optional[str], mode: str = "keep", trigger: str = "",
            exclude: Iterable[str] = ()) -> Optional[str]:
    """The caption file's new text, or ``None`` when the existing caption is kept as it is.

    ``new`` is what the captioner said (tags, or one sentence); exclusions apply to it only, never to
    text the user wrote. ``append`` adds after the existing caption only what it does not already
    say: a tag it does not hold, a sentence (a piece with commas inside) it does not contain.
    """
    if mode not in MODES:
        raise ValueError(f"caption mode must be one of {MODES}, got {mode!r}")
    new = dedupe(remove_excluded([t.strip() for t in new if t and t.strip()], exclude))
    if existing is not None and mode == "keep":
        return None
    if existing is not None and mode == "append":
        old = split_tags(existing)
        have = {tag_key(t) for t in old}
        flat = " ".join(existing.split())
        added = [t for t in new if tag_key(t) not in have and not ("," in t and " ".join(t.split()) in flat)]
        tags = old + added
    else:
        tags = new
    return SEPARATOR.join(trigger_first(tags, trigger))
