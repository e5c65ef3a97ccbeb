"""The embedded tiny model in the WebUI: listed in its checkpoint dropdown and loadable there with no edit.

A1111 1.10 builds a checkpoint from the ``NAME.yaml`` beside it: ldm's FrozenCLIPEmbedder does
``CLIPTokenizer.from_pretrained(version)`` and ``CLIPTextModel.from_pretrained(version)`` with the
YAML's ``version``, from the WebUI's working folder, then loads the checkpoint's weights over it.
That is done here in a fresh interpreter started in another folder, under this environment's
transformers and under 4.30.2, the WebUI's (``.venv-tf430``, made by ``python install.py --test``).
"""
import importlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from test_webui_script import PACKAGE, _load, webui  # noqa: F401 - webui is the fixture
from trainer.models.loader import DEFAULT_MODEL, load_model

ROOT = Path(__file__).resolve().parents[1]
TF430 = ROOT / ".venv-tf430" / "bin" / "python"
PROMPT = "a small blue triangle on a white background"

LDM_TEXT_ENCODER = r'''
import sys, yaml, torch
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer
checkpoint, out = sys.argv[1], sys.argv[2]
config = yaml.safe_load(open(checkpoint.rsplit(".", 1)[0] + ".yaml"))      # the YAML beside the checkpoint
cond = config["model"]["params"]["cond_stage_config"]
assert cond["target"] == "ldm.modules.encoders.modules.FrozenCLIPEmbedder", cond
version = cond["params"]["version"]
tokenizer = CLIPTokenizer.from_pretrained(version)                       # FrozenCLIPEmbedder.__init__
transformer = CLIPTextModel.from_pretrained(version).float().eval()     # (5.x keeps the file's fp16)
folder = transformer.state_dict()
prefix = "cond_stage_model.transformer."                                 # 5.x names it without text_model.
prefix += "" if any(k.startswith("text_model.") for k in folder) else "text_model."
own = {k[len(prefix):]: v.float() for k, v in load_file(checkpoint).items() if k.startswith(prefix)}
drift = max((folder[k].float() - v).abs().max().item() for k, v in own.items())
missing, unexpected = transformer.load_state_dict(own, strict=False)     # A1111's load_model_weights
assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
ids = tokenizer([sys.argv[3]], truncation=True, max_length=77, padding="max_length", return_tensors="pt").input_ids
with torch.no_grad():
    hidden = transformer(input_ids=ids).last_hidden_state[0]
torch.save({"drift": drift, "ids": ids[0], "hidden": hidden}, out)
'''


def _webui_start(mods, tmp_path):
    """Load the script and run its before-UI callback, as the WebUI does before building the dropdowns."""
    script = _load(mods, tmp_path)
    for callback in mods["modules.script_callbacks"].callbacks["before_ui"]:
        callback()
    return script


def _listed(mods) -> list:
    return [Path(i.filename) for i in mods["modules.sd_models"].checkpoints_list.values()
            if Path(i.filename).name == "shinkansen-tiny-sd.safetensors"]


def _text_encoder_as_ldm_builds_it(python: Path, checkpoint: Path, tmp_path: Path) -> dict:
    cwd = tmp_path / "webui-working-folder"
    cwd.mkdir(exist_ok=True)
    out = tmp_path / f"te-{python.parent.parent.name}.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", LDM_TEXT_ENCODER, str(checkpoint), str(out), PROMPT], cwd=cwd,
                          env=dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def test_the_webui_lists_the_embedded_model_and_ldm_loads_its_text_encoder(webui, tmp_path):
    mods, root = webui
    _webui_start(mods, root)
    listed = _listed(mods)
    model_dir = Path(mods["modules.sd_models"].model_path)
    assert listed == [model_dir / "shinkansen-tiny-sd.safetensors"]
    checkpoint = listed[0]

    ours = load_model(checkpoint, device="cpu")       # our loader reads the WebUI's copy too (absolute version)
    tokens = ours.tokenizer
    assert TF430.is_file(), "missing .venv-tf430: run `python install.py --test` first"
    for python in (Path(sys.executable), TF430):
        got = _text_encoder_as_ldm_builds_it(python, checkpoint, tmp_path)
        assert got["drift"] == 0.0, "text_encoder/model.safetensors is not the checkpoint's text model"
        expected = [tokens.bos_id] + tokens.encode(PROMPT) + [tokens.eos_id]
        assert got["ids"][:len(expected)].tolist() == expected
        with torch.no_grad():
            context = ours.encode_prompts([PROMPT])["context"][0]
        assert torch.allclose(got["hidden"], context.float(), atol=1e-4), python


