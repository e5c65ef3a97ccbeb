"""Faster and lighter training paths (issue 17): each is equal to the plain path, and lighter where it says so."""
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from trainer.models import checkpoint_io as io


def test_upcast_while_loading_equals_upcast_after(tmp_path):
    p = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    src = {"w": torch.randn(5, 7, generator=g).half(), "b": torch.randn(3, generator=g).to(torch.bfloat16),
           "f": torch.randn(2, 2, generator=g), "i": torch.arange(4)}
    save_file(src, str(p))
    plain = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in io.load_safetensors(p).items()}
    fast = io.load_safetensors(p, dtype=torch.float32)
    assert set(fast) == set(plain)
    for k in plain:
        assert fast[k].dtype == plain[k].dtype and torch.equal(fast[k], plain[k]), k   # bit-exact
    assert set(io.load_safetensors(p, keys=["w"], dtype=torch.float32)) == {"w"}


def test_upcast_while_loading_never_holds_the_file_and_its_copy(tmp_path):
    """Peak RSS of an fp16 → fp32 load: the fp32 copy (256 MiB) plus little, not also the 128 MiB file."""
    p = tmp_path / "half.safetensors"
    save_file({f"t{i}": torch.full((2 * 2**20,), float(i), dtype=torch.float16) for i in range(32)}, str(p))
    code = textwrap.dedent(f"""
        import torch
        from trainer.models.checkpoint_io import load_safetensors
        def kib(field):
            return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
        before = kib("VmRSS:")
        sd = load_safetensors({str(p)!r}, dtype=torch.float32)
        assert sd["t3"].dtype == torch.float32 and float(sd["t3"][0]) == 3.0
        print((kib("VmHWM:") - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])
    assert grew < 256 + 48, f"loading grew RSS by {grew} MiB (fp32 copy 256 MiB, fp16 file 128 MiB)"


# ---------------------------------------------------------------- training fast paths, on the random tiny model
from trainer.events import EventBus, StepEvent  # noqa: E402
from trainer.models.loader import random_tiny_bundle  # noqa: E402
from trainer.networks import load_lora  # noqa: E402
from trainer.runner import run_job  # noqa: E402
from trainer.settings import Settings  # noqa: E402
from trainer.speed import blocks_of, fast_paths, optimizer_extra  # noqa: E402
from trainer.world import toy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(mode="LoRA", image_size=(64, 64), image_buckets_step=64, image_min_length=64, train_iterations=4,
            train_batch_size=2, network_rank=4, network_alpha=4, train_seed=3, train_learning_rate=1e-3,
            train_lr_scheduler="constant", network_type="c3lier", logging_save_csv=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 4, seed=1, caption="zq", shape="square", color="purple")
    return folder


def _train(tmp_path, dataset, probe=None, **kw):
    """Losses per step and the saved LoRA of a 4-step run (BASE: UNet + text encoder, 3x3 convs included)."""
    bundle = random_tiny_bundle(seed=0, device="cpu")
    losses, seen = [], []

    def sink(e):
        if isinstance(e, StepEvent):
            losses.append(e.loss)
            if probe:
                seen.append(probe(bundle))
    s = Settings.from_dict({**BASE, "lora_data_directory": str(dataset), **kw})
    result = run_job(s, lora_dir=tmp_path / "out", bundle=bundle, events=EventBus([sink]),
                     log_dir=tmp_path / "logs", json_dir=tmp_path / "json")
    tensors, _ = load_lora(result.saved[0])
    return losses, tensors, seen, bundle


# The losses agree to 1e-5 (fused) / 1e-4 (channels-last) relative at every step; the weights within half
# of one AdamW step (lr 1e-3): factors with near-zero gradients (down while up = 0, time_emb_proj) are where
# Adam's m / sqrt(v) turns rounding-level gradient differences into update-sized ones.
TOL = 5e-4


def _assert_close(a, b, rtol, atol):
    (la, ta), (lb, tb) = a, b
    assert len(la) == len(lb) == BASE["train_iterations"]
    assert la == pytest.approx(lb, rel=rtol, abs=1e-6)
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k].float(), tb[k].float(), rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, dataset):
    losses, tensors, _, _ = _train(tmp_path_factory.mktemp("plain"), dataset)
    return losses, tensors


def test_fused_optimizer_chosen_only_where_asked():
    cpu = torch.device("cpu")
    assert optimizer_extra("AdamW", {}, cpu, False) == {}
    assert optimizer_extra("AdamW", {"weight_decay": 0.1}, cpu, True) == {"weight_decay": 0.1, "fused": True}
    assert optimizer_extra("AdamW", {"foreach": False}, cpu, True) == {"foreach": False}   # the user's wins
    assert optimizer_extra("Lion", {}, cpu, True) == {}


def test_fused_optimizer_trains_the_same(tmp_path, dataset, plain):
    losses, tensors, _, _ = _train(tmp_path, dataset, train_fused_optimizer=True)
    _assert_close((losses, tensors), plain, rtol=1e-5, atol=TOL)


def test_channels_last_trains_the_same_and_is_undone(tmp_path, dataset, plain):
    def layout(bundle):
        w = bundle.unet.input_blocks[1][0].in_layers[2].weight     # a ResBlock's 3x3 conv
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    losses, tensors, seen, bundle = _train(tmp_path, dataset, probe=layout, train_channels_last=True)
    assert seen and all(seen)                                     # the steps ran channels-last
    assert all(p.is_contiguous() for p in bundle.unet.parameters())   # and the model is back after
    _assert_close((losses, tensors), plain, rtol=1e-4, atol=TOL)


@pytest.mark.slow
def test_compiled_block_with_lora_inside_equals_eager():
    """``train_compile``: a UNet block compiled with its LoRA hooks traced in gives the eager output and
    the eager LoRA gradients (one block: compiling the whole UNet on a CPU takes minutes)."""
    from trainer.networks.network import NetworkSpec, create_network
    bundle = random_tiny_bundle(seed=0, device="cpu")
    network = create_network(bundle, NetworkSpec(network_type="c3lier", rank=4, alpha=4, seed=1)).apply_to(bundle)
    g = torch.Generator().manual_seed(0)
    for p in network.parameters():              # a trained-looking LoRA (a fresh one has up = 0)
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
        p.requires_grad_(True)
    block = bundle.unet.input_blocks[1]         # ResBlock (3x3 convs) + SpatialTransformer (attention, 1x1)
    x = torch.randn(2, 32, 8, 8, generator=g)
    emb = torch.randn(2, 128, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)

    def run():
        for p in network.parameters():
            p.grad = None
        out = block(x, emb, ctx)
        (out.square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
    eager, eager_grads = run()
    assert eager_grads
    with fast_paths(bundle.unet, channels_last=False, compile=True):
        assert block._compiled_call_impl is not None
        compiled, compiled_grads = run()
    assert block._compiled_call_impl is None     # back to eager after
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    network.remove()
