"""The settings schema: TrainTrain JSON compatibility, strict validation, round trips, presets."""
from __future__ import annotations

import copy
import json
import pickle

import pytest

from trainer import settings as S
from trainer.errors import UserError
from trainer.presets import PRESETS_DIR, list_presets, load_preset, save_preset
from trainer.settings import FIELDS, MODES, Settings, SettingsError, field, fields_for_mode

# TrainTrain's 59 configuration keys, in its order (research §1.3).
TT_CONFIG_KEYS = (
    "network_type", "network_rank", "network_alpha", "lora_data_directory", "diff_target_name",
    "lora_trigger_word", "image_size(height, width)", "train_iterations", "train_batch_size",
    "train_learning_rate", "train_optimizer", "train_optimizer_settings", "train_lr_scheduler",
    "train_lr_scheduler_settings", "save_lora_name", "use_gradient_checkpointing",
    "network_blocks(BASE = TextEncoder)", "network_resume", "network_strength", "network_conv_rank",
    "network_conv_alpha", "network_element", "network_train_text_encoder", "image_buckets_step",
    "image_num_multiply", "image_min_length", "image_max_ratio", "sub_image_num", "image_mirroring",
    "image_use_filename_as_tag", "image_disable_upscale", "train_fixed_timsteps_in_batch",
    "train_textencoder_learning_rate", "train_seed", "train_min_timesteps", "train_max_timesteps",
    "train_loss_function", "train_lr_step_rules", "train_lr_warmup_steps", "train_lr_scheduler_num_cycles",
    "train_lr_scheduler_power", "train_snr_gamma", "save_per_steps", "diff_alt_ratio",
    "diff_revert_original_target", "diff_use_diff_mask", "train_model_precision", "train_lora_precision",
    "save_precision", "train_VAE_precision", "diff_load_1st_pass", "diff_save_1st_pass", "diff_1st_pass_only",
    "logging_save_csv", "logging_verbose", "save_overwrite", "save_as_json", "model_v_pred",
    "use_2nd_pass_settings",
)
DROPPED = {"network_train_text_encoder", "te"}
BLOCKS_NO_IN00 = [b for b in S.BLOCKS_SD if b != "IN00"]


def traintrain_run() -> dict:
    """A Difference run file shaped exactly as TrainTrain's export_json writes it: text boxes and
    dropdowns as strings, checkboxes as bools (an untouched CSV checkbox as ""), the blocks as a
    list, a full copy of every field under "2nd pass", then mode/model/vae/te/prompts."""
    first = {
        "network_type": "c3lier", "network_rank": "32", "network_alpha": "16",
        "lora_data_directory": "", "diff_target_name": "", "lora_trigger_word": "mycat",
        "image_size(height, width)": "512,768", "train_iterations": "800", "train_batch_size": "4",
        "train_learning_rate": "2e-4", "train_optimizer": "adamw",
        "train_optimizer_settings": "weight_decay=0.05\nbetas=(0.9,0.99)",
        "train_lr_scheduler": "cosine_with_restarts", "train_lr_scheduler_settings": "",
        "save_lora_name": "cat_v1", "use_gradient_checkpointing": True,
        "network_blocks(BASE = TextEncoder)": BLOCKS_NO_IN00,
        "network_resume": "", "network_strength": "1.5", "network_conv_rank": "8", "network_conv_alpha": "4",
        "network_element": "CrossAttention", "network_train_text_encoder": False,
        "image_buckets_step": "64", "image_num_multiply": "2", "image_min_length": "256",
        "image_max_ratio": "2.5", "sub_image_num": "1", "image_mirroring": True,
        "image_use_filename_as_tag": False, "image_disable_upscale": True,
        "train_fixed_timsteps_in_batch": True, "train_textencoder_learning_rate": "5e-5", "train_seed": "1234",
        "train_min_timesteps": "100", "train_max_timesteps": "900", "train_loss_function": "Smooth-L1",
        "train_lr_step_rules": "", "train_lr_warmup_steps": "50", "train_lr_scheduler_num_cycles": "3",
        "train_lr_scheduler_power": "1.0", "train_snr_gamma": "5", "save_per_steps": "200",
        "diff_alt_ratio": "1", "diff_revert_original_target": False, "diff_use_diff_mask": True,
        "train_model_precision": "bf16", "train_lora_precision": "fp32", "save_precision": "fp16",
        "train_VAE_precision": "fp32", "diff_load_1st_pass": "", "diff_save_1st_pass": True,
        "diff_1st_pass_only": False, "logging_save_csv": "", "logging_verbose": False, "save_overwrite": False,
        "save_as_json": True, "model_v_pred": False, "use_2nd_pass_settings": False,   # the hidden dummy
    }
    # The visible 2nd-pass checkbox is exported inside the copy; save_lora_name/image_size there are
    # values of hidden widgets that TrainTrain ignores.
    second = {**first, "network_rank": "4", "network_alpha": "4", "train_learning_rate": "1e-4",
              "train_iterations": "300", "save_lora_name": "", "image_size(height, width)": "512",
              "use_2nd_pass_settings": True}
    return {**first, "2nd pass": second, "mode": "Difference", "model": "sd15.safetensors [abc123]",
            "vae": "None", "te": "", "original prompt": "", "target prompt": ""}


