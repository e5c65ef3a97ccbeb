"""kohya's caption options: kept tags stay put, dropout rates hold, draws are seeded and resumable."""
import itertools

import pytest
import torch

from trainer.data.caption_options import CaptionOptions, describe
from trainer.settings import Settings, SettingsError

TAGS = ["zkz", "circle", "red", "large", "white background"]
CAPTION = ", ".join(TAGS)


def _draws(options, caption=CAPTION, n=2000, seed=0, epoch=1):
    g = torch.Generator().manual_seed(seed)
    return [options.process(caption, g, epoch) for _ in range(n)]


def test_shuffle_keeps_the_first_keep_tokens_tags_and_permutes_the_rest():
    for keep in (0, 1, 2):
        out = _draws(CaptionOptions(shuffle_caption=True, keep_tokens=keep), n=2000)
        orders = {tuple(c.split(", ")) for c in out}
        for o in orders:
            assert list(o[:keep]) == TAGS[:keep] and sorted(o[keep:]) == sorted(TAGS[keep:])
        # every order of the free tags appears (4!/3!/... of them), so the shuffle is real
        assert len(orders) == len(list(itertools.permutations(TAGS[keep:]))), keep


def test_keep_tokens_separator_fixes_the_head_and_a_fixed_ending():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=4, keep_tokens_separator="|||")
    out = _draws(opts, "zkz, circle ||| red, large, small, blue ||| masterpiece, best", n=400)
    seen = set()
    for c in out:
        tags = c.split(", ")
        assert tags[:2] == ["zkz", "circle"] and tags[-2:] == ["masterpiece", "best"]   # the separator wins
        assert sorted(tags[2:-2]) == ["blue", "large", "red", "small"] and "|||" not in c
        seen.add(tuple(tags[2:-2]))
    assert len(seen) == 24
    # without shuffle or tag dropout the text stays as written, only the separator goes
    plain = CaptionOptions(keep_tokens_separator="|||")
    assert plain.process("zkz ||| red, large", torch.Generator()) == "zkz, red, large"


def test_caption_dropout_rate_holds_statistically():
    out = _draws(CaptionOptions(caption_dropout_rate=0.3), n=4000)
    rate = sum(c == "" for c in out) / len(out)
    assert abs(rate - 0.3) < 0.03, rate        # 4 sigma of a binomial(4000, 0.3)
    assert all(c in ("", CAPTION) for c in out)


def test_tag_dropout_rate_holds_and_never_drops_kept_tags():
    out = _draws(CaptionOptions(caption_tag_dropout_rate=0.25, keep_tokens=1), n=3000)
    free = len(TAGS) - 1
    kept = sum(len(c.split(", ")) - 1 for c in out)
    rate = 1 - kept / (free * len(out))
    assert abs(rate - 0.25) < 0.02, rate       # > 4 sigma over 12000 tags
    assert all(c.split(", ")[0] == "zkz" for c in out)
    # without shuffle the surviving tags keep their order
    for c in out[:200]:
        rest = c.split(", ")[1:]
        assert rest == [t for t in TAGS[1:] if t in rest]


def test_dropout_every_n_epochs_prefix_and_suffix():
    opts = CaptionOptions(caption_dropout_every_n_epochs=2, caption_prefix="photo of", caption_suffix="4k")
    g = torch.Generator()
    assert [opts.process("zkz, red", g, e) for e in (1, 2, 3, 4)] == ["photo of zkz, red 4k", "", "photo of zkz, red 4k", ""]


def test_draws_are_seeded_and_resume_from_the_generator_state():
    opts = CaptionOptions(shuffle_caption=True, caption_dropout_rate=0.2, caption_tag_dropout_rate=0.2, keep_tokens=1)
    assert _draws(opts, n=50, seed=5) == _draws(opts, n=50, seed=5) != _draws(opts, n=50, seed=6)
    g = torch.Generator().manual_seed(5)
    first = [opts.process(CAPTION, g) for _ in range(20)]
    state = g.get_state()
    h = torch.Generator().manual_seed(123)
    h.set_state(state)
    assert first + [opts.process(CAPTION, h) for _ in range(30)] == _draws(opts, n=50, seed=5)


def test_text_encoder_cache_is_off_exactly_for_per_step_changes():
    cached = [CaptionOptions(), CaptionOptions(caption_dropout_rate=0.5), CaptionOptions(caption_prefix="a"),
              CaptionOptions(caption_dropout_every_n_epochs=3), CaptionOptions(keep_tokens=2),
              CaptionOptions(keep_tokens_separator="|||")]
    per_step = [CaptionOptions(shuffle_caption=True), CaptionOptions(caption_tag_dropout_rate=0.1)]
    assert not any(o.per_step for o in cached) and all(o.per_step for o in per_step)
    for o in cached:   # every text such options can produce is in the cache's set
        texts = o.cacheable_texts("zkz ||| red, large")
        assert set(_draws(o, "zkz ||| red, large", n=200, epoch=3)) <= texts
    assert describe(per_step[0], train_te=False) and "shuffle_caption" in describe(per_step[0], False)
    assert describe(per_step[0], train_te=True) is None and describe(cached[1], False) is None


def test_settings_fields_validate_and_metadata_is_kohyas():
    s = Settings.from_dict({"shuffle_caption": "true", "keep_tokens": "1", "caption_dropout_rate": "0.1",
                            "caption_tag_dropout_rate": 0.05, "caption_dropout_every_n_epochs": 0})
    opts = CaptionOptions.from_settings(s)
    assert opts.shuffle_caption and opts.keep_tokens == 1
    assert {k: str(v) for k, v in opts.metadata().items()} == {
        "ss_shuffle_caption": "True", "ss_keep_tokens": "1", "ss_caption_dropout_rate": "0.1",
        "ss_caption_dropout_every_n_epochs": "0", "ss_caption_tag_dropout_rate": "0.05"}
    for bad in ({"caption_dropout_rate": 1.5}, {"keep_tokens": -1}, {"caption_separator": ""}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            Settings.from_dict(bad)
    s = Settings.from_dict({"lora_trigger_word": "zkz", "shuffle_caption": True})
    assert any(a.startswith("keep_tokens:") for a in s.advice())
    assert not any(a.startswith("keep_tokens:") for a in s.with_overrides(keep_tokens=1).advice())