def test_the_embedded_model_files_are_ours_alone_and_kept_fresh(webui, tmp_path, caplog):
    mods, root = webui
    model_dir = Path(mods["modules.sd_models"].model_path)
    checkpoint, config = model_dir / "shinkansen-tiny-sd.safetensors", model_dir / "shinkansen-tiny-sd.yaml"

    model_dir.mkdir(parents=True)
    config.write_text("my own notes\n")                                   # a user's file: never touched
    with caplog.at_level(logging.WARNING):
        _webui_start(mods, root)
    assert config.read_text() == "my own notes\n" and not checkpoint.exists() and not _listed(mods)
    assert "shinkansen-tiny-sd.yaml is not ours" in caplog.text

    config.unlink()
    mods["modules.shared"].opts.data["shinkansen_offer_tiny_model"] = False      # Settings > Shinkansen: off
    _webui_start(mods, root)
    assert not checkpoint.exists() and not config.exists() and not _listed(mods)

    embedded = importlib.import_module(PACKAGE + ".webui.embedded")
    assert embedded.offer_embedded_model(model_dir) == checkpoint
    first = (config.read_text(), os.lstat(checkpoint).st_mtime_ns, os.lstat(config).st_mtime_ns)
    assert embedded.offer_embedded_model(model_dir) == checkpoint         # the next start changes nothing
    assert (config.read_text(), os.lstat(checkpoint).st_mtime_ns, os.lstat(config).st_mtime_ns) == first

    before = tmp_path / "before" / "tiny-sd"                  # the extension where it was installed first ...
    shutil.copytree(DEFAULT_MODEL.parent, before)
    assert embedded.offer_embedded_model(model_dir, before / "tiny-sd.safetensors") == checkpoint
    after = tmp_path / "after" / "tiny-sd"                    # ... then moved: the link dangles, the YAML is stale
    after.parent.mkdir()
    shutil.move(before, after)
    assert not checkpoint.exists()
    assert embedded.offer_embedded_model(model_dir, after / "tiny-sd.safetensors") == checkpoint
    assert checkpoint.resolve() == (after / "tiny-sd.safetensors").resolve()
    assert yaml.safe_load(config.read_text())["model"]["params"]["cond_stage_config"]["params"]["version"] == \
        str((after / "text_encoder").resolve())
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([checkpoint.name, config.name])   # no leftovers


def test_a_copy_where_links_are_refused(webui, monkeypatch):
    """Windows without developer mode: no symbolic or hard links, so the checkpoint is copied."""
    mods, root = webui
    _load(mods, root)
    embedded = importlib.import_module(PACKAGE + ".webui.embedded")

    def refused(*a, **kw):
        raise OSError("links not permitted")
    monkeypatch.setattr(embedded.os, "symlink", refused)
    monkeypatch.setattr(embedded.os, "link", refused)
    model_dir = Path(mods["modules.sd_models"].model_path)
    checkpoint = embedded.offer_embedded_model(model_dir)
    assert not checkpoint.is_symlink() and checkpoint.read_bytes() == DEFAULT_MODEL.read_bytes()
    assert os.stat(checkpoint).st_ino != os.stat(DEFAULT_MODEL).st_ino
    mtime = os.stat(checkpoint).st_mtime_ns
    assert embedded.offer_embedded_model(model_dir) == checkpoint and os.stat(checkpoint).st_mtime_ns == mtime


def test_written_model_files_carry_a_loadable_text_encoder(tmp_path):
    """What ``pretrain-tiny`` writes: a text_encoder/ that from_pretrained loads, holding the checkpoint's weights."""
    from transformers import CLIPTextModel
    from trainer.models.loader import random_tiny_bundle
    from trainer.models.tiny import write_model_files
    bundle = random_tiny_bundle(seed=3, device="cpu")
    write_model_files(bundle, tmp_path / "tiny", "tiny", dtype=torch.float32)
    loaded = CLIPTextModel.from_pretrained(str(tmp_path / "tiny" / "text_encoder")).float().state_dict()
    ours = bundle.checkpoint_state_dict()
    prefix = "cond_stage_model.transformer."
    prefix += "" if any(k.startswith("text_model.") for k in loaded) else "text_model."
    assert {k[len(prefix):] for k in ours if k.startswith(prefix)} <= set(loaded)
    assert all(torch.equal(loaded[k[len(prefix):]], v) for k, v in ours.items() if k.startswith(prefix))