# ------------------------------------------------------------------ TrainTrain compatibility
def test_traintrain_run_file_has_every_key():
    d = traintrain_run()
    assert len(TT_CONFIG_KEYS) == 59 and set(TT_CONFIG_KEYS) <= set(d) and set(TT_CONFIG_KEYS) <= set(d["2nd pass"])
    for k in TT_CONFIG_KEYS:
        assert k in DROPPED or field(k), k


def test_traintrain_run_file_loads_with_meanings():
    s = Settings.from_dict(traintrain_run(), strict=True)
    assert s.warnings == ()
    assert s.mode == "Difference" and s.model_checkpoint == "sd15.safetensors [abc123]" and s.model_vae == ""
    assert s.image_size == (512, 768)                       # (height, width), not sorted
    assert s.network_blocks == tuple(BLOCKS_NO_IN00)
    assert s.train_optimizer == "AdamW" and s.train_learning_rate == 2e-4
    assert s.train_optimizer_settings == {"weight_decay": 0.05, "betas": (0.9, 0.99)}
    assert s.train_fixed_timesteps_in_batch is True and s.save_every_n_steps == 200
    assert s.train_textencoder_learning_rate == 5e-5 and s.logging_save_csv is False
    assert s.train_loss_function == "Smooth-L1" and s.network_alpha == 16.0 and s.train_VAE_precision == "fp32"
    assert s.use_2nd_pass_settings is True                  # from the checkbox inside "2nd pass"
    old_layout = {**traintrain_run(), "use_2nd_pass_settings": True}
    old_layout["2nd pass"] = {**old_layout["2nd pass"], "use_2nd_pass_settings": False}
    assert Settings.from_dict(old_layout).use_2nd_pass_settings is True
    assert Settings.from_dict({**traintrain_run(), "2nd pass": {"use_2nd_pass_settings": False}}
                              ).use_2nd_pass_settings is False
    # Only 2nd-pass fields that differ are kept; save_lora_name/image_size in the copy are ignored.
    assert s.second_pass == {"network_rank": 4, "network_alpha": 4.0, "train_iterations": 300,
                             "train_learning_rate": 1e-4}


@pytest.mark.parametrize("style", ["ours", "traintrain"])
def test_round_trip_lossless(style):
    s = Settings.from_dict(traintrain_run())
    d = s.to_dict(style)
    assert Settings.from_dict(d) == s
    assert Settings.from_dict(json.loads(json.dumps(d)), strict=True) == s
    assert Settings.from_dict(Settings().to_dict(style)) == Settings()


def test_traintrain_file_saved_back_keeps_its_keys_and_values():
    src = traintrain_run()
    out = json.loads(json.dumps(Settings.from_dict(src).to_dict("traintrain")))
    for key, value in src.items():
        if key in DROPPED or key == "use_2nd_pass_settings":   # the dummy: written as the real switch
            continue
        assert key in out, key
        if key == "2nd pass":
            for k2, v2 in value.items():
                if k2 not in DROPPED and field(k2).second_pass:
                    assert field(k2).validate(out[key][k2]) == field(k2).validate(v2), k2
            continue
        assert field(key).validate(out[key]) == field(key).validate(value), key
        assert type(out[key]) is type(value) or value == "", key    # same JSON shape (strings stay strings)


