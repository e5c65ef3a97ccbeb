#!/usr/bin/env bash
# The tab under gradio 4.x: Forge ships gradio 4.40.0, A1111 gradio 3.41.2 (the standalone pin), and
# trainer/app/ui.py must build in both (trainer/app/compat.py hides the differences).
#
# .venv-gradio4 (repo root, git-ignored) is made with --system-site-packages (reusing torch, numpy,
# matplotlib, pytest ...) and --without-pip (the interpreter's pip installs into it). Only Forge's web
# stack lands in the venv, shadowing the system's gradio 3.41.2 / fastapi 0.94.0 / pydantic 1:
#   gradio==4.40.0 fastapi==0.104.1 pydantic==2.8.2 huggingface-hub==0.26.2   (Forge's pins)
# Idempotent: an existing venv with these versions is reused as is.
# --setup-only: make the venv and stop (install.py --test calls this; tests/test_gradio4.py uses it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv-gradio4

have_pins() {
    "$VENV/bin/python" - <<'PYEOF' 2>/dev/null
import sys
import fastapi, gradio, pydantic
ok = gradio.__version__ == "4.40.0" and fastapi.__version__ == "0.104.1" and pydantic.VERSION == "2.8.2"
sys.exit(0 if ok else 1)
PYEOF
}

if ! have_pins; then
    "$PY" -m venv --system-site-packages --without-pip "$VENV"
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip --default-pip >/dev/null
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "gradio==4.40.0" "fastapi==0.104.1" "pydantic==2.8.2" "huggingface-hub==0.26.2"
    have_pins || { echo "gradio4: pinned packages not importable in $VENV" >&2; exit 1; }
fi

[ "${1:-}" = "--setup-only" ] && exit 0
exec "$VENV/bin/python" -m pytest tests/test_gradio4.py -q -p no:cacheprovider
