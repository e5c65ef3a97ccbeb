#!/usr/bin/env bash
# Text-encoder tests under transformers 4.30.2, the version AUTOMATIC1111 v1.10.1 pins (the standalone
# install uses transformers 5.x; trainer/models/text_encoders.py must work in both).
#
# .venv-tf430 (repo root, git-ignored) is made with --system-site-packages so it reuses the installed
# torch/numpy/safetensors/pytest, and --without-pip so the interpreter's own pip installs into it without
# a second, older setuptools shadowing the system one. Only the three pins below land in the venv:
#   transformers==4.30.2   A1111's pin
#   tokenizers==0.13.3     what 4.30.2 was released with (needs <0.14); has a CPython 3.11 wheel
#   huggingface-hub<1.0    4.30.2 breaks on the 1.x hub API; the system's is newer (for transformers 5.x)
# Idempotent: an existing venv with these versions is reused as is.
# --setup-only: make the venv and stop (install.py --test calls this; tests/test_transformers430.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv-tf430

have_pins() {
    "$VENV/bin/python" - <<'PYEOF' 2>/dev/null
import sys
import huggingface_hub, tokenizers, transformers
ok = (transformers.__version__ == "4.30.2" and tokenizers.__version__ == "0.13.3"
      and int(huggingface_hub.__version__.split(".")[0]) < 1)
sys.exit(0 if ok else 1)
PYEOF
}

if ! have_pins; then
    "$PY" -m venv --system-site-packages --without-pip "$VENV"
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip --default-pip >/dev/null
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "transformers==4.30.2" "tokenizers==0.13.3" "huggingface-hub<1.0"
    have_pins || { echo "transformers430: pinned packages not importable in $VENV" >&2; exit 1; }
fi

[ "${1:-}" = "--setup-only" ] && exit 0
exec "$VENV/bin/python" -m pytest tests/test_text_encoders.py -q -p no:cacheprovider