def test_traintrain_quirks():
    s = Settings.from_dict({"train_optimizer": "AdaFactor", "train_lr_scheduler": "cosine_annealing",
                            "train_lr_scheduler_settings": "eta_min=0.00001", "vae": "None",
                            "save_lora_name": "", "logging_save_csv": "", "image_num_multiply": ""})
    assert s.train_optimizer == "Adafactor" and s.train_lr_scheduler == "cosine_annealing"
    assert s.train_lr_scheduler_settings == {"eta_min": 1e-05}
    assert s.model_vae == "" and s.save_lora_name == "untitled" and s.logging_save_csv is False
    assert s.image_num_multiply is None
    assert Settings.from_dict({"train_optimizer": "DadaptAdam"}).train_optimizer == "DAdaptAdam"
    assert Settings.from_dict({"train_optimizer": "adamw"}).train_optimizer == "AdamW"
    assert Settings.from_dict({"network_train_text_encoder": True}).warnings   # ignored, but said so


def test_unknown_keys_warn_or_fail():
    s = Settings.from_dict({"train_learning_rat": "1e-4"})
    assert len(s.warnings) == 1 and "did you mean train_learning_rate" in s.warnings[0]
    with pytest.raises(SettingsError, match="^train_learning_rat: unknown setting"):
        Settings.from_dict({"train_learning_rat": "1e-4"}, strict=True)
    with pytest.raises(SettingsError, match="given twice"):
        Settings.from_dict({"image_size": "512", "image_size(height, width)": "768"})
    with pytest.raises(SettingsError, match="settings_version"):
        Settings.from_dict({"settings_version": S.SETTINGS_VERSION + 1})


# ------------------------------------------------------------------ second pass
def test_for_second_pass_changes_only_second_pass_fields():
    s = Settings.from_dict(traintrain_run())
    p2 = s.for_second_pass()
    changed = {k for k in s.values if s.values[k] != p2.values[k]}
    assert changed == set(s.second_pass)
    assert all(field(k).second_pass for k in changed)
    assert p2.network_rank == 4 and p2.train_learning_rate == 1e-4 and p2.save_lora_name == "cat_v1"
    off = s.with_overrides(use_2nd_pass_settings=False)
    assert off.for_second_pass().values == off.values


def test_second_pass_rejects_other_fields():
    with pytest.raises(SettingsError, match="^second_pass.save_lora_name: cannot differ"):
        Settings.from_dict({"mode": "Difference", "second_pass": {"save_lora_name": "x"}})
    with pytest.raises(SettingsError, match="^second_pass.image_size"):
        Settings().with_overrides(second_pass={"image_size": 768})
    with pytest.raises(SettingsError, match="^second_pass.network_rank"):
        Settings.from_dict({"second_pass": {"network_rank": 0}})


# ------------------------------------------------------------------ bad values
@pytest.mark.parametrize("key,value,name,needle", [
    ("train_learning_rate", "abc", "train_learning_rate", "not a number"),
    ("train_learning_rate", "nan", "train_learning_rate", "finite"),
    ("train_learning_rate", 0, "train_learning_rate", "> 0"),
    ("network_rank", -4, "network_rank", "out of range"),
    ("network_rank", "0", "network_rank", "out of range"),
    ("train_iterations", "2.5", "train_iterations", "whole number"),
    ("train_batch_size", True, "train_batch_size", "whole number"),
    ("train_optimizer", "Adamz", "train_optimizer", "AdamW, AdamW8bit, Lion, Prodigy, Adafactor"),
    ("train_optimizer", "PagedAdamW8bit", "train_optimizer", "use AdamW8bit"),
    ("train_lr_scheduler", "one_cycle", "train_lr_scheduler", "not supported"),
    ("train_model_precision", "int8", "train_model_precision", "not supported"),
    ("image_buckets_step", "0", "image_buckets_step", "out of range"),
    ("image_buckets_step", 100, "image_buckets_step", "multiple of 8"),
    ("save_lora_name", "../x", "save_lora_name", "plain file name"),
    ("save_lora_name", "a/b", "save_lora_name", "plain file name"),
    ("save_lora_name", "a\\b", "save_lora_name", "plain file name"),
    ("network_blocks(BASE = TextEncoder)", ["BASE", "IN99"], "network_blocks", "unknown block IN99"),
    ("network_blocks", "BASE,FOO", "network_blocks", "unknown block FOO"),
    ("mode", "Dreambooth", "mode", "LoRA, iLECO, Difference, ADDifT, Multi-ADDifT"),
    ("image_size", "500", "image_size", "multiples of 8"),
    ("image_size", "512,768,1024", "image_size", "HEIGHT,WIDTH"),
    ("train_optimizer_settings", "weight_decay", "train_optimizer_settings", "key=value"),
    ("train_lr_step_rules", "1:100,x", "train_lr_step_rules", "cannot read"),
    ("image_alpha_background", "purple", "image_alpha_background", "#rrggbb"),
    ("save_overwrite", "maybe", "save_overwrite", "true or false"),
])
def test_bad_values_name_the_field(key, value, name, needle):
    with pytest.raises(SettingsError) as e:
        Settings.from_dict({key: value})
    msg = str(e.value)
    assert msg.startswith(name + ": ") and needle in msg and "\n" not in msg
    assert e.value.field == name and isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def _ready(mode: str, tmp_path) -> Settings:
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    return Settings().with_overrides(mode=mode, lora_data_directory=str(tmp_path), diff_target_name="_b",
                                     original_prompt="red", original_image=str(img), target_image=str(img))


