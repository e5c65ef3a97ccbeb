"""Install what Shinkansen needs, in the WebUI or standalone, without ever replacing a package.

Inside AUTOMATIC1111 this file is run by the WebUI at every launch (``import launch``
works there): it installs only missing packages through ``launch.run_pip``, with every
installed package pinned at its version (a pip constraints file), so nothing the WebUI
pinned (torch, transformers, gradio, safetensors, ...) is ever up- or downgraded.
``--skip-install`` is honoured.

Standalone (``python install.py``) it installs what is missing from ``requirements.txt``;
a package that is already installed is kept even if its version differs (a warning says
so). Torch, when missing, is installed at the version the project is tested with.
``--test`` adds the test requirements and the transformers 4.30.2 side environment that
checks the text encoders under the WebUI's transformers.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH_WHEN_MISSING = "torch==2.13.0"


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].strip()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path) -> list[str]:
    specs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            specs.append(line)
    return specs


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def satisfied(spec: str, version: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # without packaging we can only tell presence
        return True
    return Requirement(spec).specifier.contains(version, prereleases=True)


def missing(specs: list[str]) -> list[str]:
    """Specs whose package is absent; present-but-different versions are only reported."""
    todo = []
    for spec in specs:
        name = _name(spec)
        version = installed_version(name)
        if version is None:
            todo.append(TORCH_WHEN_MISSING if _canonical(name) == "torch" else spec)
        elif not satisfied(spec, version):
            print(f"[shinkansen] keeping installed {name} {version} (wanted {spec}); not replacing it")
    return todo


def pip_install(specs: list[str]) -> None:
    if not specs:
        return
    print(f"[shinkansen] installing: {' '.join(specs)}")
    # torch first and alone, so no other requirement can pull a different torch build.
    torch_specs = [s for s in specs if _canonical(_name(s)) == "torch"]
    rest = [s for s in specs if s not in torch_specs]
    for group in (torch_specs, rest):
        if group:
            subprocess.check_call([sys.executable, "-m", "pip", "install", *group])


def installed_distributions() -> dict[str, str]:
    """Canonical name -> version of everything installed in this interpreter."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and dist.version:
            out.setdefault(_canonical(name), dist.version)
    return out


def constraints_text(installed: dict[str, str]) -> str:
    """``name==version`` for every installed package: pip may add packages, never change one."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        Version, InvalidVersion = str, ValueError
    lines = []
    for name, version in sorted(installed.items()):
        try:
            Version(version)
        except InvalidVersion:
            continue   # pip could not parse the pin either; leave that package unconstrained
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def install_webui(launch=None) -> int:
    """Missing packages through the WebUI's ``launch.run_pip``; every installed one is pinned as it is.

    Presence is checked with ``launch.is_installed`` (the WebUI's own test), so a package the
    WebUI already has is never touched, whatever version we would prefer. The constraints file
    makes pip fail, instead of silently up- or downgrading, when a new package's dependencies
    would need another version of something installed (torch, transformers, gradio, ...).
    """
    if launch is None:
        import launch  # only importable inside the WebUI's installer subprocess
    if getattr(getattr(launch, "args", None), "skip_install", False):
        print("[shinkansen] --skip-install: not installing anything")
        return 0
    todo = [s for s in read_requirements(ROOT / "requirements.txt") if not launch.is_installed(_name(s))]
    if not todo:
        return 0
    import tempfile
    fd, constraints = tempfile.mkstemp(prefix="shinkansen-constraints-", suffix=".txt")
    failed = []
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(constraints_text(installed_distributions()))
        for spec in todo:
            try:
                launch.run_pip(f'install "{spec}" -c "{constraints}"', f"{_name(spec)} for Shinkansen")
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                failed.append(_name(spec))
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"[shinkansen] could not install {spec}: {first} (pip may not change installed "
                      "packages here, so a dependency conflict fails instead)")
    finally:
        os.unlink(constraints)
    if failed:
        print(f"[shinkansen] not installed: {', '.join(failed)}; install them with the WebUI's Python, "
              "e.g. venv/bin/python -m pip install NAME")
    return 1 if failed else 0


def setup_tf430_env() -> None:
    """A side virtualenv with the WebUI's transformers 4.30.2 for the text-encoder parity tests."""
    script = ROOT / ".ci" / "transformers430.sh"
    if script.is_file():
        subprocess.check_call(["bash", str(script), "--setup-only"])


def setup_gradio4_env() -> None:
    """A side virtualenv with Forge's gradio 4.40 in which the tab must build too (tests/test_gradio4.py)."""
    script = ROOT / ".ci" / "gradio4.sh"
    if script.is_file():
        subprocess.check_call(["bash", str(script), "--setup-only"])


def install_standalone(with_tests: bool) -> None:
    specs = read_requirements(ROOT / "requirements.txt")
    if with_tests:
        specs += read_requirements(ROOT / "requirements-test.txt")
    pip_install(missing(specs))
    if with_tests:
        setup_tf430_env()
        setup_gradio4_env()


def main(argv: list[str]) -> int:
    try:
        import launch  # noqa: F401
        in_webui = True
    except ImportError:
        in_webui = False
    if in_webui and "--standalone" not in argv:
        return install_webui()
    install_standalone(with_tests="--test" in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
