"""install.py inside the WebUI: only what is missing, nothing the WebUI installed ever changes, --skip-install.

The WebUI runs ``python install.py`` with its own folder on PYTHONPATH so that ``import launch``
works; here ``launch`` is a fake with A1111 1.10's ``args``, ``is_installed`` and ``run_pip``.
"""
import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
WEBUI_PINS = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "gradio": "3.41.2", "safetensors": "0.4.2",
              "fastapi": "0.94.0", "numpy": "1.26.2", "pillow": "9.5.0", "not-pep440": "latest-git"}


@pytest.fixture
def install(monkeypatch):
    spec = importlib.util.spec_from_file_location("shinkansen_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "installed_distributions", lambda: dict(WEBUI_PINS))
    return module


class FakeLaunch:
    """``launch`` as install.py sees it inside A1111 (presence-only ``is_installed``)."""

    def __init__(self, installed, skip_install=False, failing=()):
        self.args = SimpleNamespace(skip_install=skip_install)
        self.installed, self.failing = set(installed), set(failing)
        self.commands, self.constraints = [], []

    def is_installed(self, package):
        return package.lower() in self.installed

    def run_pip(self, command, desc=None, live=False):
        self.commands.append(command)
        path = command.split(" -c ", 1)[1].strip().strip('"')
        self.constraints.append(Path(path).read_text(encoding="utf-8"))
        if any(f'"{name}' in command for name in self.failing):
            raise RuntimeError(f"Couldn't install {desc}.\nCommand: pip {command}")


def _requirement_names(install):
    return [install._name(s).lower() for s in install.read_requirements(ROOT / "requirements.txt")]


def test_installs_only_what_is_missing_with_everything_installed_pinned(install):
    names = _requirement_names(install)
    missing = {"lycoris-lora", "ftfy"}
    launch = FakeLaunch(installed=set(names) - missing)
    assert install.install_webui(launch) == 0
    installed = sorted(c.split('"')[1].split("=")[0].split(">")[0] for c in launch.commands)
    assert installed == sorted(missing)
    pins = launch.constraints[0].splitlines()
    for name in ("torch==2.1.2+cu121", "transformers==4.30.2", "gradio==3.41.2", "safetensors==0.4.2",
                 "fastapi==0.94.0"):
        assert name in pins
    assert not any(p.startswith("not-pep440") for p in pins)   # pip could not read that pin
    assert not any(Path(c.split(" -c ", 1)[1].strip('"')).exists() for c in launch.commands)   # cleaned up


def test_an_installed_package_is_never_reinstalled_even_at_another_version(install):
    # the WebUI (or Forge) has gradio 4.40 and transformers 4.46 while we list gradio==3.41.2, transformers>=4.30.2
    names = _requirement_names(install)
    launch = FakeLaunch(installed=names)
    assert install.install_webui(launch) == 0
    assert launch.commands == []


def test_skip_install_installs_nothing(install, capsys):
    launch = FakeLaunch(installed=(), skip_install=True)
    assert install.install_webui(launch) == 0
    assert launch.commands == [] and "--skip-install" in capsys.readouterr().out


def test_one_failure_is_reported_and_the_rest_still_installed(install, capsys):
    launch = FakeLaunch(installed=(), failing={"lycoris-lora"})
    assert install.install_webui(launch) == 1
    assert len(launch.commands) == len(_requirement_names(install))
    out = capsys.readouterr().out
    assert "could not install lycoris-lora" in out and "not installed: lycoris-lora" in out


def _fake_cuda_torch(site: Path) -> None:
    """torch as the package index's CUDA wheel installs it: ``__version__`` 2.14.1+cu130, distribution 2.14.1."""
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text('__version__ = "2.14.1+cu130"\n')
    (site / "torch-2.14.1.dist-info").mkdir()
    (site / "torch-2.14.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.14.1\n")


def _distribution_version(name: str, path: list) -> str:
    """The version pip sees for ``name`` on ``path`` (the first distribution found, as Python imports it)."""
    return next(iter(metadata.Distribution.discover(name=name, path=path))).version


@pytest.mark.parametrize("torch_build", ["this interpreter's", "cuda wheel"])
def test_run_by_the_webui_as_a_subprocess(tmp_path, torch_build):
    """As launch_utils.run_extension_installer does it: ``python install.py`` with the WebUI on PYTHONPATH.

    torch is pinned at its distribution version (what pip compares), which for the index's CUDA
    wheels differs from ``torch.__version__`` by a local label (``+cu130``).
    """
    calls = tmp_path / "calls.json"
    (tmp_path / "launch.py").write_text(
        "import json, types\n"
        "args = types.SimpleNamespace(skip_install=False)\n"
        f"CALLS = {str(calls)!r}\n"
        "def is_installed(name):\n    return name != 'pyyaml'\n"
        "def run_pip(command, desc=None, live=False):\n"
        "    path = command.split(' -c ', 1)[1].strip().strip('\"')\n"
        "    json.dump({'command': command, 'pins': open(path).read()}, open(CALLS, 'w'))\n")
    search = [str(tmp_path)]
    if torch_build == "cuda wheel":
        _fake_cuda_torch(tmp_path / "site")
        search.insert(0, str(tmp_path / "site"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(search))
    done = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    call = json.loads(calls.read_text())
    assert call["command"].startswith('install "pyyaml"')
    torch_version = _distribution_version("torch", search + sys.path)
    if torch_build == "cuda wheel":
        assert torch_version == "2.14.1"
    assert f"torch=={torch_version}" in call["pins"].splitlines()   # the interpreter's real torch, pinned


class FakePip:
    """``pip install SPEC... [-c FILE]`` in miniature: the newest version allowed by the spec and the constraints;
    an installed version that does not fit a dependency is replaced (pip's default), an impossible one fails."""

    INDEX = {"gradio": {"3.41.2": ["markupsafe~=2.0", "fastapi"]}, "markupsafe": {"2.1.5": [], "3.0.4": []},
             "fastapi": {"0.94.0": [], "0.115.0": []}}

    def __init__(self, installed):
        self.installed = installed

    def __call__(self, command, **kw):
        args = command[command.index("install") + 1:]
        constraints = []
        if "-c" in args:
            at = args.index("-c")
            text = Path(args[at + 1]).read_text(encoding="utf-8")
            constraints = [Requirement(line) for line in text.splitlines() if line.strip()]
            args = args[:at] + args[at + 2:]
        plan = {}
        for spec in args:
            self._resolve(Requirement(spec), constraints, plan, command)
        self.installed.update(plan)

    def _resolve(self, req, constraints, plan, command):
        name = req.name.lower()
        versions = self.INDEX.get(name, {"1.0": []})
        allowed = [v for v in versions if req.specifier.contains(v, prereleases=True) and all(
            c.specifier.contains(v, prereleases=True) for c in constraints if c.name.lower() == name)]
        if self.installed.get(name) in allowed:
            return
        if not allowed:
            raise subprocess.CalledProcessError(1, command)      # pip: ResolutionImpossible
        plan[name] = max(allowed, key=Version)
        for dep in versions[plan[name]]:
            self._resolve(Requirement(dep), constraints, plan, command)


@pytest.mark.parametrize("markupsafe", ["3.0.4", None])
def test_standalone_names_every_installed_package_it_replaces(install, monkeypatch, capsys, markupsafe):
    """gradio 3.41.2 needs MarkupSafe 2.x: with 3.0.4 installed, the downgrade is said in one line (README says
    where standalone installs change a package); nothing else installed is touched."""
    wanted = {install._canonical(install._name(s)) for s in install.read_requirements(ROOT / "requirements.txt")}
    installed = {name: "1.0" for name in wanted - {"gradio", "fastapi", "torch"}}
    installed.update(torch="2.13.0", **({"markupsafe": markupsafe} if markupsafe else {}))
    pip = FakePip(installed)
    monkeypatch.setattr(install, "installed_distributions", lambda: dict(installed))
    monkeypatch.setattr(install, "installed_version", installed.get)
    monkeypatch.setattr(install.subprocess, "check_call", pip)

    code = install.install_standalone(with_tests=False)
    out = capsys.readouterr().out
    assert installed["fastapi"] == "0.94.0"                      # our pin, also when gradio pulls it in
    if markupsafe:
        assert (installed["gradio"], installed["markupsafe"], code) == ("3.41.2", "2.1.5", 0)
        assert "replaced markupsafe 3.0.4 -> 2.1.5 (needed by gradio==3.41.2)" in out
        assert out.count("[shinkansen] replaced") == 1
    else:
        assert (installed["gradio"], installed["markupsafe"], code) == ("3.41.2", "2.1.5", 0)


class HubPip(FakePip):
    """The registry of December 2026: diffusers 0.42 allows huggingface-hub 2.x, transformers 5.17 does not."""

    INDEX = {**FakePip.INDEX,
             "diffusers": {"0.42.1": ["huggingface-hub>=1.32,<3"]},
             "huggingface-hub": {"1.21.0": [], "1.33.0": [], "2.5.0": []},
             "transformers": {"5.17.0": ["huggingface-hub>=1.5,<2"]}}


def test_a_replacement_keeps_what_our_installed_packages_need(install, monkeypatch, capsys):
    """A clean CI machine had huggingface-hub 1.21 beside transformers 5.17; the replacing pass for
    gradio/fastapi/diffusers let pip take huggingface-hub 2.5, and transformers no longer imported.
    What our installed requirements declare they need is now a constraint of that pass."""
    wanted = {install._canonical(install._name(s)) for f in ("requirements.txt", "requirements-test.txt")
              for s in install.read_requirements(ROOT / f)}
    installed = {name: "1.0" for name in wanted - {"gradio", "fastapi", "torch", "diffusers", "transformers"}}
    installed.update({"torch": "2.13.0", "transformers": "5.17.0", "huggingface-hub": "1.21.0", "markupsafe": "3.0.4"})
    pip = HubPip(installed)
    monkeypatch.setattr(install, "installed_distributions", lambda: dict(installed))
    monkeypatch.setattr(install, "installed_version", installed.get)
    monkeypatch.setattr(install, "declared_needs", lambda names: [
        dep for name in names for dep in HubPip.INDEX.get(install._canonical(name), {}).get(installed.get(
            install._canonical(name)), [])])
    monkeypatch.setattr(install.subprocess, "check_call", pip)
    monkeypatch.setattr(install, "setup_tf430_env", lambda: None)
    monkeypatch.setattr(install, "setup_gradio4_env", lambda: None)

    assert install.install_standalone(with_tests=True) == 0
    assert (installed["diffusers"], installed["huggingface-hub"], installed["gradio"]) == ("0.42.1", "1.33.0", "3.41.2")
    assert "replaced huggingface-hub 1.21.0 -> 1.33.0" in capsys.readouterr().out


def test_declared_needs_reads_real_package_metadata(install):
    needs = install.declared_needs(["transformers", "not-a-package-at-all"])
    assert any(Requirement(line).name.lower() == "huggingface-hub" and Requirement(line).specifier for line in needs)
