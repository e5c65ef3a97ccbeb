"""The text-encoder parity tests again under transformers 4.30.2, the version the WebUI ships.

``python install.py --test`` (README's test command) creates ``.venv-tf430`` beside the
checkout; this test runs the text-encoder suite in it and fails if it is missing.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv-tf430" / "bin" / "python"


def test_text_encoders_pass_under_transformers_4_30_2():
    assert VENV_PY.is_file(), "missing .venv-tf430: run `python install.py --test` first"
    version = subprocess.run([str(VENV_PY), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "4.30.2"
    r = subprocess.run([str(VENV_PY), "-m", "pytest", "tests/test_text_encoders.py", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts="], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
