"""Regularisation images keep the class prompt: a LoRA taught "zkx" on red circles, trained with reg images of
circles in every colour, turns "a circle" red less often than the same run without them (embedded tiny model).

Judged by pixels over 16 seeds. Without reg images every caption says "circle" next to a red circle, so the
class word drifts to red (kohya's "language drift"); the reg images, captioned "circle" by their 1_circle
folder, hold it where the base model had it. A broken variant (reg loss weight 0) drifts like the plain run.
"""
import pytest
import torch

from trainer.events import EventBus
from trainer.generate import apply_loras, generate
from trainer.models.loader import DEFAULT_MODEL, load_model
from trainer.runner import run_job
from trainer.settings import Settings
from trainer.world import toy
from trainer.world.judge import judge

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"embedded model not built yet: {DEFAULT_MODEL}")
SEEDS = list(range(16))
CLASS_PROMPT = "a circle"
RUN = dict(mode="LoRA", image_size=64, image_buckets_step=64, image_min_length=64, train_iterations=120,
           train_batch_size=4, train_learning_rate=2e-3, train_lr_scheduler="constant", network_rank=4,
           network_alpha=4, train_seed=0, lora_trigger_word="zkx", save_overwrite=True, logging_save_csv=False)
FIGURES = {}


def _red_rate(bundle, lora=None):
    nets = apply_loras(bundle, [(lora, 1.0)]) if lora else []
    try:
        images = generate(bundle, [CLASS_PROMPT] * len(SEEDS), SEEDS, steps=20, cfg=5.0)
    finally:
        for n in nets:
            n.remove()
    return sum(j.color == "red" and j.shape == "circle" for j in judge(images)) / len(SEEDS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    work = tmp_path_factory.mktemp("reg")
    # 8 red circles x 3 repeats = 24 training samples per epoch, captioned "zkx, circle" (trigger first)
    toy.make_dataset(work / "train" / "3_zkx", 8, seed=0, caption="circle", shape="circle", color="red")
    # 24 circles of every colour without caption files: their caption is the folder's class, "circle"
    toy.make_dataset(work / "reg" / "1_circle", 24, seed=1, shape="circle")
    for f in (work / "reg").rglob("*.txt"):
        f.unlink()
    return work


def _train(work, name, **kw):
    s = Settings.from_dict({**RUN, "lora_data_directory": str(work / "train"), "save_lora_name": name, **kw})
    result = run_job(s, lora_dir=work / "out", bundle=load_model(DEFAULT_MODEL, device="cpu"), events=EventBus(),
                     log_dir=work / "logs", json_dir=work / "json")
    return result.saved[-1]


def test_reg_images_keep_the_class_prompt(folders):
    torch.manual_seed(0)
    plain = _train(folders, "plain")
    with_reg = _train(folders, "with_reg", lora_reg_directory=str(folders / "reg"), prior_loss_weight=1.0)
    bundle = load_model(DEFAULT_MODEL, device="cpu")
    FIGURES.update(base=_red_rate(bundle), plain=_red_rate(bundle, plain), with_reg=_red_rate(bundle, with_reg))
    print(f"\n'{CLASS_PROMPT}' drawn as a red circle over {len(SEEDS)} seeds: base model {FIGURES['base']:.2f}, "
          f"LoRA without reg images {FIGURES['plain']:.2f}, LoRA with reg images {FIGURES['with_reg']:.2f}")
    assert FIGURES["plain"] >= FIGURES["base"] + 0.25, "the plain run should drift (else the test shows nothing)"
    # measured on CPU: base 0.12, plain 1.00, with reg 0.25, and 0.81 for the broken variant (reg loss weight 0)
    assert FIGURES["with_reg"] <= FIGURES["plain"] - 0.45