@pytest.mark.parametrize("mode", MODES)
def test_run_checks_pass_when_ready(mode, tmp_path):
    _ready(mode, tmp_path).validate_for_run()


@pytest.mark.parametrize("overrides,name", [
    ({"train_min_timesteps": 500, "train_max_timesteps": 500}, "train_min_timesteps"),
    ({"train_lr_scheduler": "piecewise_constant"}, "train_lr_step_rules"),
    ({"train_lr_warmup_steps": 1000}, "train_lr_warmup_steps"),
    ({"network_blocks": "BASE"}, "network_blocks"),
    ({"sample_every_n_steps": 100}, "sample_prompts"),
    ({"lora_data_directory": ""}, "lora_data_directory"),
    ({"lora_data_directory": "/no/such/folder"}, "lora_data_directory"),
    ({"mode": "iLECO", "original_prompt": " "}, "original_prompt"),
    ({"mode": "ADDifT", "target_image": ""}, "target_image"),
    ({"mode": "Multi-ADDifT", "diff_target_name": ""}, "diff_target_name"),
    ({"mode": "Difference", "diff_1st_pass_only": True, "diff_load_1st_pass": "copier"}, "diff_1st_pass_only"),
    ({"mode": "Difference", "use_2nd_pass_settings": True,
      "second_pass": {"train_min_timesteps": 900, "train_max_timesteps": 100}}, "second_pass.train_min_timesteps"),
])
def test_run_checks_name_the_field(overrides, name, tmp_path):
    s = _ready("LoRA", tmp_path).with_overrides(**overrides)
    with pytest.raises(SettingsError) as e:
        s.validate_for_run()
    assert e.value.field == name and str(e.value).startswith(name + ": ")


# ------------------------------------------------------------------ parsing
def test_set_args():
    s = Settings().apply_set_args(["train_learning_rate=2e-4", "network_blocks=BASE,IN01", "image_size=768,512",
                                   "save_overwrite=true", "save_per_steps=100", "train_textencoder_learning_rate=",
                                   "second_pass.network_rank=4", "2nd pass.train_learning_rate=1e-5"])
    assert s.train_learning_rate == 2e-4 and s.network_blocks == ("BASE", "IN01")
    assert s.image_size == (768, 512) and s.save_overwrite is True and s.save_every_n_steps == 100
    assert s.train_textencoder_learning_rate is None
    assert s.second_pass == {"network_rank": 4, "train_learning_rate": 1e-5}
    with pytest.raises(SettingsError, match="did you mean train_iterations"):
        s.apply_set_args(["train_iteration=10"])
    with pytest.raises(SettingsError, match="^--set: "):
        s.apply_set_args(["train_iterations"])
    with pytest.raises(SettingsError, match="^second_pass.save_lora_name"):
        s.apply_set_args(["second_pass.save_lora_name=x"])


@pytest.mark.parametrize("raw,hw", [("512", (512, 512)), ("512,768", (512, 768)), ("512x768", (512, 768)),
                                    ("512 x 768", (512, 768)), ([512, 768], (512, 768)), (512, (512, 512)),
                                    (["768", "512"], (768, 512))])
def test_image_size_forms(raw, hw):
    assert field("image_size").validate(raw) == hw


def test_kwargs_and_lines():
    f = field("train_optimizer_settings")
    v = f.validate("betas=(0.9, 0.99); eps=1e-8\nname=foo\n d_coef = 'a;b'")
    assert v == {"betas": (0.9, 0.99), "eps": 1e-8, "name": "foo", "d_coef": "a;b"}
    assert f.validate(f.format(v)) == v and f.validate({"betas": [0.9, 0.99]}) == {"betas": (0.9, 0.99)}
    assert field("sample_prompts").validate("a cat\n\n a dog ") == ("a cat", "a dog")


