"""The tab's form without a browser: schema-built widgets, settings round trips, mode visibility, CLI queue/plot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.world import toy
from trainer.cli import main as cli
from trainer.app.host import Host
from trainer.app.jobs import JobQueue
from trainer.presets import PRESETS_DIR, list_presets, load_preset
from trainer.settings import FIELDS, Settings, second_pass_fields

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    from trainer.app.ui import Form, build_tab
    root = tmp_path_factory.mktemp("ext")
    host = Host(root=root, lora_dir=root / "output")
    queue = JobQueue(host)                      # not started: building the tab runs nothing
    blocks = build_tab(host, queue)
    return blocks, Form(host)


@pytest.mark.parametrize("name", list_presets(PRESETS_DIR))
def test_every_preset_survives_the_form(tab, name):
    _, form = tab
    s = load_preset(name)
    assert form.settings(tuple(form.values(s))) == s


def test_difference_second_pass_values_come_back_as_overrides(tab):
    _, form = tab
    s = Settings.from_dict({"mode": "Difference", "use_2nd_pass_settings": True, "network_rank": 16,
                            "second_pass": {"network_rank": 4, "train_learning_rate": 3e-4}})
    values = form.values(s)
    back = form.settings(tuple(values))
    assert back.second_pass == {"network_rank": 4, "train_learning_rate": 3e-4}
    p2 = dict(zip([f.name for f in second_pass_fields()], values[len(FIELDS):]))
    assert p2["network_rank"] == "4"


def test_every_field_has_one_widget_and_mode_shows_only_its_fields(tab):
    blocks, form = tab
    config = blocks.get_config_file()
    ids = [c["props"].get("elem_id") for c in config["components"]]
    for f in FIELDS:
        assert ids.count(f"shinkansen-{f.name}") == 1, f.name
    for f in second_pass_fields():
        assert ids.count(f"shinkansen-p2-{f.name}") == 1, f.name
    shown = {f.name for f, u in zip(FIELDS, form.visibility("iLECO")) if u["visible"]}
    assert {"original_prompt", "target_prompt"} <= shown and "lora_data_directory" not in shown
    assert "image_buckets_step" not in shown and "train_learning_rate" in shown


def test_bad_form_values_name_the_field(tab):
    _, form = tab
    values = list(form.values(Settings()))
    values[[f.name for f in FIELDS].index("train_iterations")] = "lots"
    with pytest.raises(Exception, match=r"^train_iterations: 'lots' is not a whole number"):
        form.settings(tuple(values))


def test_cli_queue_add_list_rm_and_plot(tmp_path, capsys):
    root = tmp_path / "ext"
    images = tmp_path / "images"
    toy.make_dataset(images, 2, seed=1, image_size=64)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"mode": "LoRA", "lora_data_directory": str(images), "save_lora_name": "cli"}))
    assert cli(["queue", "add", str(job), "--root", str(root), "--set", "train_iterations=7"]) == 0
    assert "added: job #1 cli (LoRA)" in capsys.readouterr().out
    assert cli(["queue", "add", str(job), "--root", str(root)]) == 2           # duplicate name
    assert "error: save_lora_name: job #1 (pending) already writes 'cli'" in capsys.readouterr().err
    assert cli(["queue", "list", "--json", "--root", str(root)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["name"], j["state"]) for j in listed] == [("cli", "pending")]
    assert JobQueue(Host(root=root)).get(1).settings["train_iterations"] == 7
    assert cli(["queue", "rm", "1", "--root", str(root)]) == 0
    assert cli(["queue", "rm", "1", "--root", str(root)]) == 2
    assert "job #1 does not exist" in capsys.readouterr().err

    csv = tmp_path / "run.csv"
    csv.write_text("step,loss,loss_ema,lr,elapsed_s\n1,0.5,0.5,1e-4,0.1\n2,0.4,0.49,1e-4,0.2\n")
    tt = tmp_path / "traintrain.csv"
    tt.write_text("mode,LoRA\nStep,Loss,Learning Rate\n1,0.7,0.0001\n2,0.6,0.0001\n")
    out = tmp_path / "loss.png"
    assert cli(["plot", str(csv), str(tt), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["plot", str(tmp_path / "nope.csv"), "-o", str(out)]) == 2


def test_python_m_trainer_help_lists_serve_options():
    r = subprocess.run([sys.executable, "-m", "trainer", "serve", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--listen" in r.stdout and "--auth" in r.stdout and "--port" in r.stdout


def test_samples_draw_with_the_current_model_and_refuse_a_missing_lora(tmp_path):
    from trainer.errors import UserError
    from trainer.app.ui import generate_sample, lora_files
    host = Host(root=tmp_path, lora_dir=tmp_path / "loras")
    image = generate_sample(host, Settings(), "a red circle", "", "", 1.0, 0, 3, "64,64")
    assert image.size == (64, 64)
    assert lora_files(host) == []
    with pytest.raises(UserError, match="LoRA gone.safetensors: not found"):
        generate_sample(host, Settings(), "a red circle", "", "gone.safetensors", 1.0, 0, 3, "")
    with pytest.raises(UserError, match="prompt"):
        generate_sample(host, Settings(), "  ", "", "", 1.0, 0, 3, "")


def test_traintrain_loss_csv_keeps_its_lr_and_is_not_smoothed_twice(tmp_path):
    """TrainTrain's CSV (its savecsv): 8 key,value rows, then ``Step,Loss,Learning Rate 1,Learning Rate 2``
    (TE lr first when the text encoder trains, the UNet's last); its Loss is already an EMA. The plot shows
    that Loss unchanged and the UNet's learning rate."""
    from trainer.app.plot import figure, read_loss_csv
    preamble = ("network_rank,16\nnetwork_alpha,8\ntrain_learning_rate,0.0001\ntrain_iterations,4\n"
                "train_lr_scheduler,cosine\nmodel_version,sd_v1\ntrain_optimizer,AdamW\nsave_lora_name,tt\n")
    rows = [(1, 0.30, 5e-5, 1e-4), (2, 0.90, 4e-5, 8e-5), (3, 0.10, 2e-5, 4e-5), (4, 0.70, 1e-5, 2e-5)]
    path = tmp_path / "tt-20250101_120000.csv"
    path.write_text(preamble + "Step,Loss,Learning Rate 1,Learning Rate 2\n"
                    + "".join(f"{s},{loss},{te},{unet}\n" for s, loss, te, unet in rows))
    series = read_loss_csv(path)
    assert series.steps == [1, 2, 3, 4]
    assert series.lr == [r[3] for r in rows]                   # the UNet's column
    assert series.ema() == series.loss == [r[1] for r in rows]   # its EMA, as written
    fig = figure([series])
    ax, ax_lr = fig.axes
    assert [list(line.get_ydata()) for line in ax.lines] == [[r[1] for r in rows]]
    assert [list(line.get_ydata()) for line in ax_lr.lines] == [[r[3] for r in rows]]
