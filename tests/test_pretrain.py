"""The tiny model's pretraining script: an interrupted run resumes to the uninterrupted result."""
import pytest
import torch

from trainer.world.pretrain import PretrainConfig, Pretrainer

SMALL = PretrainConfig(seed=5, vae_steps=4, vae_batch=4, n_latents=64, unet_steps=4, unet_batch=4,
                       warmup=2, checkpoint_every=1000, log_every=1000)


def _weights(p: Pretrainer) -> dict:
    out = {}
    for name, module in (("vae", p.vae), ("unet", p.unet), ("te", p.te), ("ema_unet", p.ema_unet)):
        out.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    p = Pretrainer(tmp_path_factory.mktemp("full"), SMALL, log=lambda m: None)
    assert p.run() is True
    return _weights(p)


@pytest.mark.parametrize("stop_at", [("vae", 2), ("unet", 2)])
def test_resume_reproduces_uninterrupted_run(tmp_path, uninterrupted, stop_at):
    first = Pretrainer(tmp_path, SMALL, log=lambda m: None)
    assert first.run(stop_at=stop_at) is False
    del first
    second = Pretrainer(tmp_path, SMALL, log=lambda m: None)
    second.load_state()
    assert (second.phase, second.step) == stop_at
    assert second.run() is True
    resumed = _weights(second)
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, different[:5]


def test_resume_refuses_other_settings(tmp_path):
    p = Pretrainer(tmp_path, SMALL, log=lambda m: None)
    p.run(stop_at=("vae", 1))
    other = Pretrainer(tmp_path, PretrainConfig(**{**SMALL.__dict__, "unet_lr": 1.0}), log=lambda m: None)
    with pytest.raises(SystemExit, match="different settings"):
        other.load_state()


def test_extend_continues_a_finished_unet_phase(tmp_path):
    from dataclasses import replace
    p = Pretrainer(tmp_path, SMALL, log=lambda m: None)
    assert p.run() is True
    longer = replace(SMALL, unet_steps=6)
    with pytest.raises(SystemExit, match="different settings"):
        Pretrainer(tmp_path, longer, log=lambda m: None).load_state()          # not without --extend
    with pytest.raises(SystemExit, match="only raises"):
        Pretrainer(tmp_path, replace(longer, unet_lr=1.0), log=lambda m: None).load_state(extend=True)
    q = Pretrainer(tmp_path, longer, log=lambda m: None)
    q.load_state(extend=True)
    assert (q.phase, q.step) == ("unet", 4)
    before = {k: v.clone() for k, v in q.unet.state_dict().items()}
    assert q.run() is True and q.step == 6
    assert any(not torch.equal(before[k], v) for k, v in q.unet.state_dict().items())
