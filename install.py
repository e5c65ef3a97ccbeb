"""Install what Shinkansen needs: in the WebUI never replacing a package, standalone saying each replacement.

Inside AUTOMATIC1111 this file is run by the WebUI at every launch (``import launch``
works there): it installs only missing packages through ``launch.run_pip``, with every
installed package pinned at its version (a pip constraints file), so nothing the WebUI
pinned (torch, transformers, gradio, safetensors, ...) is ever up- or downgraded.
``--skip-install`` is honoured.

Standalone (``python install.py``) it installs what is missing from ``requirements.txt``
the same way: a package that is already installed is kept even if its version differs (a
warning says so), and every installed package is pinned while the missing ones are installed,
so pip cannot replace one as a dependency either. Where a missing package cannot go in that
way (gradio 3.41 needs MarkupSafe 2.x), it is installed a second time without those pins (torch
and what our installed packages declare they need still hold) and every package pip replaced
for it is named in one line, so nothing changes unsaid.
Torch, when missing, is installed first, at the version the project is tested with.
``--test`` adds the test requirements and the transformers 4.30.2 side environment that
checks the text encoders under the WebUI's transformers.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

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


def installed_distributions() -> dict[str, str]:
    """Canonical name -> version of everything installed in this interpreter."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and dist.version:
            out.setdefault(_canonical(name), dist.version)
    return out


def constraints_text(installed: dict[str, str], wanted: list[str] = ()) -> str:
    """``name==version`` for every installed package: pip may add packages, never change one.

    ``wanted`` (our specs of packages still to install) joins them, so a package installed as a
    dependency of an earlier spec already has the version a later spec asks for (fastapi for gradio).
    """
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
    lines += [spec for spec in wanted if _canonical(_name(spec)) not in installed and _name(spec) != spec.strip()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def constraints_file(installed: dict[str, str], wanted: list[str]) -> Iterator[str]:
    """A pip constraints file of :func:`constraints_text` (deleted afterwards)."""
    fd, path = tempfile.mkstemp(prefix="shinkansen-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(constraints_text(installed, wanted))
        yield path
    finally:
        os.unlink(path)


def install_each(specs: list[str], pip: Callable[[str, str], object], hint: str | None) -> list[str]:
    """``pip(spec, constraints_file)`` for each spec; returns the names that could not be installed.

    What was installed before we started is pinned, so pip never up- or downgrades it: where a
    new package needs that, pip fails, the package is reported (``hint`` says how to install it
    by hand) and the rest go on. Dependencies we add on the way stay free for later specs.
    """
    failed = []
    if not specs:
        return failed
    with constraints_file(installed_distributions(), specs) as constraints:
        for spec in specs:
            try:
                pip(spec, constraints)
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                failed.append(_name(spec))
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"[shinkansen] could not install {spec}: {first} (installed packages are pinned, so pip "
                      "stops where this one would need another version of one; pip's message above names it)")
    if failed and hint:
        print(f"[shinkansen] not installed: {', '.join(failed)}; {hint}")
    return failed


def declared_needs(names: list[str]) -> list[str]:
    """What the installed packages ``names`` declare they need (``huggingface-hub<2.0,>=1.5.0`` for
    transformers 5.17), as constraint lines: pip's installer never re-checks an installed package's needs
    when it changes that package's dependency for a new one, so without these a replacement can break
    a package of ours (diffusers pulled huggingface-hub 2.5, which transformers cannot import)."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        return []
    lines = []
    for name in names:
        try:
            declared = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in declared:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue      # an optional extra or another platform's need
            if req.specifier and not req.url:
                lines.append(f"{req.name}{req.specifier}")
    return lines


def install_replacing(specs: list[str], pip: Callable[[str, str], object], keep: list[str] = ()) -> list[str]:
    """Standalone only: install ``specs`` that could not go in beside the installed versions, letting pip
    change what they need, and name every package it replaced (gradio 3.41 needs MarkupSafe 2.x, so a
    MarkupSafe 3 is downgraded). ``keep`` names our installed requirements: torch stays at its version and
    what each of them declares it needs stays true, so a replacement cannot break our own stack.
    The WebUI's install never comes here: its packages are never changed."""
    failed, before = [], installed_distributions()
    kept = [f"{name}=={before[_canonical(name)]}" for name in keep
            if _canonical(name) == "torch" and _canonical(name) in before]
    with constraints_file({}, specs + kept + declared_needs(keep)) as constraints:
        for spec in specs:
            try:
                pip(spec, constraints)
            except Exception:  # noqa: BLE001 - pip printed why
                failed.append(_name(spec))
    after = installed_distributions()
    for name in sorted(before):
        if name in after and after[name] != before[name]:
            print(f"[shinkansen] replaced {name} {before[name]} -> {after[name]} (needed by {', '.join(specs)})")
    if failed:
        print(f"[shinkansen] not installed: {', '.join(failed)}; install them yourself (python -m pip install NAME)")
    return failed


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

    def run_pip(spec: str, constraints: str) -> None:
        launch.run_pip(f'install "{spec}" -c "{constraints}"', f"{_name(spec)} for Shinkansen")
    failed = install_each(todo, run_pip, "install them with the WebUI's Python, "
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


def standalone_pip(spec: str, constraints: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", spec, "-c", constraints])


def install_standalone(with_tests: bool) -> int:
    specs = read_requirements(ROOT / "requirements.txt")
    if with_tests:
        specs += read_requirements(ROOT / "requirements-test.txt")
    todo = missing(specs)
    # torch first and alone, so no other requirement can pull a different torch build.
    todo.sort(key=lambda spec: _canonical(_name(spec)) != "torch")
    if todo:
        print(f"[shinkansen] installing: {' '.join(todo)}")
    failed = install_each(todo, standalone_pip, None)
    if failed:
        keep = [_name(spec) for spec in specs if _name(spec) not in failed and installed_version(_name(spec))]
        failed = install_replacing([spec for spec in todo if _name(spec) in failed], standalone_pip, keep)
    if with_tests:
        setup_tf430_env()
        setup_gradio4_env()
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    try:
        import launch  # noqa: F401
        in_webui = True
    except ImportError:
        in_webui = False
    if in_webui and "--standalone" not in argv:
        return install_webui()
    return install_standalone(with_tests="--test" in argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