def test_choices_case_insensitive():
    assert field("mode").validate("multi-addift") == "Multi-ADDifT" and field("mode").validate("ileco") == "iLECO"
    assert field("train_optimizer").validate("adamw_schedulefree") == "AdamWScheduleFree"
    assert field("train_model_precision").validate("bfloat16") == "bf16"
    assert field("network_type").validate("LoCon") == "c3lier"
    assert field("network_blocks").validate("out11 base") == ("BASE", "OUT11")


# ------------------------------------------------------------------ schema integrity
def test_schema_integrity():
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names))
    keys = [k for f in FIELDS for k in f.keys]
    assert len(keys) == len(set(keys)) and not set(keys) & set(S.IGNORED_KEYS)
    for f in FIELDS:
        assert f.validate(f.default) == f.default, f.name
        assert f.validate(f.format(f.default)) == f.default, f.name
        assert f.help.strip().endswith(".") and len(f.help) > 20, f.name
        assert f.modes and set(f.modes) <= set(MODES), f.name
        assert f.group in S.GROUPS, f.name
        assert not f.second_pass or "Difference" in f.modes, f.name
        assert not hasattr(Settings, f.name), f.name     # attribute access never shadowed by a method
        if f.kind in ("choice", "blocks"):
            assert f.choices, f.name
    assert {f.name for f in S.second_pass_fields()} >= {
        "network_type", "network_rank", "network_alpha", "train_optimizer", "train_lr_scheduler",
        "train_iterations", "train_batch_size", "train_learning_rate", "train_min_timesteps",
        "train_max_timesteps", "train_loss_function", "train_model_precision", "train_seed"}


def test_fields_for_mode():
    lora = {f.name for f in fields_for_mode("LoRA")}
    ileco = {f.name for f in fields_for_mode("ileco")}
    assert "lora_data_directory" in lora and "original_prompt" not in lora
    assert "original_prompt" in ileco and "image_buckets_step" not in ileco
    assert "use_2nd_pass_settings" in {f.name for f in fields_for_mode("Difference")}


def test_copy_pickle_and_immutability():
    s = Settings.from_dict(traintrain_run())
    assert copy.deepcopy(s) == s and pickle.loads(pickle.dumps(s)) == s
    with pytest.raises(AttributeError):
        s.network_rank = 3
    assert s.with_overrides(network_rank=8).network_rank == 8 and s.network_rank == 32


