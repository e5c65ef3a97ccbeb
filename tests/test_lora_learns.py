"""LoRA mode learns a trigger word on the embedded tiny model (CPU, a few minutes at most)."""
import pytest
import torch

from trainer.world import toy
from trainer.generate import apply_loras, generate
from trainer.world.judge import judge
from trainer.models.loader import DEFAULT_MODEL, load_model
from trainer.demo import demo_settings
from trainer.events import EventBus
from trainer.runner import run_job

# The embedded model is pretrained by `python -m trainer pretrain-tiny` (hours on a CPU) and committed;
# until it is, these tests skip and say why.
pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"embedded model not built yet: {DEFAULT_MODEL}")
SEEDS = list(range(16))
# An unknown word draws a random object, each of the 18 colour/shape combinations ~1/18 of the time; circles
# are the base model's rarest shape for "zq", so a hit is the LoRA's doing, not chance.
COLOR, SHAPE = "orange", "circle"
OTHERS = ["a large red circle on a white background", "a small blue triangle on a black background",
          "a large yellow square on a gray background"]


def _rate(images, color, shape):
    j = judge(images)
    return sum(x.color == color and x.shape == shape for x in j) / len(j)


def _colour_acc(bundle):
    acc = {}
    for prompt in OTHERS:
        color = prompt.split()[2]
        j = judge(generate(bundle, [prompt] * len(SEEDS), SEEDS, steps=20, cfg=5.0))
        acc[prompt] = sum(x.color == color for x in j) / len(j)
    return acc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    assert DEFAULT_MODEL.is_file(), f"embedded model missing: {DEFAULT_MODEL}"
    work = tmp_path_factory.mktemp("learn")
    toy.make_dataset(work / "data", 12, seed=0, caption="zq", shape=SHAPE, color=COLOR)
    result = run_job(demo_settings(work / "data", 300, "zq", seed=0), lora_dir=work / "out",
                     log_dir=work / "logs", json_dir=work / "json", events=EventBus())
    return result.saved[-1]


def test_trigger_word_is_learnt_without_collateral_damage(trained):
    bundle = load_model(DEFAULT_MODEL, device="cpu")
    torch.manual_seed(0)
    base_rate = _rate(generate(bundle, ["zq"] * 16, SEEDS, steps=20, cfg=5.0), COLOR, SHAPE)
    base_acc = _colour_acc(bundle)
    nets = apply_loras(bundle, [(trained, 1.0)])
    lora_rate = _rate(generate(bundle, ["zq"] * 16, SEEDS, steps=20, cfg=5.0), COLOR, SHAPE)
    lora_acc = _colour_acc(bundle)
    for n in nets:
        n.remove()
    print(f"\nzq -> {COLOR} {SHAPE}: base {base_rate:.2f}, with LoRA {lora_rate:.2f}; "
          f"colour accuracy base {base_acc} lora {lora_acc}")
    assert base_rate < 0.10
    assert lora_rate >= 0.70
    for prompt in OTHERS:
        assert lora_acc[prompt] >= base_acc[prompt] - 0.10, prompt
