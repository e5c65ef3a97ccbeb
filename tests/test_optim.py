"""Optimizer registry and LR schedules."""
import math

import pytest
import torch

from trainer.errors import UserError
from trainer.optim import build_optimizer, build_scheduler, lr_lambda, optimizer_class, parse_step_rules


def _lrs(name, total=10, **kw):
    f = lr_lambda(name, total, **kw)
    return [round(f(s), 6) for s in range(total)]


def test_schedules():
    assert _lrs("constant") == [1.0] * 10
    assert _lrs("constant_with_warmup", warmup=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = _lrs("linear")
    assert lin[0] == 1.0 and lin == sorted(lin, reverse=True) and lin[-1] == pytest.approx(0.1)
    cos = lr_lambda("cosine", 100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    restarts = lr_lambda("cosine_with_restarts", 100, cycles=2)
    assert restarts(49) < 0.01 and restarts(50) == pytest.approx(1.0)
    assert lr_lambda("polynomial", 100, power=2.0)(50) == pytest.approx(0.25)
    ann = lr_lambda("cosine_annealing", 100, min_factor=0.1)
    assert ann(0) == 1.0 and ann(100) == pytest.approx(0.1)


def test_cosine_annealing_eta_min_per_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer("AdamW", [{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1e-3}], lr=1e-4)
    sched = build_scheduler(opt, "cosine_annealing", 10, settings={"eta_min": 1e-5})
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-5])
    with pytest.raises(UserError, match="train_lr_scheduler_settings"):
        build_scheduler(opt, "cosine", 10, settings={"gamma": 0.5})


def test_piecewise_constant():
    assert parse_step_rules("1:3,0.5:6,0.1") == [(1.0, 3), (0.5, 6), (0.1, None)]
    assert _lrs("piecewise_constant", step_rules="1:3,0.5:6,0.1") == [1, 1, 1, .5, .5, .5, .1, .1, .1, .1]
    with pytest.raises(UserError, match="train_lr_step_rules"):
        parse_step_rules("1:5,x")
    with pytest.raises(UserError, match="train_lr_step_rules"):
        lr_lambda("piecewise_constant", 10, step_rules="")


def test_scheduler_drives_optimizer_and_resumes():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("AdamW", [{"params": [p]}], lr=1.0)
    sched = build_scheduler(opt, "linear", 10)
    for _ in range(4):
        opt.step()
        sched.step()
    state = (opt.state_dict(), sched.state_dict())
    opt2 = build_optimizer("adamw", [{"params": [p]}], lr=1.0)
    sched2 = build_scheduler(opt2, "linear", 10)
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == pytest.approx(0.6)


def test_unknown_and_missing_optimizers_are_clear():
    with pytest.raises(UserError, match="unknown optimizer 'Adamm'.*AdamW"):
        optimizer_class("Adamm")
    try:
        import lion_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install lion-pytorch"):
            optimizer_class("Lion")
    with pytest.raises(UserError, match="train_lr_scheduler"):
        lr_lambda("sometimes", 10)


@pytest.fixture
def prodigy_absent(monkeypatch):
    """prodigyopt not installed, whatever this machine has (the package lookup is what the check uses)."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "prodigyopt" else real(name, *a, **kw))


def test_missing_optimizer_package_fails_before_any_model_work(prodigy_absent, monkeypatch, tmp_path):
    """The README promises every user mistake is caught before the model loads; an optimizer whose
    package is missing is one: the settings check names the optimizer and the pip package, so a CLI
    run never reaches the model loader, and the queue and API refuse the job when it is added."""
    from trainer.app.host import Host
    from trainer.app.jobs import JobQueue
    from trainer.runner import run_job
    from trainer.settings import Settings

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the optimizer's package was checked")
    monkeypatch.setattr("trainer.models.loader.load_model", must_not_load)
    monkeypatch.setattr("trainer.models.loader.random_tiny_bundle", must_not_load)
    want = "train_optimizer: Prodigy needs the package 'prodigyopt', which is not installed: pip install prodigyopt"
    s = Settings({"mode": "iLECO", "original_prompt": "red", "train_optimizer": "Prodigy", "train_learning_rate": 1})
    assert [str(e) for e in s.problems()] == [want]
    with pytest.raises(UserError, match=f"^{want}$"):
        run_job(s, lora_dir=tmp_path, log_dir=tmp_path, json_dir=tmp_path)
    queue = JobQueue(Host(root=tmp_path, lora_dir=tmp_path / "loras"))
    with pytest.raises(UserError, match=f"^{want}$"):
        queue.add(s)
    assert queue.list() == []
    # Difference's 2nd pass may switch optimizer: checked as well
    d = Settings({"mode": "Difference", "use_2nd_pass_settings": True}, second_pass={"train_optimizer": "Prodigy"})
    assert "second_pass." + want in [str(e) for e in d.problems(check_files=False)]


def test_bad_optimizer_arguments_are_clear():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError, match="train_optimizer_settings"):
        build_optimizer("AdamW", [{"params": [p]}], lr=1e-3, extra={"bogus": 1})


def _optimizers_named(node) -> set:
    """Every ``train_optimizer`` in a preset, the nested ``2nd pass`` included."""
    if isinstance(node, dict):
        found = {node["train_optimizer"]} if isinstance(node.get("train_optimizer"), str) else set()
        return found.union(*(_optimizers_named(v) for v in node.values()))
    return set()


def test_every_shipped_presets_optimizer_is_installed_by_install_py():
    """A fresh install (WebUI or standalone: both read requirements.txt) must run every preset we ship."""
    import importlib.util
    import json
    from pathlib import Path
    from trainer.optim import optimizer_package
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("shinkansen_install", root / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    installed = {install._canonical(install._name(s)) for s in install.read_requirements(root / "requirements.txt")}
    presets = sorted((root / "presets").glob("*.json"))
    used = {(p.name, name) for p in presets for name in _optimizers_named(json.loads(p.read_text(encoding="utf-8")))}
    assert {name for _, name in used} >= {"AdamW", "CAME"}
    for preset, name in sorted(used):
        package = optimizer_package(name)
        assert install._canonical(package) in installed, f"{preset}: {name} needs {package}; install.py skips it"
        assert optimizer_class(name) is not None      # and it imports here, after install.py