# ------------------------------------------------------------------ files and presets
def test_json_files(tmp_path):
    s = Settings.from_dict(traintrain_run())
    for style in ("ours", "traintrain"):
        p = s.to_json(tmp_path / "sub" / f"{style}.json", aliases=style)
        assert Settings.from_json(p) == s
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == ["ours.json", "traintrain.json"]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        Settings.from_json(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        Settings.from_json(tmp_path / "missing.json")


PRESET_VALUES = {
    "LoRA": dict(mode="LoRA", network_type="lierla", network_rank=16, network_alpha=8.0, train_iterations=1000,
                 train_batch_size=2, train_learning_rate=1e-4, train_optimizer="AdamW", train_lr_scheduler="cosine",
                 train_snr_gamma=5.0, train_min_timesteps=0, train_max_timesteps=1000),
    "iLECO": dict(mode="iLECO", network_rank=4, network_alpha=8.0, train_iterations=300, train_batch_size=2,
                  train_learning_rate=5e-4, train_optimizer="AdamW", train_lr_scheduler="cosine", train_snr_gamma=5.0),
    "iLECO_Erase": dict(mode="iLECO", network_rank=4, network_alpha=8.0, train_iterations=300, train_learning_rate=5e-4,
                        network_element="CrossAttention", target_guidance=1.0, preserve_unconditional=True,
                        train_min_timesteps=500),
    "Difference": dict(mode="Difference", network_rank=16, network_alpha=16.0, train_iterations=500,
                       train_batch_size=2, train_learning_rate=5e-4, train_optimizer="AdamW",
                       train_lr_scheduler="cosine", use_2nd_pass_settings=False),
    "Difference_Use2ndPass": dict(mode="Difference", network_rank=16, network_alpha=16.0, train_iterations=500,
                                  train_batch_size=2, train_learning_rate=5e-4, use_2nd_pass_settings=True),
    "ADDifT_Action": dict(mode="ADDifT", network_type="lierla", network_rank=4, network_alpha=1.0,
                          train_iterations=30, train_batch_size=1, train_learning_rate=1e-4, train_optimizer="CAME",
                          train_lr_scheduler="cosine_annealing", train_lr_scheduler_settings={"eta_min": 1e-5},
                          train_min_timesteps=500, train_max_timesteps=1000, train_seed=1, network_strength=1.0,
                          save_as_json=True, diff_revert_original_target=False),
    "ADDifT_Style": dict(mode="ADDifT", network_rank=4, network_alpha=1.0, train_iterations=50, train_batch_size=1,
                         train_learning_rate=5e-5, train_optimizer="CAME", train_lr_scheduler="cosine_annealing",
                         train_min_timesteps=200, train_max_timesteps=400, network_strength=5.0,
                         diff_revert_original_target=True, save_as_json=True),
}


@pytest.mark.parametrize("name", sorted(PRESET_VALUES))
def test_shipped_presets(name, tmp_path):
    assert name in list_presets()
    raw = json.loads((PRESETS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    assert "image_size(height, width)" in raw and "network_blocks(BASE = TextEncoder)" in raw  # TrainTrain keys
    s = load_preset(name)
    assert s.warnings == ()
    for k, v in PRESET_VALUES[name].items():
        assert getattr(s, k) == v, k
    assert s.train_model_precision == "auto" and s.save_precision == "fp16"
    if name == "Difference_Use2ndPass":
        p2 = s.for_second_pass()
        assert (p2.network_rank, p2.network_alpha, p2.train_learning_rate, p2.train_iterations) == (4, 4.0, 1e-4, 500)
    ready = _ready(s.mode, tmp_path)
    s.with_overrides(**{k: getattr(ready, k) for k in ("lora_data_directory", "diff_target_name", "original_prompt",
                                                      "original_image", "target_image")}).validate_for_run()


def test_save_and_load_preset(tmp_path):
    s = Settings().with_overrides(network_rank=8)
    p = save_preset(s, "mine", tmp_path)
    assert p == tmp_path / "mine.json" and list_presets(tmp_path) == ["mine"]
    assert load_preset("mine", tmp_path) == s and load_preset(str(p)) == s
    for bad in ("../evil", "a/b", "", "a\\b"):
        with pytest.raises(SettingsError, match="^preset name: "):
            save_preset(s, bad, tmp_path)
    with pytest.raises(UserError, match="available: mine"):
        load_preset("nope", tmp_path)


# ---------------------------------------------------------------------- advice (warnings, not errors)
def test_adaptive_optimizers_at_an_ordinary_lr_are_warned_like_kohya():
    """Prodigy/DAdaptAdam use the LR as a multiplier on their own estimate: at 1e-4 nothing is learnt.
    Each too-low rate is one line naming the field and the fix; 1 (or AdamW at 1e-4) is quiet."""
    s = Settings({"mode": "LoRA", "train_optimizer": "Prodigy", "train_learning_rate": 1e-4,
                  "train_textencoder_learning_rate": 5e-5})
    assert s.advice() == [
        "train_learning_rate: 0.0001 is too low for Prodigy, which sets its own step size and uses the "
        "learning rate as a multiplier on it; set train_learning_rate=1 (kohya's advice)",
        "train_textencoder_learning_rate: 5e-05 is too low for Prodigy, which sets its own step size and uses "
        "the learning rate as a multiplier on it; set train_textencoder_learning_rate=1 (kohya's advice)"]
    assert Settings({"train_optimizer": "DAdaptAdam", "train_learning_rate": 0.1}).advice()[0].startswith(
        "train_learning_rate: 0.1 is too low for DAdaptAdam")
    assert Settings({"train_optimizer": "DAdaptAdam", "train_learning_rate": 1}).advice() == []
    assert Settings({"train_optimizer": "AdamW", "train_learning_rate": 1e-4}).advice() == []
    # the text-encoder rate matters only when the text encoder is trained
    no_te = s.with_overrides(network_blocks=("IN01",), train_learning_rate=1.0)
    assert no_te.advice() == []
    # Difference: the 2nd pass may switch to Prodigy on its own
    d = Settings({"mode": "Difference", "use_2nd_pass_settings": True}, second_pass={"train_optimizer": "Prodigy"})
    assert [a.split(": ")[0] for a in d.advice()] == ["second_pass.train_learning_rate"]
